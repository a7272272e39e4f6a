"""RFC 7512 PKCS#11 URIs: parse, check, and read the PIN they lead to.

``parse(uri)`` → ``Pkcs11Uri`` or UriError. Every value is percent-decoded
(RFC 3986 §2.1: "%" and two hex digits, anything else is an error); every
value but ``id`` must then be UTF-8 text (RFC 7512 §2.3); no attribute may
appear twice (RFC 7512 §2.3); no value may be empty.

Supported, because both signing backends (python-pkcs11 and the native
extension, whose ``Signer`` takes a token label and serial only) match them:

- path: ``token`` and ``serial`` (the one present token matching them),
  ``object`` and ``id`` (the one private key matching them; at least one is
  required), ``type`` (``private`` only);
- query: ``module-path`` (the PKCS#11 module), ``pin-source`` (a PIN file:
  ``file:PATH`` or a plain path).

The other RFC 7512 attributes (``slot-id``, ``slot-manufacturer``,
``slot-description``, ``manufacturer``, ``model``, ``library-manufacturer``,
``library-description``, ``library-version``, ``module-name``) are refused:
no backend would match them, so a URI relying on one of them would sign
with whatever token the others select. ``pin-value`` is refused: a PIN
never sits in a config file, argv or a log. Error messages quote attribute
names, never a value that could be a PIN.

``read_pin`` reads and checks the PIN (from ``pin_env``, ``pin_file`` or
``pin-source``); the parent calls it before any worker logs in, so that an
empty or garbled PIN never reaches C_Login (where it would spend the
token's failed-login counter).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote_to_bytes

SUPPORTED_PATH = ("token", "serial", "object", "id", "type")
SUPPORTED_QUERY = ("module-path", "pin-source")
UNSUPPORTED_PATH = ("manufacturer", "model", "library-manufacturer", "library-description", "library-version",
                    "slot-id", "slot-description", "slot-manufacturer")
SUPPORTED_TEXT = ("supported: token, serial, object, id, type=private in the path; module-path, pin-source "
                  "in the query")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_BOM = b"\xef\xbb\xbf"


class UriError(ValueError):
    """A PKCS#11 URI that is malformed or asks for something refused, or a
    PIN that cannot be read or is unusable; the message never holds the PIN."""


@dataclass(frozen=True)
class Pkcs11Uri:
    path: dict[str, bytes] = field(default_factory=dict)
    query: dict[str, str] = field(default_factory=dict)

    def text(self, name: str) -> str | None:
        v = self.path.get(name)
        return None if v is None else v.decode("utf-8")


def _decode(name: str, value: str) -> bytes:
    """Percent-decode ``value`` of attribute ``name``; UTF-8 text unless ``id``."""
    if not value:
        raise UriError(f"attribute {name!r} has an empty value")
    if _BAD_PERCENT.search(value):
        raise UriError(f"attribute {name!r}: invalid percent-encoding (RFC 3986 §2.1: '%' must be followed "
                       "by two hex digits; write '%25' for '%')")
    raw = unquote_to_bytes(value)
    if name != "id":
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            raise UriError(f"attribute {name!r}: not UTF-8 text once percent-decoded (RFC 7512 §2.3)") from None
    return raw


def _pairs(part: str, sep: str, where: str) -> list[tuple[str, str]]:
    out = []
    for n, item in enumerate(filter(None, part.split(sep)), 1):
        name, eq, value = item.partition("=")
        if unquote_to_bytes(name).lower() == b"pin-value":
            raise UriError("pin-value is refused; use pin_env, pin_file or pin-source")
        if not eq:  # the whole item may be a secret pasted in: never quote it
            raise UriError(f"{where} attribute {n} is not name=value")
        out.append((name, value))
    return out


def parse(uri: str) -> Pkcs11Uri:
    """Parse and check ``pkcs11:path-attrs?query-attrs``; raise UriError
    (its message is about the URI and does not repeat it)."""
    if uri[:7].lower() != "pkcs11:":  # a URI scheme is case-insensitive (RFC 3986 §3.1)
        raise UriError("must be an RFC 7512 PKCS#11 URI (pkcs11:...)")
    body, _, query = uri[7:].partition("?")
    path: dict[str, bytes] = {}
    for name, value in _pairs(body, ";", "path"):
        if name in path:
            raise UriError(f"attribute {name!r} given twice (RFC 7512 §2.3: each attribute at most once)")
        if name in UNSUPPORTED_PATH:
            raise UriError(f"attribute {name!r} is not supported: no signing backend matches it, so the token "
                           f"would be chosen without it ({SUPPORTED_TEXT})")
        if name not in SUPPORTED_PATH:
            raise UriError(f"unknown path attribute {name!r} ({SUPPORTED_TEXT})")
        path[name] = _decode(name, value)
    q: dict[str, str] = {}
    for name, value in _pairs(query, "&", "query"):
        if name in q:
            raise UriError(f"attribute {name!r} given twice (RFC 7512 §2.3: each attribute at most once)")
        if name == "module-name":
            raise UriError("attribute 'module-name' is not supported: give the module's file with module-path "
                           f"or signer.module ({SUPPORTED_TEXT})")
        if name not in SUPPORTED_QUERY:
            raise UriError(f"unknown query attribute {name!r} ({SUPPORTED_TEXT})")
        q[name] = _decode(name, value).decode("utf-8")
    if path.get("type", b"private") != b"private":
        raise UriError("type must be 'private' (the signing key)")
    if "object" not in path and "id" not in path:
        raise UriError("name the key with object= or id=")
    if "pin-source" in q:
        pin_source_path(q["pin-source"])
    return Pkcs11Uri(path, q)


def pin_source_path(source: str) -> str:
    """The file a ``pin-source`` value names: ``file:PATH``,
    ``file:///PATH``, ``file://localhost/PATH`` or a plain path. Raises
    UriError for anything else (a program to run, another scheme)."""
    if source.startswith("file:"):
        rest = source[5:]
        if rest.startswith("//"):
            host, slash, p = rest[2:].partition("/")
            if host not in ("", "localhost") or not slash:
                raise UriError("pin-source: only a local file is supported (file:PATH or file:///PATH)")
            rest = "/" + p
        if rest and rest != "/":
            return rest
    elif source and not source.startswith("|") and not re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", source):
        return source
    raise UriError("pin-source: give a PIN file as file:PATH (no program, no other scheme)")


def with_pin_source(uri: str, base: Path) -> str:
    """``uri`` with a relative ``pin-source`` file resolved against
    ``base`` (the config folder, as for pin_file); else ``uri`` unchanged.
    Call it on a URI that ``parse`` accepted."""
    body, sep, query = uri.partition("?")
    parts = query.split("&")
    for n, item in enumerate(parts):
        name, _, value = item.partition("=")
        if name == "pin-source":
            path = pin_source_path(unquote_to_bytes(value).decode("utf-8"))
            if not Path(path).is_absolute():
                parts[n] = "pin-source=file:" + quote(str(base / path), safe="/")
    return body + sep + "&".join(parts)


def _check_pin(pin: str, where: str) -> str:
    if not pin:
        raise UriError(f"{where} is empty: refusing to log in with an empty PIN")
    if pin.startswith("\ufeff"):
        raise UriError(f"{where} starts with a byte order mark (BOM): save it as UTF-8 without BOM")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in pin):
        raise UriError(f"{where} holds a control character (a stray newline, carriage return or tab?): "
                       "refusing to log in with it")
    return pin


_SHOWN_ENV = re.compile(r"[A-Z_][A-Z0-9_]*")


def read_pin(uri: Pkcs11Uri, pin_env: str, pin_file: str, environ: Mapping[str, str]) -> str:
    """The user PIN from ``pin_env`` (variable name), ``pin_file`` or the
    URI's ``pin-source`` (one source only; config.py refuses two). A file
    loses one trailing line ending (LF, CRLF or CR) and must be UTF-8 text.

    Refused, as UriError naming the variable or file, never the PIN: an
    unset variable, an unreadable file, an empty PIN, a byte order mark,
    non-UTF-8 bytes, a control character. Both backends log in with the
    UTF-8 bytes of the returned text (python-pkcs11 takes text only).
    """
    if pin_env:  # named only in the usual form (OCSPMINT_PIN): another value may be the PIN put there by mistake
        where = f"PIN environment variable {pin_env}" if _SHOWN_ENV.fullmatch(pin_env) else \
            "the PIN environment variable pin_env names (not shown: not in the usual upper-case form)"
        if pin_env not in environ:
            raise UriError(f"{where} is not set")
        return _check_pin(environ[pin_env], where)
    source = pin_file or uri.query.get("pin-source", "")
    if not source:
        raise UriError("no PIN source: set pin_env, pin_file or pin-source in the URI")
    path = pin_source_path(source) if not pin_file else pin_file
    where = f"PIN file {path}"
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UriError(f"cannot read {where}: {e.strerror}") from None
    if data.startswith(_BOM):
        raise UriError(f"{where} starts with a byte order mark (BOM): save it as UTF-8 without BOM")
    for ending in (b"\r\n", b"\n", b"\r"):  # one line ending, as text mode read it before
        if data.endswith(ending):
            data = data[: -len(ending)]
            break
    try:
        pin = data.decode("utf-8")
    except UnicodeDecodeError:  # its message would quote a byte of the PIN
        raise UriError(f"{where} is not UTF-8 text") from None
    return _check_pin(pin, where)
