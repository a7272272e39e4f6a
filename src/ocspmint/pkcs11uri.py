"""RFC 7512 PKCS#11 URIs: parse and resolve to a token and a private key.

``parse(uri)`` → ``Pkcs11Uri``; path attributes (token, serial, model,
manufacturer, object, id, type, slot-id) and query attributes (module-path,
pin-source) are percent-decoded (RFC 7512 §2.3). ``pin-value`` is refused:
a PIN never sits in a config file, argv or a log.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote_to_bytes

PATH_ATTRS = {"token", "manufacturer", "serial", "model", "library-manufacturer", "library-description",
              "library-version", "object", "type", "id", "slot-id", "slot-description", "slot-manufacturer"}
QUERY_ATTRS = {"module-path", "module-name", "pin-source"}


class UriError(ValueError):
    """A PKCS#11 URI that is malformed or asks for something refused."""


@dataclass(frozen=True)
class Pkcs11Uri:
    path: dict[str, bytes] = field(default_factory=dict)
    query: dict[str, str] = field(default_factory=dict)

    def text(self, name: str) -> str | None:
        v = self.path.get(name)
        return None if v is None else v.decode("utf-8")


def parse(uri: str) -> Pkcs11Uri:
    """Parse ``pkcs11:path-attrs?query-attrs``; raise UriError."""
    if not uri.startswith("pkcs11:"):
        raise UriError("PKCS#11 URI must start with 'pkcs11:'")
    body, _, query = uri[len("pkcs11:"):].partition("?")
    path: dict[str, bytes] = {}
    for part in filter(None, body.split(";")):
        name, eq, value = part.partition("=")
        if not eq or name not in PATH_ATTRS:
            raise UriError(f"PKCS#11 URI: unknown or malformed path attribute {name!r}")
        if name in path:
            raise UriError(f"PKCS#11 URI: attribute {name!r} given twice")
        path[name] = unquote_to_bytes(value)
    q: dict[str, str] = {}
    for part in filter(None, query.split("&")):
        name, eq, value = part.partition("=")
        if name == "pin-value":
            raise UriError("PKCS#11 URI: pin-value is refused; use pin-source, pin_env or pin_file")
        if not eq or name not in QUERY_ATTRS:
            raise UriError(f"PKCS#11 URI: unknown or malformed query attribute {name!r}")
        q[name] = unquote_to_bytes(value).decode("utf-8")
    if path.get("type", b"private") != b"private":
        raise UriError("PKCS#11 URI: type must be 'private' (the signing key)")
    if "object" not in path and "id" not in path:
        raise UriError("PKCS#11 URI: name the key with object= or id=")
    return Pkcs11Uri(path, q)


def read_pin(uri: Pkcs11Uri, pin_env: str, pin_file: str, environ: dict[str, str]) -> str:
    """The user PIN from ``pin_env`` (variable name), ``pin_file`` or the
    URI's ``pin-source=file:…``; one trailing newline is stripped.

    Raises UriError that names where it looked, never the PIN itself.
    """
    if pin_env:
        if pin_env not in environ:
            raise UriError(f"PIN environment variable {pin_env} is not set")
        return environ[pin_env]
    source = pin_file or uri.query.get("pin-source", "")
    if source.startswith("file:"):
        source = source[5:]
    if not source:
        raise UriError("no PIN source: set pin_env, pin_file or pin-source in the URI")
    try:
        return Path(source).read_text().removesuffix("\n")
    except OSError as e:
        raise UriError(f"cannot read PIN file {source}: {e.strerror}") from None
