"""Config checks of the signing side: [response] durations (whole seconds,
backdate ≤ refresh_after / 4), [signing] numbers, PKCS#11 URIs (parsed and
checked at load, only the attributes both backends match, RFC 7512 §2.3,
RFC 3986 §2.1), PIN sources (one; pin-source relative to the config
folder) and the PIN itself (read and checked once before any signer
process logs in: exit 2, no C_Login).

The pure config rules are checked through ``load_config`` and ``read_pin``;
the CLI ones against a SoftHSM2 demo token, through the p11fault shim
where a test must prove that no C_Login was made (``P11FAULT_LOGIN_RV``
refuses every login and ``P11FAULT_LOG`` records each one)."""

from __future__ import annotations

import codecs
import datetime as dt
import json
import random
import re
import subprocess
from pathlib import Path

import pytest

from e2e import BIN
from ocspmint.config import ConfigError, load_config
from ocspmint.demo import Demo, build_demo
from ocspmint.pkcs11uri import UriError, parse, read_pin
from ocspmint.planner import refresh_at, refresh_point

SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"
SIGNER = 'uri = "pkcs11:token=t;object=k"\nmodule = "/m.so"\npin_env = "P"'
PIN = "8jT4-secret-pin"


def _config(tmp_path: Path, signer: str = SIGNER, extra: str = "", name: str = "c.toml") -> Path:
    p = tmp_path / name
    p.write_text(f"""
[[issuers]]
name = "a"
cert = "a.pem"
[issuers.signer]
{signer}
[[sources]]
type = "sqlite"
path = "l.sqlite"
{extra}""")
    return p


