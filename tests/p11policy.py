"""Run as ``python tests/p11policy.py`` (JSON request on stdin, SPKI hex
out): generate a P-256 key pair in a SoftHSM2 token whose private key's
CKA_ALLOWED_MECHANISMS lists only the mechanisms named in the request, as
an HSM key policy would. python-pkcs11 has no packer for that attribute
(a CK_MECHANISM_TYPE array), so one is registered here. A child process:
C_Initialize reads SOFTHSM2_CONF once per process."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pkcs11
import pkcs11.attributes
from pkcs11 import Attribute, KeyType, Mechanism
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters


def main() -> None:
    req = json.loads(sys.stdin.read())
    pkcs11.attributes.ATTRIBUTE_TYPES[Attribute.ALLOWED_MECHANISMS] = (
        lambda mechs: b"".join(struct.pack("=Q", int(m)) for m in mechs),
        lambda raw: [Mechanism(v) for (v,) in struct.iter_unpack("=Q", raw)])
    token = pkcs11.lib(req["module"]).get_token(token_label=req["token"])
    with token.open(rw=True, user_pin=Path(req["pin_file"]).read_text().strip()) as s:
        params = s.create_domain_parameters(
            KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True)
        pub, priv = params.generate_keypair(store=True, label=req["label"], id=req["label"].encode(), private_template={
            Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.PRIVATE: True, Attribute.SIGN: True,
            Attribute.TOKEN: True, Attribute.ALLOWED_MECHANISMS: [Mechanism[m] for m in req["allowed"]]})
        assert priv[Attribute.ALLOWED_MECHANISMS] == [Mechanism[m] for m in req["allowed"]]
        sys.stdout.write(encode_ec_public_key(pub).hex())


if __name__ == "__main__":
    main()
