"""ocspmint: pre-generated, PKCS#11-signed, verified OCSP responses."""

__version__ = "0.1.0"