def _refused(path: Path) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path)
    message = str(e.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message
    return message


# --- [response] durations ---------------------------------------------------


@pytest.mark.parametrize("key,value", [("validity", "P6DT23H59M58.5S"), ("backdate", "PT30M0.25S"),
                                       ("refresh_after", "P2DT0.5S")])
def test_fractional_response_durations_are_refused_naming_the_key(tmp_path, key, value):
    message = _refused(_config(tmp_path, extra=f'[response]\n{key} = "{value}"'))
    assert f"$.response.{key}:" in message and "whole seconds" in message and "RFC 5280" in message


def test_whole_second_durations_and_the_defaults_load(tmp_path):
    cfg = load_config(_config(tmp_path))
    assert cfg.response.backdate == dt.timedelta(hours=1) and cfg.response.refresh_after == dt.timedelta(days=3)
    load_config(_config(tmp_path, extra='[response]\nvalidity = "P6DT23H59M58S"\nbackdate = "PT30M1S"'))


@pytest.mark.parametrize("backdate", ["PT59M", "PT30M", "PT15M1S"])
def test_backdate_over_a_quarter_of_refresh_after_is_refused(tmp_path, backdate):
    message = _refused(_config(tmp_path, extra=f'[response]\nvalidity = "PT8H"\nrefresh_after = "PT1H"\n'
                                               f'backdate = "{backdate}"'))
    assert "$.response.backdate:" in message and "refresh_after / 4" in message


@pytest.mark.parametrize("response", ['validity = "PT12H"\nrefresh_after = "PT5H"\nbackdate = "PT1H15M"',
                                      'validity = "P1D"\nrefresh_after = "PT16H"\nbackdate = "PT4H"', ""])
def test_a_response_loaded_is_never_due_again_before_a_quarter_of_refresh_after(tmp_path, response):
    """backdate = refresh_after / 4 at most (and, for a short validity, the
    8 h margin before nextUpdate): planner.refresh_at then lies at least
    refresh_after / 4 after producedAt for every serial."""
    r = load_config(_config(tmp_path, extra=f"[response]\n{response}")).response
    produced = dt.datetime(2026, 11, 22, 9, 0, tzinfo=dt.timezone.utc)
    this_update = produced - r.backdate
    rng = random.Random(7)
    for serial in [rng.getrandbits(128) for _ in range(2000)]:
        at = refresh_at(this_update, this_update + r.validity, serial, r.refresh_after, produced + dt.timedelta(days=90))
        assert at - produced >= r.refresh_after / 4, (serial, at)


@pytest.mark.parametrize("response", ['validity = "PT8H"\nrefresh_after = "PT1H"\nbackdate = "PT15M"',
                                      'validity = "PT9H59M59S"\nrefresh_after = "PT4H"\nbackdate = "PT1H"'])
def test_a_short_validity_is_refreshed_before_half_its_interval_not_at_once(tmp_path, response):
    """BR 4.9.9: under 16 h, re-sign before half the interval. The refresh
    point used to be 8 h before nextUpdate for every interval, which for an
    8 h validity is thisUpdate itself: every response was due at once."""
    r = load_config(_config(tmp_path, extra=f"[response]\n{response}")).response
    produced = dt.datetime(2026, 11, 22, tzinfo=dt.timezone.utc)
    this_update = produced - r.backdate
    point = refresh_point(this_update, this_update + r.validity, r.refresh_after)
    assert point == this_update + r.refresh_after and point - produced >= r.refresh_after / 4
    assert this_update + r.validity - point >= (r.validity + dt.timedelta(seconds=1)) / 2


@pytest.mark.parametrize("backdate,refresh_after", [("-PT1S", "PT1H"), ("PT0S", "PT0S")])
def test_negative_backdate_and_zero_refresh_after_are_refused(tmp_path, backdate, refresh_after):
    message = _refused(_config(tmp_path, extra=f'[response]\nvalidity = "PT8H"\nrefresh_after = "{refresh_after}"\n'
                                               f'backdate = "{backdate}"'))
    assert "$.response.backdate:" in message or "$.response.refresh_after:" in message


# --- [signing] ----------------------------------------------------------------


@pytest.mark.parametrize("line,key", [('timeout = "PT0S"', "timeout"), ('timeout = "-PT5S"', "timeout"),
                                      ("workers = -1", "workers"), ("batch_size = 0", "batch_size"),
                                      ("retries = 0", "retries"), ("sessions = 0", "sessions"),
                                      ("sessions = 257", "sessions")])
def test_signing_numbers_out_of_range_are_refused_naming_the_key(tmp_path, line, key):
    message = _refused(_config(tmp_path, extra=f"[signing]\n{line}"))
    assert f"$.signing.{key}:" in message
    if key == "timeout":
        assert "must be > 0" in message


def test_signing_numbers_in_range_load(tmp_path):
    load_config(_config(tmp_path, extra='[signing]\nworkers = 0\nbatch_size = 1\nretries = 1\nsessions = 256\n'
                                        'timeout = "PT0.5S"'))


# --- PKCS#11 URIs ---------------------------------------------------------------


@pytest.mark.parametrize("uri,words", [
    ("pkcs11:token=t", "name the key with object= or id="),
    ("pkcs11:token=t;object=k;type=cert", "type must be 'private'"),
    ("pkcs11:token=t;object=k;foo=bar", "unknown path attribute 'foo'"),
    ("pkcs11:token=t;object=k?foo=bar", "unknown query attribute 'foo'"),
    ("pkcs11:token=t;slot-id=999999;object=k", "'slot-id' is not supported"),
    ("pkcs11:token=t;slot-manufacturer=X;object=k", "'slot-manufacturer' is not supported"),
    ("pkcs11:token=t;slot-description=X;object=k", "'slot-description' is not supported"),
    ("pkcs11:token=t;manufacturer=Nobody;object=k", "'manufacturer' is not supported"),
    ("pkcs11:model=Nothing;token=t;object=k", "'model' is not supported"),
    ("pkcs11:library-manufacturer=X;token=t;object=k", "'library-manufacturer' is not supported"),
    ("pkcs11:library-description=X;token=t;object=k", "'library-description' is not supported"),
    ("pkcs11:library-version=99;token=t;object=k", "'library-version' is not supported"),
    ("pkcs11:token=t;object=k?module-name=softhsm2", "'module-name' is not supported"),
    ("pkcs11:token=a;token=b;object=k", "'token' given twice"),
    ("pkcs11:token=t;object=k?module-path=/x.so&module-path=/m.so", "'module-path' given twice"),
    ("pkcs11:token=t;object=ocsp%ZZresponder", "invalid percent-encoding"),
    ("pkcs11:token=t;object=k%2", "invalid percent-encoding"),
    ("pkcs11:token=ocsp%FFmint;object=k", "'token': not UTF-8 text"),
    ("pkcs11:token=;object=k", "'token' has an empty value"),
    ("http://token=t;object=k", "must be an RFC 7512 PKCS#11 URI"),
    ("pkcs11:token=t;object=k?pin-source=%7C/usr/bin/pinentry", "pin-source"),
    ("pkcs11:token=t;object=k?pin-source=env:P", "pin-source"),
])
def test_bad_uri_is_refused_at_load_naming_file_and_key(tmp_path, uri, words):
    message = _refused(_config(tmp_path, signer=f'uri = "{uri}"\nmodule = "/m.so"\npin_env = "P"'))
    assert "$.issuers[0].signer.uri: " in message and words in message, message
    if "not supported" in message or "unknown" in message:
        assert "supported: token, serial, object, id, type=private" in message


@pytest.mark.parametrize("uri", [
    "pkcs11:token=t;object=k;SECRET123456",
    "pkcs11:token=t;object=k?pin-value=SECRET123456",
    "pkcs11:token=t;object=k;pin-value=SECRET123456",
    "pkcs11:token=t;object=k?pin%2Dvalue=SECRET123456",
    "pkcs11:token=t;object=k?pinvalue=SECRET123456",
])
def test_uri_errors_never_repeat_what_may_be_a_pin(tmp_path, uri):
    message = _refused(_config(tmp_path, signer=f'uri = "{uri}"\nmodule = "/m.so"\npin_env = "P"'))
    assert "$.issuers[0].signer.uri: " in message and "SECRET" not in message


@pytest.mark.parametrize("uri", [
    "PKCS11:token=t;object=k",  # a scheme is case-insensitive (RFC 3986 §3.1)
    "pkcs11:token=t;id=%FF%00",  # id is binary
    "pkcs11:token=OCSP%20t%C3%B8ken;object=r%C3%A9sp%20key;type=private",
    "pkcs11:serial=3eff25fec3d86965;object=k",
])
def test_good_uris_load(tmp_path, uri):
    load_config(_config(tmp_path, signer=f'uri = "{uri}"\nmodule = "/m.so"\npin_env = "P"'))


def test_parse_decodes_values():
    uri = parse("pkcs11:token=OCSP%20t%C3%B8ken;id=%FF%00;type=private?module-path=/usr/lib/x%20y.so")
    assert uri.text("token") == "OCSP tøken" and uri.path["id"] == b"\xff\x00"
    assert uri.query["module-path"] == "/usr/lib/x y.so"


# --- module and PIN sources -------------------------------------------------------


@pytest.mark.parametrize("signer,words", [
    ('uri = "pkcs11:token=t;object=k"\nmodule = "/m.so"\npin_env = "P"\npin_file = "p.txt"',
     "$.issuers[0].signer: give one PIN source, not pin_env and pin_file"),
    ('uri = "pkcs11:token=t;object=k?pin-source=file:p.txt"\nmodule = "/m.so"\npin_env = "P"',
     "$.issuers[0].signer: give one PIN source, not pin_env and pin-source in the URI"),
    ('uri = "pkcs11:token=t;object=k?pin-source=file:p.txt"\nmodule = "/m.so"\npin_file = "p.txt"',
     "$.issuers[0].signer: give one PIN source, not pin_file and pin-source in the URI"),
    ('uri = "pkcs11:token=t;object=k"\nmodule = "/m.so"',
     "$.issuers[0].signer: no PIN source"),
    ('uri = "pkcs11:token=t;object=k"\nmodule = "/m.so"\npin_env = ""',
     "$.issuers[0].signer: no PIN source"),
    ('uri = "pkcs11:token=t;object=k"\npin_env = "P"',
     "$.issuers[0].signer.module: no PKCS#11 module"),
    ('uri = "pkcs11:token=t;object=k?module-path=/x.so"\nmodule = "/m.so"\npin_env = "P"',
     "$.issuers[0].signer.module: '/m.so' differs from the URI's module-path '/x.so'"),
])
def test_signer_settings_are_refused_at_load(tmp_path, signer, words):
    message = _refused(_config(tmp_path, signer=signer))
    assert words in message, message


def test_module_path_alone_or_equal_to_module_loads(tmp_path):
    load_config(_config(tmp_path, signer='uri = "pkcs11:token=t;object=k?module-path=/m.so"\npin_env = "P"'))
    load_config(_config(tmp_path, signer='uri = "pkcs11:token=t;object=k?module-path=/m.so"\nmodule = "/m.so"\n'
                                         'pin_env = "P"'))


@pytest.mark.parametrize("source", ["file:pins/p%20in.txt", "pins/p%20in.txt"])
def test_relative_pin_source_is_resolved_against_the_config_folder(tmp_path, monkeypatch, source):
    folder = tmp_path / "etc"
    (folder / "pins").mkdir(parents=True)
    (folder / "pins" / "p in.txt").write_text(PIN + "\n")
    cfg = load_config(_config(folder, signer=f'uri = "pkcs11:token=t;object=k?pin-source={source}"\nmodule = "/m.so"'))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    signer = cfg.issuers[0].signer
    uri = parse(signer.uri)
    assert uri.query["pin-source"] == f"file:{folder}/pins/p in.txt"
    assert read_pin(uri, signer.pin_env, signer.pin_file, {}) == PIN


def test_absolute_pin_source_is_kept(tmp_path):
    cfg = load_config(_config(tmp_path, signer='uri = "pkcs11:token=t;object=k?pin-source=file:///etc/p.txt"\n'
                                               'module = "/m.so"'))
    assert cfg.issuers[0].signer.uri == "pkcs11:token=t;object=k?pin-source=file:///etc/p.txt"


# --- the PIN --------------------------------------------------------------------------


@pytest.mark.parametrize("data,words", [
    (b"", "is empty"),
    (b"\n", "is empty"),
    (codecs.BOM_UTF8 + PIN.encode() + b"\n", "byte order mark"),
    (b"\xe9" + PIN.encode() + b"\n", "is not UTF-8 text"),
    (PIN.encode() + b"\n\n", "control character"),
    (PIN.encode() + b"\t\n", "control character"),
])
def test_unusable_pin_file_is_refused_naming_it_never_the_pin(tmp_path, data, words):
    f = tmp_path / "pin"
    f.write_bytes(data)
    with pytest.raises(UriError) as e:
        read_pin(parse("pkcs11:token=t;object=k"), "", str(f), {})
    assert str(e.value).startswith(f"PIN file {f} ") and words in str(e.value)
    assert PIN not in str(e.value) and "xe9" not in str(e.value)


@pytest.mark.parametrize("data", [PIN.encode(), PIN.encode() + b"\n", PIN.encode() + b"\r\n", "pïn tøken".encode()])
def test_pin_file_loses_one_line_ending(tmp_path, data):
    f = tmp_path / "pin"
    f.write_bytes(data)
    assert read_pin(parse("pkcs11:token=t;object=k"), "", str(f), {}) == data.decode().rstrip("\r\n")


@pytest.mark.parametrize("environ,words", [({}, "is not set"), ({"P": ""}, "is empty"),
                                           ({"P": PIN + "\n"}, "control character"),
                                           ({"P": "\ufeff" + PIN}, "byte order mark")])
def test_unusable_pin_variable_is_refused_naming_it_never_the_pin(environ, words):
    with pytest.raises(UriError) as e:
        read_pin(parse("pkcs11:token=t;object=k"), "P", "", environ)
    assert str(e.value).startswith("PIN environment variable P ") and words in str(e.value)
    assert PIN not in str(e.value)


# --- end to end, SoftHSM2 demo ------------------------------------------------------------


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    """A small demo CA and token; each test writes its own config (own state and store)."""
    return build_demo(tmp_path_factory.mktemp("checks"), certs=3, precerts=1, revoke=1)


def _variant(demo: Demo, folder: Path, signer: list[str], response: str = "", signing: str = "workers = 1",
             extra: str = "") -> Path:
    """A config in ``folder`` for ``demo``'s CA and token (absolute paths),
    with its own state and store and the given [issuers.signer] lines."""
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / "ocspmint.toml"
    p.write_text(f"""state_dir = "state"
{extra}
[store]
url = "file:responses"
[response]
{response}
[signing]
{signing}
[[issuers]]
name = "issuing-ca"
cert = "{demo.issuing_ca}"
[issuers.signer]
cert = "{demo.responder_cert}"
{chr(10).join(signer)}
[[sources]]
type = "openssl-index"
path = "{demo.index}"
certs_dir = "{demo.certs_dir}"
issuer = "issuing-ca"
""")
    return p


def _cli(demo: Demo, config: Path, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "ocspmint"), *args, "--config", str(config)], env={**demo.env(), **(env or {})},
                          cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _unexpired(demo: Demo) -> int:
    return len(set(demo.serials["good"]) | set(demo.serials["revoked"]) | set(demo.serials["precert"]))


