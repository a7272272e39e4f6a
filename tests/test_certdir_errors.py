"""The certdir reader (ledger/certdir.py) on certificates `openssl ca` made
for a real demo CA: folder entries that cannot be examined, symlinked
folders, PEM blocks without END, and error rows that name their serial."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from e2e import ocspmint, response_path, run_json
from ocspmint.config import Source, load_config
from ocspmint.demo import Demo, build_demo, revoke
from ocspmint.issuer import load_issuers
from ocspmint.ledger import read_source
from ocspmint.model import LedgerEntry, LedgerError


def read(demo: Demo, folder: Path, *crls: Path) -> tuple[dict[int, LedgerEntry], list[LedgerError]]:
    issuers = load_issuers(load_config(demo.config))
    items = list(read_source(Source(type="certdir", path=str(folder), crls=[str(c) for c in crls]), issuers))
    return ({i.serial: i for i in items if isinstance(i, LedgerEntry)}, [i for i in items if isinstance(i, LedgerError)])


def all_serials(demo: Demo) -> set[int]:
    return {s for tag in ("good", "revoked", "precert", "expired") for s in demo.serials[tag]}


def test_an_entry_that_cannot_be_examined_and_a_symlinked_folder_are_error_rows_and_the_rest_is_read(
        tmp_path: Path) -> None:
    """Before: a symlink loop ended the listing of its folder (the files
    after it in directory order were never read, and the error said the
    folder could not be listed), and a symlinked folder was skipped without
    a word: certificates silently missing from the ledger."""
    demo = build_demo(tmp_path / "demo", certs=6, precerts=2, revoke=0)
    certs = tmp_path / "certs"
    shutil.copytree(demo.certs_dir, certs)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    moved = demo.serials["good"][0]
    shutil.move(certs / demo.cert_path(moved).name, elsewhere / "moved.pem")
    os.symlink(elsewhere, certs / "linked")
    for name in ("loop.pem", "0-loop", "zz-loop.crt"):  # wherever the directory order puts them
        os.symlink(name, certs / name)
    entries, errors = read(demo, certs)
    assert set(entries) == all_serials(demo) - {moved}
    why = {Path(e.source).name: e.message for e in errors}
    assert set(why) == {"loop.pem", "0-loop", "zz-loop.crt", "linked"}, why
    assert all(why[n] == "cannot tell whether it is a folder or a file: Too many levels of symbolic links"
               for n in ("loop.pem", "0-loop", "zz-loop.crt"))
    assert why["linked"].startswith("symlinked folder, not followed")
    assert all(e.key is None for e in errors)


def _second_certificate(demo: Demo, serial: int, out: Path) -> None:
    """Another certificate under ``serial``, signed by the issuing CA (`openssl x509`)."""
    subprocess.run(["openssl", "x509", "-req", "-in", str(demo.leaf_csr), "-CA", str(demo.issuing_ca), "-CAkey",
                    str(demo.issuing_key), "-set_serial", str(serial), "-days", "30", "-out", str(out)],
                   check=True, capture_output=True)


def test_revocation_error_rows_name_their_serial(tmp_path: Path) -> None:
    """Before: certdir revocation errors (a CRL entry with a refused reason,
    a CRL revoking a serial the folder lacks, two certificates sharing a
    serial) carried no LedgerError.key, unlike the index reader's."""
    demo = build_demo(tmp_path / "demo", certs=4, precerts=0, revoke=0)
    twice, held, absent = demo.serials["good"][:3]
    revoke(demo, held, "certificateHold")
    revoke(demo, absent, "keyCompromise")
    crl = tmp_path / "crl.pem"
    subprocess.run(["openssl", "ca", "-config", str(demo.openssl_cnf), "-gencrl", "-out", str(crl)],
                   cwd=demo.openssl_cnf.parent, check=True, capture_output=True)
    certs = tmp_path / "certs"
    shutil.copytree(demo.certs_dir, certs)
    (certs / demo.cert_path(absent).name).unlink()
    _second_certificate(demo, twice, certs / "again.pem")
    entries, errors = read(demo, certs, crl)
    assert {twice, held, absent}.isdisjoint(entries)
    keyed = {e.key: e.message for e in errors}
    assert set(keyed) == {("issuing-ca", twice), ("issuing-ca", held), ("issuing-ca", absent)}, keyed
    assert "different certificates share serial" in keyed[("issuing-ca", twice)]
    assert "certificateHold is forbidden" in keyed[("issuing-ca", held)]
    assert "no certificate with that serial is in" in keyed[("issuing-ca", absent)]


def test_a_serial_a_crl_puts_on_hold_is_not_published_good_from_another_source(tmp_path: Path) -> None:
    """Sources: the index (serial good) and the certificate folder whose CRL
    puts it on hold (an error row, BR 4.9.13). Before, that error named no
    serial, so the index's `good` was published although the CA's own CRL
    says the certificate is suspended."""
    demo = build_demo(tmp_path / "demo", certs=3, precerts=0, revoke=0)
    held = demo.serials["good"][0]
    index = demo.index.read_text()
    revoke(demo, held, "certificateHold")
    crl = demo.root / "crl.pem"
    subprocess.run(["openssl", "ca", "-config", str(demo.openssl_cnf), "-gencrl", "-out", str(crl)],
                   cwd=demo.openssl_cnf.parent, check=True, capture_output=True)
    demo.index.write_text(index)  # the index never heard of the hold
    text = demo.config.read_text()
    demo.config.write_text('on_error = "quarantine"\n' + text + '\n[[sources]]\ntype = "certdir"\n'
                           f'path = "ca/newcerts"\ncrls = ["{crl}"]\n')
    code, summary = run_json(demo)
    assert code == 1, summary
    assert not response_path(demo, held).exists(), "published good for a serial the CRL puts on hold"
    assert any("certificateHold" in f["message"] and int(f["serial"], 16) == held for f in summary["failures"])
    assert summary["published"] == 3 - 1 + 0  # the other two good ones (the expired one is not signed)
    # the hold is a ledger row in error naming a serial no response exists for: verify fails on it as run does
    verify = ocspmint(demo, "verify")
    assert verify.returncode == 1 and f"serial {held:040x}: no response for it was checked" in verify.stdout, verify.stdout


def test_a_pem_block_without_its_end_line_does_not_swallow_the_next_certificate(tmp_path: Path) -> None:
    """A bundle whose first block lost its END line: before, the block
    ran on to the next block's END, the whole was one error row, and the
    complete certificate after it was never read and named nowhere (a
    serial missing from the ledger without a word)."""
    demo = build_demo(tmp_path / "demo", certs=3, precerts=0, revoke=0)
    first, second, third = demo.serials["good"][:3]
    certs = tmp_path / "certs"
    certs.mkdir()
    broken = demo.cert_path(first).read_bytes().replace(b"-----END CERTIFICATE-----", b"")
    (certs / "bundle.pem").write_bytes(broken + demo.cert_path(second).read_bytes() + demo.cert_path(third).read_bytes())
    entries, errors = read(demo, certs)
    assert set(entries) == {second, third}
    assert [(Path(e.source).name, e.message) for e in errors] == [("bundle.pem:1", "PEM CERTIFICATE block without its "
                                                                                   "END line")]
