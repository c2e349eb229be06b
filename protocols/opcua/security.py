"""Who the OPC UA driver trusts, and when it lets a password leave the process.

Server trust
------------
Before the driver opens a secure channel it has the server's certificate from GetEndpoints. That
certificate is accepted when

- it *is* one of the certificates of the trust list (a self-signed application certificate, copied
  from the server), or
- a certificate authority of the trust list issued it (directly or through intermediates the
  server sent with its certificate): signature, validity period and path checked by
  ``cryptography``'s X.509 verifier;

and, for both, it is inside its validity period now (wall-clock time, never a simulated clock).
Otherwise the connection is refused with :class:`SecurityRefused`:
``server certificate not trusted: CN=plc-7,O=Acme, sha256 3F:A2:...: not in the trust list``.

The trust list is read again at every connect (off the event loop), so a certificate copied into
the trust directory counts from the next reconnect. Revocation lists are not checked.

Passwords
---------
A UserNameIdentityToken carries the password in clear unless the channel encrypts
(SignAndEncrypt) or the server's user token policy names a security policy to encrypt the token
with. :func:`password_is_protected` decides; the driver refuses to send an unprotected password
unless the device config says ``allow_plaintext_password: true``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from asyncua import ua
from asyncua.crypto import security_policies
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import verification

from scada.model import DeviceUnavailable

__all__ = [
    "TRUST_FILE_SUFFIXES",
    "SecurityRefused",
    "TrustList",
    "describe_certificate",
    "password_is_protected",
    "sha256_fingerprint",
    "split_der_chain",
]

TRUST_FILE_SUFFIXES: Final = frozenset({".pem", ".der", ".crt", ".cer"})
"""Files of a trust directory that are read; anything else (READMEs, CRLs, keys) is skipped."""
_MAX_CHAIN_DEPTH: Final = 8


class SecurityRefused(DeviceUnavailable):
    """The connection was refused for a security reason: untrusted server, identity, plaintext password.

    A :class:`DeviceUnavailable`, so the device's session goes offline and tries again with backoff
    (an operator may fix the trust list or the password in the meantime).
    """


def sha256_fingerprint(der: bytes) -> str:
    """Return the SHA-256 fingerprint of a DER certificate as colon-separated hex pairs.

    >>> sha256_fingerprint(b"")[:11]
    'E3:B0:C4:42'
    """
    return ":".join(f"{byte:02X}" for byte in hashlib.sha256(der).digest())


def describe_certificate(certificate: x509.Certificate) -> str:
    """Return ``<subject>, sha256 <fingerprint>``: what an operator needs to find the certificate."""
    subject = certificate.subject.rfc4514_string() or "(empty subject)"
    return f"{subject}, sha256 {sha256_fingerprint(certificate.public_bytes(Encoding.DER))}"


def split_der_chain(chain: bytes) -> list[bytes]:
    """Split DER certificates sent back to back (an OPC UA certificate chain) into single ones.

    Each certificate is an ASN.1 SEQUENCE whose header says its length; malformed input raises
    ``ValueError``.

    >>> [len(der) for der in split_der_chain(bytes([0x30, 0x01, 0xAA, 0x30, 0x00]))]
    [3, 2]
    """
    out: list[bytes] = []
    offset = 0
    while offset < len(chain):
        if chain[offset] != 0x30 or offset + 2 > len(chain):
            raise ValueError(f"no DER certificate at byte {offset}")
        first = chain[offset + 1]
        if first < 0x80:
            header, length = 2, first
        else:
            count = first & 0x7F
            if not 1 <= count <= 4 or offset + 2 + count > len(chain):
                raise ValueError(f"bad DER length at byte {offset}")
            header = 2 + count
            length = int.from_bytes(chain[offset + 2 : offset + header], "big")
        end = offset + header + length
        if end > len(chain):
            raise ValueError(f"DER certificate at byte {offset} is truncated")
        out.append(chain[offset:end])
        offset = end
    return out


def password_is_protected(
    channel_mode: ua.MessageSecurityMode, token_policy_uri: str | None, channel_policy_uri: str
) -> bool:
    """Return True if a password sent with this user token policy is encrypted on the wire.

    An empty token policy URI means "the channel's policy" (OPC UA Part 4, 7.37).

    >>> none_uri = security_policies.SecurityPolicyNone.URI
    >>> password_is_protected(ua.MessageSecurityMode.None_, none_uri, none_uri)
    False
    >>> password_is_protected(ua.MessageSecurityMode.SignAndEncrypt, none_uri, "x")
    True
    >>> basic256sha256_uri = security_policies.SecurityPolicyBasic256Sha256.URI
    >>> password_is_protected(ua.MessageSecurityMode.Sign, "", basic256sha256_uri)
    True
    """
    if channel_mode == ua.MessageSecurityMode.SignAndEncrypt:
        return True
    effective = token_policy_uri or channel_policy_uri
    return bool(effective) and effective != security_policies.SecurityPolicyNone.URI


@dataclass(frozen=True, slots=True)
class TrustList:
    """Trusted server certificates and certificate authorities, loaded from files and directories."""

    certificates: tuple[x509.Certificate, ...]
    sources: tuple[Path, ...]

    @classmethod
    def load(cls, paths: Iterable[Path]) -> TrustList:
        """Read every certificate of ``paths`` (files, or directories of .pem/.der/.crt/.cer files).

        Blocking file I/O: call it with ``asyncio.to_thread``. Raises ``OSError`` for a path that
        cannot be read and ``ValueError`` naming a file that holds no certificate.
        """
        sources = tuple(paths)
        certificates: list[x509.Certificate] = []
        for path in sources:
            files = (
                sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in TRUST_FILE_SUFFIXES)
                if path.is_dir()
                else [path]
            )
            for file in files:
                certificates.extend(_load_certificates(file))
        return cls(tuple(certificates), sources)

    def check(
        self,
        certificate: x509.Certificate,
        *,
        intermediates: Sequence[x509.Certificate] = (),
        now: datetime | None = None,
    ) -> None:
        """Return if ``certificate`` is trusted now; raise :class:`SecurityRefused` saying why not."""
        moment = now or datetime.now(UTC)
        if not certificate.not_valid_before_utc <= moment <= certificate.not_valid_after_utc:
            self._refuse(
                certificate,
                f"outside its validity period ({certificate.not_valid_before_utc:%Y-%m-%d %H:%M} to "
                f"{certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC)",
            )
        der = certificate.public_bytes(Encoding.DER)
        if any(trusted.public_bytes(Encoding.DER) == der for trusted in self.certificates):
            return
        if not self.certificates:
            self._refuse(certificate, "the trust list is empty")
        builder = (
            verification.PolicyBuilder()
            .store(verification.Store(list(self.certificates)))
            .time(moment)
            .max_chain_depth(_MAX_CHAIN_DEPTH)
            .extension_policies(
                # Only the CA side is strict (basicConstraints CA:TRUE); OPC UA application
                # certificates carry usages TLS verifiers do not expect.
                ca_policy=verification.ExtensionPolicy.permit_all().require_present(
                    x509.BasicConstraints, verification.Criticality.AGNOSTIC, _require_ca
                ),
                ee_policy=verification.ExtensionPolicy.permit_all(),
            )
        )
        try:
            builder.build_client_verifier().verify(certificate, list(intermediates))
        except verification.VerificationError:
            self._refuse(certificate, "not in the trust list and not issued by a trusted CA")

    @staticmethod
    def _refuse(certificate: x509.Certificate, why: str) -> None:
        raise SecurityRefused(f"server certificate not trusted: {describe_certificate(certificate)}: {why}")


def _require_ca(
    _policy: verification.Policy, _certificate: x509.Certificate, extension: x509.BasicConstraints | None
) -> None:
    if extension is None or not extension.ca:
        raise ValueError("an issuer must be a CA (basicConstraints CA:TRUE)")


def _load_certificates(file: Path) -> list[x509.Certificate]:
    data = file.read_bytes()
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(der) for der in split_der_chain(data)]
    except ValueError as err:
        raise ValueError(f"{file}: not a PEM or DER certificate ({err})") from err