def _published(config: Path) -> int:
    return sum(1 for f in (config.parent / "responses").rglob("*") if f.is_file())


def _assert_refused(p: subprocess.CompletedProcess[str], *words: str) -> None:
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr and p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ocspmint: "), p.stderr
    assert all(w in lines[0] for w in words), lines[0]


URI = 'uri = "pkcs11:token=ocspmint;object=ocsp-responder;type=private"'


@pytest.mark.parametrize("uri,words", [
    ("pkcs11:token=ocspmint;slot-id=999999;object=ocsp-responder;type=private", "'slot-id' is not supported"),
    ("pkcs11:token=ocspmint;manufacturer=Nobody;object=ocsp-responder;type=private", "'manufacturer' is not supported"),
    ("pkcs11:token=ocspmint;object=ocsp-responder;type=cert", "type must be 'private'"),
    ("pkcs11:token=ocsp%FFmint;object=ocsp-responder;type=private", "not UTF-8 text"),
    ("pkcs11:token=ocspmint;object=ocsp%ZZresponder;type=private", "invalid percent-encoding"),
])
def test_run_refuses_a_bad_uri_at_load_naming_file_and_key(token, tmp_path, uri, words):
    config = _variant(token, tmp_path, [f'uri = "{uri}"', f'module = "{SOFTHSM}"', f'pin_file = "{token.pin_file}"'])
    _assert_refused(_cli(token, config, "run", "--quiet"), str(config), "$.issuers[0].signer.uri: ", words)
    assert _published(config) == 0


