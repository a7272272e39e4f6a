"""Config checks of where ocspmint writes and purges: [store] URL, S3
endpoint and timeout, [[purge]] URLs and timeout, [verify_served] URL and
timeout. Each used to load and fail later (an obstore ValueError, a Rust
panic on every PUT, http.client.InvalidURL after publishing) or to leak a
URL's user:password into summaries and the journal."""

from __future__ import annotations

import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from ocspmint.config import ConfigError, load_config, shown_url
from ocspmint.demo import Demo

BIN = Path(sys.executable).parent


def write(demo: Demo, extra: str, store: str = 'url = "file:responses"') -> Path:
    """The demo config with its [store] body replaced by ``store`` and
    ``extra`` appended; its own state folder."""
    text = demo.config.read_text().replace('[store]\nurl = "file:responses"\n', f"[store]\n{store}\n")
    text = text.replace('state_dir = "state"', f'state_dir = "state-{secrets.token_hex(4)}"')
    path = demo.root / f"cfg-{secrets.token_hex(4)}.toml"
    path.write_text(text + "\n" + extra)
    return path


def refused(demo: Demo, extra: str = "", store: str = 'url = "file:responses"') -> str:
    with pytest.raises(ConfigError) as e:
        load_config(write(demo, extra, store))
    return str(e.value)


@pytest.mark.parametrize(("url", "says"), [
    ("s3://bucket/a//b", "empty segment"),
    ("s3://bucket/a/./b", '"." or ".."'),
    ("s3://bucket/../b", '"." or ".."'),
    ("s3:///prefix", "without a bucket"),
    ("s3://bu cket/p", "bucket"),
    ("s3://bucket?x/p", "bucket"),
    ("file:", "without a path"),
    ("http://bucket/p", "unsupported store"),
])
def test_bad_store_urls_are_refused_naming_the_key(demo: Demo, url: str, says: str):
    message = refused(demo, store=f'url = "{url}"')
    assert "$.store.url: " in message and says in message, message


def test_credentials_in_a_store_url_are_refused_unshown(demo: Demo):
    message = refused(demo, store='url = "s3://AKIAEXAMPLE:TOPSECRET@bucket/ocsp"')
    assert "$.store.url" in message and "user:password" in message
    assert "TOPSECRET" not in message and "AKIAEXAMPLE" not in message, message


@pytest.mark.parametrize("url", ["s3://bucket", "s3://bucket/", "s3://bucket/a/b/", "s3://my.bucket-1_x/ocsp/v1"])
def test_good_store_urls_load(demo: Demo, url: str):
    assert load_config(write(demo, "", f'url = "{url}"')).store.url == url


@pytest.mark.parametrize(("endpoint", "says"), [
    ("127.0.0.1:8333", "starts with http:// or https://"),
    ("localhost:8333", "starts with http:// or https://"),
    ("ftp://127.0.0.1:8333", "starts with http:// or https://"),
    ("http://127.0.0.1:83x3", "83x3"),
    ("http://127.0.0.1:70000", "out of range"),
    ("http://127.0.0.1:8333/?x=1", "query"),
    ("http://", "no host"),
])
def test_bad_s3_endpoints_are_refused_naming_the_key(demo: Demo, endpoint: str, says: str):
    message = refused(demo, store=f'url = "s3://bucket/ocsp"\nendpoint = "{endpoint}"')
    assert "$.store.endpoint: " in message and says in message, message


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:8333", "https://s3.eu-west-1.amazonaws.com", "HTTP://[::1]:9000"])
def test_good_s3_endpoints_load(demo: Demo, endpoint: str):
    assert load_config(write(demo, "", f'url = "s3://b/p"\nendpoint = "{endpoint}"')).store.endpoint == endpoint


def purge(urls: str, extra: str = "") -> str:
    return f'[[purge]]\nname = "cdn"\ntype = "http"\nurls = {urls}\n{extra}'


@pytest.mark.parametrize(("url", "says"), [
    ("http://127.0.0.1:80x", "'80x'"),
    ("127.0.0.1:8080", "starts with http:// or https://"),
    ("http://127.0.0.1:0", "port 0"),
    ("http://127.0.0.1:8080/ocsp?key=1", "query"),
    ("http://127.0.0.1:8080/a b", "space"),
    ("http://[::1:8080", "IPv6"),
])
def test_bad_purge_urls_are_refused_naming_the_key(demo: Demo, url: str, says: str):
    message = refused(demo, purge(f'["http://127.0.0.1:8080", "{url}"]'))
    assert "$.purge[0].urls[1]: " in message and says in message, message


@pytest.mark.parametrize("url", ["http://purger:TOPSECRET@127.0.0.1:18099", "https://TOPSECRET@cdn.example",
                                 "http://purger:TOP/SECRET@cdn.example"])
def test_credentials_in_a_purge_url_are_refused_unshown(demo: Demo, url: str):
    message = refused(demo, purge(f'["{url}"]'))
    assert "$.purge[0].urls[0]: " in message and "user:password" in message and "***@" in message, message
    assert "TOP" not in message and "SECRET" not in message and "purger" not in message, message


def test_credentials_in_the_verify_served_url_are_refused_unshown(demo: Demo):
    message = refused(demo, '[verify_served]\nurl = "http://u:TOPSECRET@127.0.0.1:6081/ocsp"\n')
    assert "$.verify_served.url: " in message and "TOPSECRET" not in message, message


@pytest.mark.parametrize(("extra", "store", "key"), [
    ("", 'url = "file:responses"\ntimeout = "PT0S"', "$.store.timeout"),
    ("", 'url = "s3://b/p"\ntimeout = "-PT5S"', "$.store.timeout"),
    (purge('["http://127.0.0.1:8080"]', 'timeout = "PT0S"'), 'url = "file:responses"', "$.purge[0].timeout"),
    ('[[purge]]\nname = "cf"\ntype = "cloudfront"\ndistribution_id = "E1"\ntimeout = "-PT1S"\n',
     'url = "file:responses"', "$.purge[0].timeout"),
    ('[verify_served]\nurl = "http://127.0.0.1:6081"\ntimeout = "PT0S"\n', 'url = "file:responses"', "$.verify_served.timeout"),
])
def test_timeouts_must_be_positive(demo: Demo, extra: str, store: str, key: str):
    message = refused(demo, extra, store)
    assert f"{key}: " in message and "must be > 0" in message, message


def test_a_relative_file_store_keeps_its_other_settings(demo: Demo):
    cfg = load_config(write(demo, "", 'url = "file:responses"\nconcurrency = 8\nretries = 2\ntimeout = "PT5S"'))
    assert cfg.store.url == "file:" + str(demo.root / "responses")
    assert (cfg.store.concurrency, cfg.store.retries, cfg.store.timeout.total_seconds()) == (8, 2, 5)


def test_shown_url_hides_any_user_password():
    assert shown_url("http://u:p@h:1/x") == "http://***@h:1/x"
    assert shown_url("http://u:p/q@h") == "http://***@h"
    assert shown_url("u:p@h") == "***@h"
    assert shown_url("https://h/p") == "https://h/p"


def test_run_with_a_bad_purge_url_stops_before_publishing_one_line_exit_2(demo: Demo):
    """It published, then crashed with InvalidURL on this run and every run after."""
    config = write(demo, purge('["http://127.0.0.1:80x"]'), f'url = "file:responses-{secrets.token_hex(4)}"')
    p = subprocess.run([str(BIN / "ocspmint"), "run", "--quiet", "--config", str(config)], env=demo.env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "$.purge[0].urls[0]" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert p.stdout == ""
