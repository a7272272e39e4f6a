"""`ocspmint serve` against slow clients (slowloris): a request not read
whole within ``REQUEST_TIMEOUT`` gets 408 and its connection is closed,
logged as one ``request_timeout`` line; an idle keep-alive connection is
closed after ``KEEPALIVE_SECONDS``; other clients are answered meanwhile.
The served store is the session demo's, published by a real `ocspmint run`
(SoftHSM2); `serve` runs in a child process with both constants set small."""

from __future__ import annotations

import json
import queue
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.x509 import ocsp

from e2e import BIN, run_json
from ocspmint.config import load_config
from ocspmint.demo import Demo
from ocspmint.issuer import issuer_identity
from ocspmint.refresh_purge import log as refresh_log
from ocspmint.request import get_paths, request_for
from test_responder import Server, write_config

REQUEST_TIMEOUT = 1.0  # seconds, set in the served child (default 10)
KEEPALIVE_SECONDS = 2.0  # seconds, set in the served child (default 15)
CLOSED_WITHIN = 20.0  # seconds a slow client may stay connected before the test fails
REPLY_408 = b"HTTP/1.1 408 Request Timeout\r\n"
LOG_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")  # RFC 3339 UTC, microseconds


class ShortTimeoutServer(Server):
    """test_responder's Server, but `ocspmint serve` runs with
    ``responder.REQUEST_TIMEOUT`` and ``KEEPALIVE_SECONDS`` set to this
    module's values."""

    def __init__(self, config: Path) -> None:
        code = ("import sys, ocspmint.responder as r; "
                f"r.REQUEST_TIMEOUT = {REQUEST_TIMEOUT}; r.KEEPALIVE_SECONDS = {KEEPALIVE_SECONDS}; "
                "from ocspmint.cli import main; "
                f"sys.exit(main(['serve', '--config', {str(config)!r}, '--listen', '127.0.0.1:0']))")
        self.proc = subprocess.Popen([str(BIN / "python"), "-c", code], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._q: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()
        self.port = int(self.wait_event("start")["listen"][0].rpartition(":")[2])


@pytest.fixture(scope="module")
def published(demo: Demo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config serving the session demo's responses, published once."""
    root = tmp_path_factory.mktemp("serve-timeouts")
    config = write_config(demo, root)
    code, summary = run_json(demo, config=config)
    assert code == 0, summary
    return config


@pytest.fixture
def server(published: Path) -> Iterator[ShortTimeoutServer]:
    """A fresh server per test: each test sees its own log lines."""
    s = ShortTimeoutServer(published)
    yield s
    assert s.stop() == 0, "".join(s.lines)


def until_closed(s: socket.socket) -> bytes:
    """Everything the server sends on ``s`` until it closes it; fails the
    test when it is still open after CLOSED_WITHIN seconds."""
    s.settimeout(CLOSED_WITHIN)
    received = b""
    try:
        while chunk := s.recv(4096):
            received += chunk
    except TimeoutError:
        pytest.fail(f"connection still open after {CLOSED_WITHIN} s; received {received!r}")
    except ConnectionResetError:
        pass
    return received


def slow_client(server: Server, first: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", server.port))
    if first:
        s.sendall(first)
    return s


def trickle(s: socket.socket, data: bytes) -> threading.Thread:
    """Send ``data`` on ``s`` one byte every 0.1 s (slowloris) from a
    thread, until done or the server closes the connection."""
    def send() -> None:
        for i in range(len(data)):
            try:
                s.send(data[i:i + 1])
            except OSError:
                return
            time.sleep(0.1)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def assert_good_get(server: Server, demo: Demo, config: Path) -> None:
    """A normal GET for a good serial is answered with its signed response."""
    serial = demo.serials["good"][0]
    status, headers, body = server.request("GET", get_paths(request_for(issuer_identity(load_config(config).issuers[0]),
                                                                        serial))[0])
    assert status == 200 and headers["content-type"] == "application/ocsp-response", (status, headers)
    resp = ocsp.load_der_ocsp_response(body)
    assert resp.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
    assert {(single.serial_number, single.certificate_status) for single in resp.responses} == {
        (serial, ocsp.OCSPCertStatus.GOOD)}


def test_a_half_sent_request_line_gets_408_and_is_closed_while_others_are_answered(server, demo, published):
    """Slowloris: half a request line and then nothing, nothing at all, or
    a request line sent byte by byte holds no connection past
    REQUEST_TIMEOUT; a normal GET meanwhile is answered as usual."""
    half_line = slow_client(server, b"GET /MFEwTzBNMEswSTAJBgUrDgMCGgUABBT")
    silent = slow_client(server, b"")
    trickling = slow_client(server, b"")
    sender = trickle(trickling, b"GET /" + b"M" * 1000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert_good_get(server, demo, published)
    for s in (half_line, silent, trickling):
        with s:
            assert until_closed(s).startswith(REPLY_408)
    sender.join(timeout=CLOSED_WITHIN)
    logged = server.wait_event("request_timeout")
    assert logged["waiting_for"] == "headers" and logged["seconds"] == REQUEST_TIMEOUT and logged["peer"] == "127.0.0.1"
    assert_good_get(server, demo, published)
    assert "Traceback" not in "".join(server.lines)


def test_a_post_body_never_finished_gets_408_and_is_closed(server, demo, published):
    """Headers in time, then 10 of the 100 body bytes announced: the body
    deadline closes the connection; the request counts as aborted."""
    with slow_client(server, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/ocsp-request\r\n"
                             b"Content-Length: 100\r\n\r\n0123456789") as s:
        assert until_closed(s).startswith(REPLY_408)
    assert server.wait_event("request_timeout")["waiting_for"] == "body"
    assert server.metrics()["ocspmint_serve_requests_total{result=aborted}"] == 1
    assert_good_get(server, demo, published)


def test_an_idle_keep_alive_connection_is_closed_without_a_408(server, demo, published):
    """After a complete answer on a kept-alive connection, a client that
    sends nothing more is closed (KEEPALIVE_SECONDS), silently: an idle
    connection is not a timed-out request."""
    path = get_paths(request_for(issuer_identity(load_config(published).issuers[0]), demo.serials["good"][0]))[0]
    with slow_client(server, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()) as s:
        received = until_closed(s)
    assert received.startswith(b"HTTP/1.1 200 OK\r\n") and received.count(b"HTTP/1.1 ") == 1, received[:200]
    assert not any('"request_timeout"' in line for line in server.lines), server.lines


def test_serve_and_refresh_log_lines_share_one_time_field(server, capsys):
    """One log pipeline takes both: every line starts with ``time`` (RFC
    3339 UTC, microseconds, Z) then ``event``, in `serve` as in `refresh`.
    Before, `serve` wrote ``ts`` in whole seconds."""
    with slow_client(server, b"GET /") as s:
        until_closed(s)
    refresh_log("caught_up", published=0)
    lines = [*server.lines, capsys.readouterr().err]
    for line in lines:
        record = json.loads(line)
        assert list(record)[:2] == ["time", "event"] and LOG_TIME.fullmatch(record["time"]), line