@pytest.mark.parametrize("response,key", [('validity = "P6DT23H59M58.5S"', "validity"),
                                          ('backdate = "PT30M0.25S"', "backdate"),
                                          ('validity = "PT8H"\nrefresh_after = "PT1H"\nbackdate = "PT59M"', "backdate")])
def test_run_refuses_response_timing_at_load(token, tmp_path, response, key):
    config = _variant(token, tmp_path, [URI, f'module = "{SOFTHSM}"', f'pin_file = "{token.pin_file}"'],
                      response=response)
    _assert_refused(_cli(token, config, "run", "--quiet"), str(config), f"$.response.{key}: ")


@pytest.mark.parametrize("timeout", ["PT0S", "-PT5S"])
def test_run_refuses_a_signing_timeout_that_is_not_positive(token, tmp_path, timeout):
    config = _variant(token, tmp_path, [URI, f'module = "{SOFTHSM}"', f'pin_file = "{token.pin_file}"'],
                      signing=f'workers = 1\ntimeout = "{timeout}"')
    _assert_refused(_cli(token, config, "run", "--quiet"), str(config), "$.signing.timeout: ", "must be > 0")


@pytest.mark.parametrize("backend", ["native", "python"])
def test_relative_pin_source_signs_from_any_working_directory(token, tmp_path, backend):
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "pin.txt").write_bytes(token.pin_file.read_bytes())
    config = _variant(token, folder, ['uri = "pkcs11:token=ocspmint;object=ocsp-responder;type=private'
                                      '?pin-source=file:pin.txt"', f'module = "{SOFTHSM}"'],
                      signing=f'workers = 1\nbackend = "{backend}"')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    p = _cli(token, config, "run", "--quiet", "--json", cwd=elsewhere)
    summary = json.loads(p.stdout)
    assert p.returncode == 0 and summary["ok"] and summary["published"] == _unexpired(token), \
        (summary["failures"], p.stderr)
    assert summary["signer_backend"] == {"issuing-ca": backend}


