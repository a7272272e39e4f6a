"""Precertificates signed by a Precertificate Signing Certificate (RFC 6962
§3.1, BR 7.1.2.4), read from a certdir source or the `openssl ca` database
of the Precertificate Signing Certificate: the CA's serials, answered
with the CA's CertID (`[[issuers]] precert_signing_certificates`,
issuer.py, ledger/certdir.py, ledger/openssl_index.py). Before, such a precertificate was an error
row and its serial got no OCSP response at all (MRSP §5.4, BR 4.9.9 want
one for every precertificate).

The CA, its token and config come from ocspmint.demo; the Precertificate
Signing Certificate, its precertificates and the CA's final certificates
are made with `openssl`, and responses are checked with `openssl ocsp`."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from pathlib import Path

import pytest

from e2e import ocspmint, openssl_check, response_path, run_json
from ocspmint.config import Source, load_config
from ocspmint.demo import Demo, build_demo
from ocspmint.issuer import load_issuers
from ocspmint.ledger import read_source
from ocspmint.model import Kind, LedgerEntry, LedgerError

# The profile of a Precertificate Signing Certificate (BR 7.1.2.4), and
# the faults the start-up check refuses.
PSC_EXT = """\
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
extendedKeyUsage = 1.3.6.1.4.1.11129.2.4.4
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
"""
BAD_PSC = {
    "no EKU": (PSC_EXT.replace("extendedKeyUsage = 1.3.6.1.4.1.11129.2.4.4\n", ""),
               "lacks EKU 1.3.6.1.4.1.11129.2.4.4 (RFC 6962 §3.1)"),
    "another EKU too": (PSC_EXT.replace("2.4.4\n", "2.4.4, serverAuth\n"), "has EKU serverAuth besides"),
    "not a CA": (PSC_EXT.replace("CA:TRUE, pathlen:0", "CA:FALSE"), "is not a CA certificate"),
    "issued by the root": (PSC_EXT, "is not issued directly by its issuer"),
}
_NOW = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
START = (_NOW - dt.timedelta(days=1)).strftime("%Y%m%d%H%M%SZ")
END = (_NOW + dt.timedelta(days=60)).strftime("%Y%m%d%H%M%SZ")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    return build_demo(tmp_path_factory.mktemp("psc"), certs=1, precerts=0, revoke=0)


def _openssl(*args: str, env: dict[str, str] | None = None) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, env=env)


def make_psc(demo: Demo, folder: Path, ext: str = PSC_EXT, by_root: bool = False) -> tuple[Path, Path]:
    """A Precertificate Signing Certificate with extensions ``ext``, issued
    by the demo's issuing CA (or its root) with `openssl x509 -req` →
    (certificate, key)."""
    folder.mkdir(parents=True, exist_ok=True)
    key, csr, cert, extfile = (folder / n for n in ("psc.key", "psc.csr", "psc.pem", "psc.ext"))
    extfile.write_text("[psc]\n" + ext)
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(key))
    _openssl("req", "-config", str(demo.openssl_cnf), "-new", "-key", str(key),
             "-subj", "/C=XX/O=ocspmint demo/CN=ocspmint Demo Precertificate Signing CA", "-out", str(csr))
    ca, ca_key = (demo.root_ca, demo.root / "ca" / "root.key") if by_root else (demo.issuing_ca, demo.issuing_key)
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-set_serial", "0x7e57",
             "-days", "365", "-sha256", "-extfile", str(extfile), "-extensions", "psc", "-out", str(cert))
    return cert, key


def sign_leaf(demo: Demo, out: Path, ca: Path, ca_key: Path, serial: int, profile: str,
              dates: tuple[str, str] = (START, END)) -> Path:
    """A leaf with ``serial`` and ``dates`` from the demo's leaf.ext profile
    ``profile`` ("precert": critical CT poison; "leaf"), signed by ``ca``
    with `openssl ca` in a database of its own (the demo's index stays as
    it is) → ``out``."""
    db = out.parent.parent / "openssl-ca" / out.stem  # outside the certificate folder
    (db / "newcerts").mkdir(parents=True)
    (db / "index.txt").write_text("")
    (db / "index.txt.attr").write_text("unique_subject = no\n")
    (db / "serial").write_text(f"{serial:X}".zfill(len(f"{serial:X}") + len(f"{serial:X}") % 2) + "\n")
    cnf = db / "openssl.cnf"
    cnf.write_text("\n".join(f"dir = {db}" if line.startswith("dir = ") else line
                             for line in demo.openssl_cnf.read_text().splitlines()))
    dns = f"{profile}-{serial:x}.example"
    _openssl("ca", "-config", str(cnf), "-batch", "-notext", "-in", str(demo.leaf_csr), "-cert", str(ca),
             "-keyfile", str(ca_key), "-subj", f"/CN={dns}", "-extfile", str(demo.leaf_ext), "-extensions", profile,
             "-startdate", dates[0], "-enddate", dates[1], "-out", str(out),
             env={**os.environ, "OCSPMINT_DEMO_SAN": dns})
    return out


def config_with(demo: Demo, name: str, psc: Path | None, certs: Path) -> Path:
    """The demo config with its own state and store (``name``), the
    Precertificate Signing Certificate ``psc`` listed for the issuing CA
    (None: the setting left out) and a certdir source ``certs``."""
    text = demo.config.read_text()
    text = text.replace('state_dir = "state"', f'state_dir = "state-{name}"')
    text = text.replace('url = "file:responses"', f'url = "file:responses-{name}"')
    if psc is not None:
        old = 'cert = "ca/issuing-ca.pem"\n'
        assert old in text
        text = text.replace(old, f'{old}precert_signing_certificates = ["{psc}"]\n')
    path = demo.root / f"{name}.toml"
    path.write_text(text + f'\n[[sources]]\ntype = "certdir"\npath = "{certs}"\n')
    return path


def read(config: Path, certs: Path) -> tuple[dict[int, LedgerEntry], list[LedgerError]]:
    issuers = load_issuers(load_config(config))
    items = list(read_source(Source(type="certdir", path=str(certs)), issuers))
    return ({i.serial: i for i in items if isinstance(i, LedgerEntry)}, [i for i in items if isinstance(i, LedgerError)])


def test_a_precertificate_the_psc_signed_is_answered_good_with_the_cas_certid(demo: Demo, tmp_path: Path) -> None:
    """`ocspmint run` publishes a response for the precertificate's serial
    that `openssl ocsp`, asked with the issuing CA as issuer, verifies and
    reads as good. Before, the serial was an error row and got nothing."""
    psc, psc_key = make_psc(demo, tmp_path / "psc")
    certs = tmp_path / "certs"
    certs.mkdir()
    serial = 0x5EC0_0000_0000_0000_0001
    sign_leaf(demo, certs / "pre.pem", psc, psc_key, serial, "precert")
    code, summary = run_json(demo, config=config_with(demo, "run", psc, certs))
    assert code == 0, summary
    path = response_path(demo, serial, store="responses-run")
    assert path.is_file(), summary
    view = openssl_check(demo, path, serial)
    assert (view.verified, view.status) == (True, "good"), view.text


def test_the_psc_precertificate_pairs_with_the_cas_final_certificate(demo: Demo, tmp_path: Path) -> None:
    """The precertificate (signed by the Precertificate Signing Certificate)
    and the final certificate the CA issued with its serial are one entry of
    the CA, kind certificate; with other notAfter they are one error row
    naming both files, as for a pair the CA signed both of. Without the
    setting the precertificate is an error row naming its file, as before."""
    psc, psc_key = make_psc(demo, tmp_path / "psc")
    certs = tmp_path / "certs"
    certs.mkdir()
    paired, alone, disagree = 0x5EC1, 0x5EC2, 0x5EC3
    sign_leaf(demo, certs / "paired-pre.pem", psc, psc_key, paired, "precert")
    sign_leaf(demo, certs / "paired-final.pem", demo.issuing_ca, demo.issuing_key, paired, "leaf")
    sign_leaf(demo, certs / "alone-pre.pem", psc, psc_key, alone, "precert")
    sign_leaf(demo, certs / "disagree-pre.pem", psc, psc_key, disagree, "precert")
    sign_leaf(demo, certs / "disagree-final.pem", demo.issuing_ca, demo.issuing_key, disagree, "leaf",
              dates=(START, (_NOW + dt.timedelta(days=61)).strftime("%Y%m%d%H%M%SZ")))

    entries, errors = read(config_with(demo, "pair", psc, certs), certs)
    assert {s: (e.issuer, e.kind) for s, e in entries.items()} == {
        paired: ("issuing-ca", Kind.CERTIFICATE), alone: ("issuing-ca", Kind.PRECERTIFICATE)}
    assert [e.key for e in errors] == [("issuing-ca", disagree)], errors
    assert "disagree on notBefore/notAfter" in errors[0].message
    assert str(certs / "disagree-pre.pem") in errors[0].message and str(certs / "disagree-final.pem") in errors[0].message

    entries, errors = read(config_with(demo, "pair-unset", None, certs), certs)
    assert set(entries) == {paired, disagree}  # the CA's final certificates only
    refused = {Path(e.source).name: e.message for e in errors}
    assert set(refused) == {"paired-pre.pem", "alone-pre.pem", "disagree-pre.pem"}, refused
    assert all("is not a configured issuer" in m for m in refused.values()), refused


def test_a_certificate_without_ct_poison_signed_by_the_psc_is_an_error_row(demo: Demo, tmp_path: Path) -> None:
    """Such a CA signs only precertificates (RFC 6962 §3.1, BR 7.1.2.4): a
    final certificate it signed is an error row naming the file, and `run`
    fails on it (exit 1)."""
    psc, psc_key = make_psc(demo, tmp_path / "psc")
    certs = tmp_path / "certs"
    certs.mkdir()
    wrong = sign_leaf(demo, certs / "final-by-psc.pem", psc, psc_key, 0x5EC4, "leaf")
    config = config_with(demo, "final", psc, certs)
    entries, errors = read(config, certs)
    assert not entries
    assert [e.source for e in errors] == [str(wrong)]
    assert "has no CT poison extension but is signed by Precertificate Signing Certificate" in errors[0].message
    code, summary = run_json(demo, config=config)
    assert code == 1, summary
    assert [f["source"] for f in summary["failures"]] == [str(wrong)], summary["failures"]


@pytest.mark.parametrize("fault", list(BAD_PSC))
def test_a_bad_precertificate_signing_certificate_is_refused_at_start(demo: Demo, tmp_path: Path, fault: str) -> None:
    """Exit 2, one line naming the file and the rule; nothing is signed."""
    ext, rule = BAD_PSC[fault]
    psc, _ = make_psc(demo, tmp_path / "psc", ext, by_root=fault == "issued by the root")
    certs = tmp_path / "certs"
    certs.mkdir()
    name = f"bad-{fault.replace(' ', '-')}"
    p = ocspmint(demo, "run", config=config_with(demo, name, psc, certs))
    assert p.returncode == 2, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    assert "Traceback" not in p.stderr
    assert f"{psc}: Precertificate Signing Certificate " in p.stderr and rule in p.stderr, p.stderr
    assert not (demo.root / f"responses-{name}").exists()


def index_config(demo: Demo, name: str, psc: Path | None, index: Path) -> Path:
    """``config_with``, the source an `openssl ca` database (``index``,
    its newcerts beside it) of the issuing CA instead of a certdir."""
    path = config_with(demo, name, psc, index.parent / "newcerts")
    head, _, _ = path.read_text().rpartition("[[sources]]")
    path.write_text(head + f'[[sources]]\ntype = "openssl-index"\npath = "{index}"\ncerts_dir = "{index.parent / "newcerts"}"\n'
                           'issuer = "issuing-ca"\n')
    return path


def test_an_openssl_ca_database_of_the_psc_is_read_as_the_cas(demo: Demo, tmp_path: Path) -> None:
    """`openssl ca -cert psc.pem` keeps an index.txt whose certificates the
    Precertificate Signing Certificate signed: configured as the CA's
    `openssl-index` source, its precertificate is an entry of the CA and
    is answered good; a certificate without the CT poison there is an error
    row naming the file. Before, each was an error row (`is issued by
    ... not by issuer`): the index reader knew the CA's key only."""
    psc, psc_key = make_psc(demo, tmp_path / "psc")
    (tmp_path / "out").mkdir()
    pre = sign_leaf(demo, tmp_path / "out" / "pre.pem", psc, psc_key, 0x5EC5, "precert")
    index = pre.parent.parent / "openssl-ca" / "pre" / "index.txt"
    config = index_config(demo, "index", psc, index)
    issuers = load_issuers(load_config(config))
    source = load_config(config).sources[-1]
    (entry,) = list(read_source(source, issuers))
    assert isinstance(entry, LedgerEntry), entry
    assert (entry.issuer, entry.serial, entry.kind) == ("issuing-ca", 0x5EC5, Kind.PRECERTIFICATE)
    code, summary = run_json(demo, config=config)
    assert code == 0, summary
    view = openssl_check(demo, response_path(demo, 0x5EC5, store="responses-index"), 0x5EC5)
    assert (view.verified, view.status) == (True, "good"), view.text

    (unset,) = list(read_source(source, load_issuers(load_config(index_config(demo, "index-unset", None, index)))))
    assert isinstance(unset, LedgerError) and "not by issuer 'issuing-ca'" in unset.message, unset

    final = sign_leaf(demo, tmp_path / "out" / "final.pem", psc, psc_key, 0x5EC6, "leaf")
    wrong = index_config(demo, "index-final", psc, final.parent.parent / "openssl-ca" / "final" / "index.txt")
    (error,) = list(read_source(load_config(wrong).sources[-1], issuers))
    assert isinstance(error, LedgerError), error
    assert "has no CT poison extension but is signed by Precertificate Signing Certificate" in error.message
    assert "5EC6.pem" in error.message
