"""A simulated OPC UA server that checks who connects: user accounts and X.509 user certificates.

:class:`SecureOpcUaEndpoint` is an :class:`~simulators.opcua_server.OpcUaEndpoint` (same devices,
same security policies) whose sessions must present a user identity:

- ``users``: username -> password; a UserNameIdentityToken with another password is refused with
  ``BadUserAccessDenied``, as a PLC with local accounts does;
- ``user_certificates``: certificates accepted in an X509IdentityToken (the client proves it holds
  the key by signing the server's nonce; asyncua checks the signature);
- ``anonymous``: whether the AnonymousIdentityToken is offered at all (off by default).

``plaintext_user_tokens=True`` makes the server announce, on its Sign endpoints, a UserName token
policy without encryption (security policy None), as some misconfigured devices do: a password sent
to it would be readable on the wire. It exists to test clients that must refuse that.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from asyncua import ua
from asyncua.crypto import security_policies, uacrypto
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.server import Server
from asyncua.server.user_managers import UserManager
from cryptography.hazmat.primitives.serialization import Encoding

from simulators.opcua_server import OpcUaEndpoint, OpcUaSimPoint, Security
from simulators.physics import DevicePhysics

if TYPE_CHECKING:
    from asyncua.server.internal_server import InternalServer

__all__ = ["SecureOpcUaEndpoint"]


class _Accounts(UserManager):
    """Check a session's user identity against fixed accounts and certificates."""

    def __init__(
        self, passwords: Mapping[str, str], certificates: frozenset[bytes], *, anonymous: bool
    ) -> None:
        self._passwords = dict(passwords)
        self._certificates = certificates
        self._anonymous = anonymous

    def get_user(
        self,
        iserver: InternalServer,
        username: str | None = None,
        password: str | None = None,
        certificate: Any = None,
    ) -> User | None:
        """Return the user, or None to refuse the session (``BadUserAccessDenied``)."""
        del iserver
        if username is not None:
            expected = self._passwords.get(username)
            given = password if isinstance(password, str) else ""
            if expected is not None and hmac.compare_digest(expected.encode(), given.encode()):
                return User(role=UserRole.User, name=username)
            return None
        # An X509 token's certificate, or for an anonymous token the channel's client certificate.
        if isinstance(certificate, bytes) and certificate in self._certificates:
            return User(role=UserRole.User, name="certificate")
        return User(role=UserRole.User) if self._anonymous else None


class SecureOpcUaEndpoint(OpcUaEndpoint):
    """An :class:`OpcUaEndpoint` that authenticates users by password or X.509 user certificate."""

    def __init__(
        self,
        endpoint_url: str,
        devices: Sequence[tuple[str, DevicePhysics, Sequence[OpcUaSimPoint]]],
        *,
        security: Security = "none",
        certificate: Path | None = None,
        private_key: Path | None = None,
        trusted_client_certificates: Sequence[Path] = (),
        users: Mapping[str, str] | None = None,
        user_certificates: Sequence[Path] = (),
        anonymous: bool = False,
        plaintext_user_tokens: bool = False,
    ) -> None:
        super().__init__(
            endpoint_url,
            devices,
            security=security,
            certificate=certificate,
            private_key=private_key,
            trusted_client_certificates=trusted_client_certificates,
        )
        if not users and not user_certificates and not anonymous:
            raise ValueError("no way in: give users, user_certificates or anonymous=True")
        self._users = dict(users or {})
        self._user_certificates = tuple(user_certificates)
        self._anonymous = anonymous
        self._plaintext_user_tokens = plaintext_user_tokens

    async def start(self) -> None:
        """Start as :meth:`OpcUaEndpoint.start`; then weaken the token policies if asked to."""
        await super().start()
        if self._plaintext_user_tokens and self._server is not None:
            none_uri = security_policies.SecurityPolicyNone.URI
            for endpoint in self._server.iserver.endpoints:
                for token in endpoint.UserIdentityTokens:
                    if token.TokenType == ua.UserTokenType.UserName:
                        token.SecurityPolicyUri = none_uri

    async def _configure(self, server: Server) -> None:
        await super()._configure(server)
        certificates = frozenset(
            [
                (await uacrypto.load_certificate(data, _extension(path))).public_bytes(Encoding.DER)
                for path in self._user_certificates
                for data in [await asyncio.to_thread(path.read_bytes)]
            ]
        )
        tokens: list[type] = []
        if self._anonymous:
            tokens.append(ua.AnonymousIdentityToken)
        if self._users:
            tokens.append(ua.UserNameIdentityToken)
        if certificates:
            tokens.append(ua.X509IdentityToken)
        server.set_identity_tokens(tokens)
        server.iserver.set_user_manager(_Accounts(self._users, certificates, anonymous=self._anonymous))


def _extension(path: Path) -> str:
    return "der" if path.suffix.lower() == ".der" else "pem"