def _shim_env(shim: Path, log: Path) -> dict[str, str]:
    """Every C_Login refused (CKR_PIN_INCORRECT) and logged: a log line is a login attempt."""
    return {"P11FAULT_MODULE": SOFTHSM, "P11FAULT_LOGIN_RV": "0xA0", "P11FAULT_LOG": str(log)}


PIN_FILES = {
    "empty": b"",
    "bom": codecs.BOM_UTF8 + b"123456\n",
    "latin1": b"\xe9123456\n",
    "two-newlines": b"123456\n\n",
}


@pytest.mark.parametrize("name", PIN_FILES)
def test_unusable_pin_file_exits_2_before_any_login(token, shim, tmp_path, name):
    pin = tmp_path / "pins" / name
    pin.parent.mkdir()
    pin.write_bytes(PIN_FILES[name])
    log = tmp_path / "p11fault.log"
    config = _variant(token, tmp_path / "cfg", [URI, f'module = "{shim}"', f'pin_file = "{pin}"'],
                      signing="workers = 2")
    p = _cli(token, config, "run", "--quiet", env=_shim_env(shim, log))
    _assert_refused(p, "issuer issuing-ca: ", f"PIN file {pin} ")
    assert not log.exists(), log.read_text()
    assert "123456" not in p.stderr and _published(config) == 0


