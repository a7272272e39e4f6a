"""The byte template must equal pyca cryptography's OCSPResponseBuilder."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ocspmint import der, encoder
from ocspmint.encoder import ResponseTemplate, Times
from ocspmint.model import Kind, LedgerEntry, Reason, Status
from pki import NOW, make_pki

REASONS = [r for r in Reason if r is not Reason.certificateHold]
HASH = {"sha1": hashes.SHA1(), "sha256": hashes.SHA256()}


@pytest.fixture(scope="module", params=[("ec-p256", True), ("ec-p384", True), ("rsa-2048", False), ("ec-p256", False)])
def setup(request, tmp_path_factory):
    kind, delegated = request.param
    pki = make_pki(tmp_path_factory.mktemp("pki"), ca_kind=kind, responder_kind=kind)
    return pki, delegated


serials = st.one_of(st.integers(1, 255), st.integers(1, (1 << 160) - 1), st.integers(1 << 159, (1 << 160) - 1))
revocations = st.one_of(
    st.none(),
    st.tuples(st.integers(0, 10**8), st.sampled_from(REASONS)),
)


def _entry(serial: int, rev) -> LedgerEntry:
    if rev is None:
        return LedgerEntry("test-ca", serial, Kind.CERTIFICATE, NOW + dt.timedelta(days=90), Status.GOOD)
    ago, reason = rev
    stored = None if reason is Reason.unspecified else reason
    return LedgerEntry("test-ca", serial, Kind.PRECERTIFICATE, NOW + dt.timedelta(days=90), Status.REVOKED,
                       NOW - dt.timedelta(seconds=ago), stored)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(serial=serials, rev=revocations, hash_name=st.sampled_from(["sha1", "sha256"]))
def test_template_bytes_equal_cryptography_builder(setup, serial, rev, hash_name):
    pki, delegated = setup
    identity = pki.identity(delegated)
    entry = _entry(serial, rev)
    this_update = NOW - dt.timedelta(hours=1)
    next_update = this_update + dt.timedelta(days=7) - dt.timedelta(seconds=1)
    status = ocsp.OCSPCertStatus.GOOD if entry.status is Status.GOOD else ocsp.OCSPCertStatus.REVOKED
    reason = _flag(entry.reason)
    builder = ocsp.OCSPResponseBuilder().add_response_by_hash(
        identity.name_hash[hash_name], identity.key_hash[hash_name], serial, HASH[hash_name], status,
        this_update, next_update, entry.revoked_at, reason,
    ).responder_id(ocsp.OCSPResponderEncoding.HASH, identity.signer.cert)
    if delegated:
        builder = builder.certificates([identity.signer.cert])
    key = pki.signing_key(delegated)
    sig_hash = hashes.SHA384() if identity.signer.hash_name == "sha384" else hashes.SHA256()
    ref = builder.sign(key, sig_hash)
    ref_der = ref.public_bytes(serialization.Encoding.DER)

    template = ResponseTemplate(identity, (hash_name,))
    times = Times(ref.produced_at_utc, this_update, next_update)
    tbs = template.tbs(entry, template.time_fields(times))
    assert tbs == ref.tbs_response_bytes
    assert template.response(tbs, ref.signature) == ref_der


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(items=st.lists(st.tuples(serials, revocations, st.integers(0, 2), st.integers(0, 2), st.integers(60, 520)),
                      min_size=1, max_size=60),
       hashes_=st.sampled_from([("sha1",), ("sha256",), ("sha1", "sha256")]))
def test_a_template_reused_over_batches_gives_the_bytes_of_a_fresh_one(setup, monkeypatch, items, hashes_):
    """One template signs a whole run: its cached frames (per length of
    serial, status, signature and per batch times; cleared past FRAMES)
    must give the bytes a template meeting each response first gives (the
    builder test above checks those)."""
    monkeypatch.setattr(encoder, "FRAMES", 3)
    pki, delegated = setup
    identity = pki.identity(delegated)
    shared = ResponseTemplate(identity, hashes_)
    for serial, rev, produced_s, this_update_s, signature_length in items:
        this_update = NOW - dt.timedelta(hours=1, seconds=this_update_s)
        times = Times(NOW + dt.timedelta(seconds=produced_s), this_update, this_update + dt.timedelta(days=7))
        fresh = ResponseTemplate(identity, hashes_)
        entry = _entry(serial, rev)
        tbs = shared.tbs(entry, shared.time_fields(times))
        assert tbs == fresh.tbs(entry, fresh.time_fields(times))
        signature = bytes(range(256)) * 2
        assert shared.response(tbs, signature[:signature_length]) == fresh.response(tbs, signature[:signature_length])


def _flag(reason: Reason | None):
    names = {
        Reason.keyCompromise: x509.ReasonFlags.key_compromise,
        Reason.cACompromise: x509.ReasonFlags.ca_compromise,
        Reason.affiliationChanged: x509.ReasonFlags.affiliation_changed,
        Reason.superseded: x509.ReasonFlags.superseded,
        Reason.cessationOfOperation: x509.ReasonFlags.cessation_of_operation,
        Reason.removeFromCRL: x509.ReasonFlags.remove_from_crl,
        Reason.privilegeWithdrawn: x509.ReasonFlags.privilege_withdrawn,
        Reason.aACompromise: x509.ReasonFlags.aa_compromise,
    }
    return None if reason is None else names[reason]


def test_two_certid_hashes_give_two_single_responses(tmp_path):
    pki = make_pki(tmp_path)
    identity = pki.identity()
    template = ResponseTemplate(identity, ("sha1", "sha256"))
    entry = _entry(0x80, None)
    times = Times(NOW, NOW - dt.timedelta(hours=1), NOW + dt.timedelta(days=6))
    tbs = template.tbs(entry, template.time_fields(times))
    sig = pki.responder_key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    resp = ocsp.load_der_ocsp_response(template.response(tbs, sig))
    singles = list(resp.responses)
    assert [type(s.hash_algorithm).__name__ for s in singles] == ["SHA1", "SHA256"]
    assert {s.serial_number for s in singles} == {0x80}
    assert singles[1].issuer_key_hash == identity.key_hash["sha256"]


def test_times_must_be_whole_second_utc(tmp_path):
    template = ResponseTemplate(make_pki(tmp_path).identity(), ("sha1",))
    with pytest.raises(ValueError, match="fractional"):
        template.time_fields(Times(NOW, (NOW - dt.timedelta(hours=1)).replace(microsecond=5), NOW + dt.timedelta(days=1)))
    with pytest.raises(ValueError, match="aware UTC"):
        template.time_fields(Times(NOW, NOW.replace(tzinfo=None), NOW + dt.timedelta(days=1)))
    with pytest.raises(ValueError, match="producedAt"):
        template.time_fields(Times(NOW, NOW + dt.timedelta(seconds=1), NOW + dt.timedelta(days=1)))


def test_certificate_hold_is_refused():
    e = LedgerEntry("x", 5, Kind.CERTIFICATE, NOW, Status.REVOKED, NOW, Reason.certificateHold)
    with pytest.raises(ValueError, match="certificateHold"):
        encoder.cert_status(e)


def test_error_responses_are_the_rfc_bytes():
    assert encoder.UNAUTHORIZED == bytes([0x30, 0x03, 0x0A, 0x01, 0x06])
    assert encoder.MALFORMED_REQUEST == bytes([0x30, 0x03, 0x0A, 0x01, 0x01])
    assert ocsp.load_der_ocsp_response(encoder.UNAUTHORIZED).response_status is ocsp.OCSPResponseStatus.UNAUTHORIZED


def test_ecdsa_raw_to_der_round_trip():
    key = ec.generate_private_key(ec.SECP256R1())
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    sig = key.sign(b"x", ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(sig)
    raw = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    assert encoder.ecdsa_signature(raw) == sig


@pytest.mark.parametrize("n", [0, 1, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000, 0x123456])
def test_tlv_length_forms_round_trip(n):
    """Each DER length form (short, 81, 82, longer) at its edges parses back to the same content."""
    content = bytes(range(256)) * (n // 256) + bytes(n % 256)
    blob = der.tlv(0x04, content) + b"tail"
    tag, start, end = der.read_tlv(blob)
    assert (tag, blob[start:end], blob[end:]) == (0x04, content, b"tail")
    assert start == 2 + (0 if n < 0x80 else (n.bit_length() + 7) // 8)
