"""Self-signed OPC UA application certificates for tests, made with asyncua's generator.

Each certificate carries the application URI and ``localhost``/``127.0.0.1`` in its subject
alternative names, as OPC UA applications expect (Part 6, 6.2.2).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path

from asyncua.crypto.cert_gen import (
    dump_private_key_as_pem,
    generate_private_key,
    generate_self_signed_app_certificate,
)
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID


@dataclass(frozen=True)
class CertPair:
    """Paths of a PEM certificate and its PEM private key."""

    certificate: Path
    private_key: Path
    application_uri: str


def make_cert_pair(directory: Path, name: str, application_uri: str) -> CertPair:
    """Write ``<name>.pem`` and ``<name>-key.pem`` into ``directory`` and return their paths."""
    key = generate_private_key()
    cert = generate_self_signed_app_certificate(
        key,
        name,
        {"organizationName": "CarbonOS tests"},
        [
            x509.UniformResourceIdentifier(application_uri),
            x509.DNSName("localhost"),
            x509.DNSName(socket.gethostname()),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ],
        extended=[ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH],
        days=2,
    )
    cert_path = directory / f"{name}.pem"
    key_path = directory / f"{name}-key.pem"
    cert_path.write_bytes(cert.public_bytes(Encoding.PEM))
    key_path.write_bytes(dump_private_key_as_pem(key))
    return CertPair(cert_path, key_path, application_uri)