@pytest.mark.parametrize("value,words", [("", "is empty"), ("123456\n", "control character")])
def test_unusable_pin_variable_exits_2_before_any_login(token, shim, tmp_path, value, words):
    log = tmp_path / "p11fault.log"
    config = _variant(token, tmp_path, [URI, f'module = "{shim}"', 'pin_env = "CHECKS_PIN"'])
    p = _cli(token, config, "run", "--quiet", env={**_shim_env(shim, log), "CHECKS_PIN": value})
    _assert_refused(p, "issuer issuing-ca: PIN environment variable CHECKS_PIN ", words)
    assert not log.exists(), log.read_text()


def test_refresh_with_an_empty_pin_exits_2_before_any_login(token, shim, tmp_path):
    log = tmp_path / "p11fault.log"
    config = _variant(token, tmp_path, [URI, f'module = "{shim}"', 'pin_env = "CHECKS_PIN"'],
                      signing="workers = 2", extra='[refresh]\nmetrics_listen = ""')
    p = _cli(token, config, "refresh", env={**_shim_env(shim, log), "CHECKS_PIN": ""}, timeout=60)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "ocspmint: issuer issuing-ca: PIN environment variable CHECKS_PIN is empty" in p.stderr
    assert not log.exists(), log.read_text()


def test_a_well_formed_wrong_pin_still_reaches_the_token(token, shim, tmp_path):
    """The control for the tests above: the shim logs the login a PIN that passes the checks gets."""
    log = tmp_path / "p11fault.log"
    config = _variant(token, tmp_path, [URI, f'module = "{shim}"', 'pin_env = "CHECKS_PIN"'])
    p = _cli(token, config, "run", "--quiet", env={**_shim_env(shim, log), "CHECKS_PIN": "000000"})
    assert p.returncode == 1 and "CKR_PIN_INCORRECT" in p.stdout + p.stderr and "Traceback" not in p.stderr
    assert "login#" in log.read_text()


def test_pin_env_and_pin_file_together_are_refused_by_run(token, tmp_path):
    config = _variant(token, tmp_path, [URI, f'module = "{SOFTHSM}"', 'pin_env = "CHECKS_PIN"',
                                        f'pin_file = "{token.pin_file}"'])
    p = _cli(token, config, "run", "--quiet", env={"CHECKS_PIN": token.pin_file.read_text().strip()})
    _assert_refused(p, str(config), "$.issuers[0].signer: give one PIN source, not pin_env and pin_file")


def test_pin_from_a_variable_signs(token, tmp_path):
    config = _variant(token, tmp_path, [URI, f'module = "{SOFTHSM}"', 'pin_env = "CHECKS_PIN"'])
    p = _cli(token, config, "run", "--quiet", env={"CHECKS_PIN": token.pin_file.read_text().strip()})
    assert p.returncode == 0 and _published(config) == _unexpired(token), p.stdout + p.stderr


@pytest.mark.parametrize("text,key", [("issuers = []\n", "$.issuers: no issuer"),
                                      ('[[issuers]]\nname = ""\ncert = "a.pem"\n[issuers.signer]\n' + SIGNER,
                                       "$.issuers[0].name: empty"),
                                      ('[[issuers]]\nname = "a"\ncert = " "\n[issuers.signer]\n' + SIGNER,
                                       "$.issuers[0].cert: empty")])
def test_no_issuer_or_an_empty_issuer_name_or_cert_is_refused(tmp_path, text, key):
    """Before, such a config loaded: every later step had nothing to sign
    with, or a nameless issuer in store keys and messages."""
    p = tmp_path / "c.toml"
    p.write_text(text + '\n[[sources]]\ntype = "sqlite"\npath = "l.sqlite"\n')
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(p)
