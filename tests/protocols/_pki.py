"""A throw-away PKI for the security tests: a CA and the certificates it issues, made with `cryptography`.

Certificates carry what OPC UA and TLS peers check: an application URI (OPC UA, Part 6, 6.2.2),
``localhost``/``127.0.0.1`` as subject alternative names, key usages for RSA key exchange and both
server and client authentication.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_KEY_BITS = 2048
"""Basic256Sha256 needs RSA keys of 2048 to 4096 bits."""


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, in memory and as PEM files."""

    certificate: x509.Certificate
    key: rsa.RSAPrivateKey
    certificate_path: Path
    key_path: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "CarbonOS tests"),
        ]
    )


def _write(directory: Path, name: str, certificate: x509.Certificate, key: rsa.RSAPrivateKey) -> Issued:
    certificate_path = directory / f"{name}.pem"
    key_path = directory / f"{name}-key.pem"
    certificate_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return Issued(certificate, key, certificate_path, key_path)


def make_ca(directory: Path, name: str) -> Issued:
    """Write a self-signed CA certificate ``<name>.pem`` and its key ``<name>-key.pem``."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=_KEY_BITS)
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _write(directory, name, certificate, key)


def issue(
    directory: Path,
    name: str,
    ca: Issued | None,
    *,
    application_uri: str | None = None,
    not_after: datetime | None = None,
    dns_names: tuple[str, ...] = ("localhost",),
    ip_addresses: tuple[str, ...] = ("127.0.0.1",),
) -> Issued:
    """Write ``<name>.pem`` signed by ``ca`` (self-signed when None) and its key ``<name>-key.pem``."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=_KEY_BITS)
    now = datetime.now(UTC)
    alt_names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
    alt_names.extend(x509.IPAddress(ipaddress.ip_address(address)) for address in ip_addresses)
    if application_uri is not None:
        alt_names.insert(0, x509.UniformResourceIdentifier(application_uri))
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca.certificate.subject if ca is not None else _name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(min(now, not_after or now) - timedelta(days=1))
        .not_valid_after(not_after or now + timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=True,
                key_encipherment=True,
                data_encipherment=True,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if ca is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
    certificate = builder.sign(ca.key if ca is not None else key, hashes.SHA256())
    return _write(directory, name, certificate, key)
