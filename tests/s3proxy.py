"""A fault-injecting HTTP/1.1 proxy on 127.0.0.1 in front of a real S3 server
(SeaweedFS, tests/seaweed.py), for store-fault tests of `ocspmint run`.

``FaultyS3(target, fault)``: every request is read in full, then
``fault(n, method, path)`` (n counts requests from 1) picks what happens:

- ``None``: forwarded unchanged (Host kept, so SigV4 still verifies);
- ``"reset"``: the connection is closed without an answer, nothing forwarded;
- ``"reset-after"``: forwarded (S3 stores the object), then the connection
  is closed without passing the answer on: the acknowledgement is lost;
- ``"hang"``: never answered, nothing forwarded (a PUT that never returns);
- ``"hang-after"``: forwarded, then never answered;
- ``"slowdown"`` / ``"denied"``: answered 503 SlowDown / 403 AccessDenied
  (S3's XML error body), nothing forwarded.

A hung request holds its connection until ``close()``. ``log`` records
(n, method, path, fault) for every request.
"""

from __future__ import annotations

import http.client
import http.server
import threading
from collections.abc import Callable
from typing import Any

Fault = Callable[[int, str, str], str | None]
FAULTS = (None, "reset", "reset-after", "hang", "hang-after", "slowdown", "denied")
_ERRORS = {"slowdown": (503, "SlowDown"), "denied": (403, "AccessDenied")}


class FaultyS3:
    """The proxy, serving from construction until ``close()``; ``endpoint``
    is its ``http://127.0.0.1:PORT``."""

    def __init__(self, target: str, fault: Fault) -> None:
        self.log: list[tuple[int, str, str, str | None]] = []
        self._closing = threading.Event()
        host, port = target.removeprefix("http://").split(":")
        proxy, lock = self, threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def handle_one(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with lock:
                    n = len(proxy.log) + 1
                    what = fault(n, self.command, self.path)
                    assert what in FAULTS, what
                    proxy.log.append((n, self.command, self.path, what))
                if what in _ERRORS:
                    status, code = _ERRORS[what]
                    out = f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>injected</Message></Error>'
                    self.reply(status, [("Content-Type", "application/xml")], out.encode())
                    return
                answer = None if what in ("reset", "hang") else self.forward(body)
                if what in ("hang", "hang-after"):
                    proxy._closing.wait()
                if what is not None:
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.reply(*answer)

            def reply(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in ("content-length", "connection", "transfer-encoding", "date", "server"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
                try:
                    conn.request(self.command, self.path, body=body, headers=dict(self.headers))
                    resp = conn.getresponse()
                    return resp.status, resp.getheaders(), resp.read()
                finally:
                    conn.close()

            do_PUT = do_GET = do_HEAD = do_POST = do_DELETE = handle_one

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def faults(self, kind: str) -> list[str]:
        """Paths of the requests that got ``kind``."""
        return [path for _, _, path, what in self.log if what == kind]

    def close(self) -> None:
        """Release hung requests and stop serving."""
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()
