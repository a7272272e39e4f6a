"""A certificate-folder source uses only CRLs that are current (RFC 5280
§6.3.3 (a)): a CRL past its nextUpdate may miss later revocations, and every
serial it does not list would be answered `good`. Such a CRL, or one without
nextUpdate (RFC 5280 §5.1.2.5, BR 7.2), makes the source unusable: a
LedgerError naming the CRL file and its nextUpdate, as for a CRL no
configured issuer signed. CRLs come from `openssl ca -gencrl` on the demo CA.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from e2e import ocspmint, openssl_check, response_path, run_json
from ocspmint.config import Source, load_config
from ocspmint.demo import Demo, build_demo, issue, revoke
from ocspmint.der import read_tlv, tlv
from ocspmint.issuer import IssuerIdentity, load_issuers
from ocspmint.ledger import read_source
from ocspmint.ledger.tail import Tail
from ocspmint.model import LedgerEntry, LedgerError, Status, utc_now

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    return build_demo(tmp_path_factory.mktemp("crl"), certs=3, precerts=1, revoke=1)


@pytest.fixture(scope="module")
def issuers(ca: Demo) -> dict[str, IssuerIdentity]:
    return load_issuers(load_config(ca.config))


def gencrl(ca: Demo, out: Path, *extra: str) -> x509.CertificateRevocationList:
    """`openssl ca -gencrl` (a new file renamed over ``out``, as a CA publishes it)."""
    tmp = out.with_suffix(".new")
    subprocess.run(["openssl", "ca", "-config", str(ca.openssl_cnf), "-gencrl", "-out", str(tmp), *extra],
                   cwd=ca.openssl_cnf.parent, check=True, capture_output=True)
    os.replace(tmp, out)
    return x509.load_pem_x509_crl(out.read_bytes())


def folder(ca: Demo, tmp_path: Path) -> Path:
    certs = tmp_path / "certs"
    shutil.copytree(ca.certs_dir, certs)
    return certs


def stamp(t: dt.datetime) -> str:
    return f"{t:%Y-%m-%dT%H:%M:%SZ}"


def wait_past(t: dt.datetime) -> None:
    """Sleep until the whole-second UTC clock reads later than ``t``."""
    while utc_now() <= t:
        time.sleep(0.2)


def test_crl_past_its_next_update_makes_the_source_unusable(ca: Demo, issuers: dict[str, IssuerIdentity],
                                                           tmp_path: Path) -> None:
    certs, crl = folder(ca, tmp_path), tmp_path / "ca.crl"
    source = Source(type="certdir", path=str(certs), crls=[str(crl)])
    stale = gencrl(ca, crl, "-crlsec", "1")  # the review's reproduction: due again one second later
    wait_past(stale.next_update_utc)
    with pytest.raises(LedgerError) as raised:
        list(read_source(source, issuers))
    assert raised.value.source == str(crl)
    assert "not current" in raised.value.message and stamp(stale.next_update_utc) in raised.value.message

    gencrl(ca, crl)  # a fresh CRL (default_crl_days = 7): the same folder reads fine
    items = list(read_source(source, issuers))
    assert all(isinstance(i, LedgerEntry) for i in items), items
    status = {i.serial: i.status for i in items if isinstance(i, LedgerEntry)}
    assert {s for s, st in status.items() if st is Status.REVOKED} == set(ca.revoked)
    assert set(ca.serials["good"]) <= {s for s, st in status.items() if st is Status.GOOD}


def without_next_update(crl: x509.CertificateRevocationList, key_pem: bytes) -> bytes:
    """``crl`` re-signed by the CA key with the nextUpdate field left out of
    TBSCertList (version, signature, issuer, thisUpdate, [nextUpdate], ...)."""
    der = crl.public_bytes(serialization.Encoding.DER)
    _, start, _ = read_tlv(der)
    _, tbs_start, tbs_end = read_tlv(der, start)
    fields, pos = [], tbs_start
    while pos < tbs_end:
        tag, _, end = read_tlv(der, pos)
        fields.append((tag, der[pos:end]))
        pos = end
    assert [t for t, _ in fields[:5]] == [0x02, 0x30, 0x30, 0x17, 0x17], "version, sig alg, issuer, two UTCTimes"
    tbs = tlv(0x30, b"".join(f for i, (_, f) in enumerate(fields) if i != 4))
    key = serialization.load_pem_private_key(key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    signature = key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    alg = fields[1][1]
    return tlv(0x30, tbs + alg + tlv(0x03, b"\x00" + signature))


def test_crl_without_next_update_is_refused(ca: Demo, issuers: dict[str, IssuerIdentity], tmp_path: Path) -> None:
    certs, crl = folder(ca, tmp_path), tmp_path / "ca.crl"
    crl.write_bytes(without_next_update(gencrl(ca, crl), ca.issuing_key.read_bytes()))
    parsed = x509.load_der_x509_crl(crl.read_bytes())
    issuing_ca = x509.load_pem_x509_certificate(ca.issuing_ca.read_bytes())
    assert parsed.next_update_utc is None and parsed.is_signature_valid(issuing_ca.public_key())  # type: ignore[arg-type]
    with pytest.raises(LedgerError, match="CRL has no nextUpdate") as raised:
        list(read_source(Source(type="certdir", path=str(certs), crls=[str(crl)]), issuers))
    assert raised.value.source == str(crl)


def test_tail_raises_once_an_unchanged_crl_goes_stale_and_recovers_with_a_fresh_one(
        ca: Demo, issuers: dict[str, IssuerIdentity], tmp_path: Path) -> None:
    certs, crl = folder(ca, tmp_path), tmp_path / "ca.crl"
    source = Source(type="certdir", path=str(certs), crls=[str(crl)])
    short = gencrl(ca, crl, "-crlsec", "4")
    tail = Tail(source, issuers)
    tail.start()  # well within the CRL's 4 s
    assert list(tail.changes()) == []
    wait_past(short.next_update_utc)  # nothing on disk changes, only the clock
    with pytest.raises(LedgerError) as raised:
        list(tail.changes())
    assert raised.value.source == str(crl) and stamp(short.next_update_utc) in raised.value.message
    new = issue(ca)  # issued meanwhile: held back while the CRL is stale, not lost
    shutil.copy(ca.cert_path(new), certs / "new.pem")
    with pytest.raises(LedgerError, match="not current"):
        list(tail.changes())
    gencrl(ca, crl)  # the CA publishes a fresh CRL
    (change,) = tail.changes()
    assert isinstance(change.item, LedgerEntry) and change.item.serial == new
    assert list(tail.changes()) == []


def test_stale_crl_missing_a_later_revocation_is_not_published_good(tmp_path: Path) -> None:
    """The harm end to end: a CRL made before a revocation, already past its
    nextUpdate, does not list the serial; `ocspmint run` must not publish it
    good. With a fresh CRL the run publishes it revoked."""
    demo = build_demo(tmp_path, certs=3, precerts=1, revoke=0)
    crl = demo.root / "ca" / "issuing-ca.crl"
    now = utc_now()
    stale = gencrl(demo, crl, "-crl_lastupdate", f"{now - dt.timedelta(days=8):%Y%m%d%H%M%SZ}",
                   "-crl_nextupdate", f"{now - dt.timedelta(days=1):%Y%m%d%H%M%SZ}")
    victim = demo.serials["good"][0]
    revoke(demo, victim, "keyCompromise")  # after the CRL: the stale CRL does not list it
    head = demo.config.read_text().partition("[[sources]]")[0]
    demo.config.write_text(head + f'[[sources]]\ntype = "certdir"\npath = "{demo.certs_dir}"\ncrls = ["{crl}"]\n')

    code, summary = run_json(demo)
    assert code == 1 and summary["published"] == 0, summary
    [failure] = summary["failures"]
    assert failure["stage"] == "ledger" and failure["source"] == str(crl)
    assert "not current" in failure["message"] and stamp(stale.next_update_utc) in failure["message"]
    assert not response_path(demo, victim).exists()

    gencrl(demo, crl)
    p = ocspmint(demo, "run", "--quiet")
    assert p.returncode == 0, p.stdout + p.stderr
    assert openssl_check(demo, response_path(demo, victim), victim).status == "revoked"
