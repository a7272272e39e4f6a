"""atheris fuzz target for the OCSP request parser (``ocspmint.request``).

``parse_request(der)`` and ``parse_get_path(path)`` document that anything
they do not accept raises ``RequestError`` (which the responder answers with
malformedRequest, RFC 6960 §4.2.1) and that no input raises anything else.
Each input is tried as:

- DER bytes, through ``parse_request``;
- a raw GET path (the bytes as Latin-1 text), through ``parse_get_path``;
- the GET paths a client would send for those bytes (RFC 6960 App. A.1,
  ``get_paths``), also with every ``//`` merged into ``/`` the way some
  proxies do: when the DER parses, each of these must give the same CertIDs.

Any other exception or a mismatch ends the run with a crash report (exit
status non-zero). Run for a fixed time (new inputs go to the first folder;
``fuzz/corpus`` holds the seeds, see make_corpus.py)::

    python fuzz/fuzz_request.py build/fuzz-corpus fuzz/corpus -max_total_time=60

or ``make fuzz FUZZ_SECONDS=60``.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["ocspmint.request", "ocspmint.der"]):
    from ocspmint.request import RequestError, get_paths, parse_get_path, parse_request


def check(data: bytes) -> None:
    """One fuzz input; raises only on a parser bug."""
    try:
        parsed = parse_request(data)
    except RequestError:
        parsed = None
    try:
        parse_get_path(data.decode("latin-1"))
    except RequestError:
        pass
    for path in get_paths(data):
        for variant in {path, path.replace("//", "/")}:
            try:
                got = parse_get_path(variant)
            except RequestError:
                got = None
            if parsed is not None and variant == path and got != parsed:
                raise AssertionError(f"GET path {path!r} gives {got}, the DER gives {parsed}")


def main() -> None:
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
