"""How the server proves the broker is the broker, and itself to the broker: TLS and credentials.

The broker URL says where and whether to encrypt: ``mqtt://host[:1883]`` is plain TCP,
``mqtts://host[:8883]`` is TLS. :class:`MqttSecurityConfig` adds what a URL should not carry:

- ``ca_file``: the CA certificate(s) (PEM) that issued the broker's certificate. Without it the
  system's trusted CAs are used. The broker's certificate must name the URL's host (DNS name or IP
  address in its subject alternative names); TLS 1.2 is the minimum.
- ``client_certificate`` / ``client_key`` (PEM, the key optionally encrypted with
  ``client_key_password``): for brokers that require client certificates
  (``require_certificate true`` in Mosquitto).
- ``username`` / ``password``: MQTT CONNECT credentials. They may instead be in the URL
  (``mqtts://user:pass@host``, percent-encoded), but not in both places.

:func:`broker_connect_args` turns URL + config into :class:`BrokerConnectArgs` (host, port,
credentials, whether TLS is on); :func:`make_ssl_context` reads the certificate files into an
``ssl.SSLContext``. It does blocking file I/O, so :class:`~protocols.mqtt.connection.MqttConnection`
calls it with ``asyncio.to_thread`` before every connection attempt (a renewed certificate on disk
is used from the next reconnect). Passwords are never part of a ``repr``, a log line or an error
message: :attr:`BrokerConnectArgs.display` is the URL without them.
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Self
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, SecretStr, model_validator

__all__ = ["BrokerConnectArgs", "MqttSecurityConfig", "broker_connect_args", "make_ssl_context"]

_DEFAULT_PORTS: Final = {"mqtt": 1883, "tcp": 1883, "mqtts": 8883, "ssl": 8883}
_TLS_SCHEMES: Final = frozenset({"mqtts", "ssl"})


class MqttSecurityConfig(BaseModel):
    """TLS files and credentials for the broker connection (composed into the process settings)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ca_file: Path | None = None
    """PEM file of the CA(s) that issued the broker's certificate; the system CAs when unset."""
    client_certificate: Path | None = None
    """PEM client certificate (chain) for brokers that require one; needs :attr:`client_key`."""
    client_key: Path | None = None
    """PEM private key of :attr:`client_certificate`."""
    client_key_password: SecretStr | None = None
    """Password of an encrypted :attr:`client_key`."""
    username: str | None = None
    password: SecretStr | None = None

    @model_validator(mode="after")
    def _check_pairs(self) -> Self:
        if (self.client_certificate is None) != (self.client_key is None):
            raise ValueError("client_certificate and client_key go together")
        if self.client_key_password is not None and self.client_key is None:
            raise ValueError("client_key_password needs client_key")
        if self.password is not None and self.username is None:
            raise ValueError("password needs username")
        return self

    @property
    def has_tls_files(self) -> bool:
        """Return True if any TLS option is set (they need an mqtts:// URL)."""
        return self.ca_file is not None or self.client_certificate is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerConnectArgs:
    """Where the broker is, whether to speak TLS, and the CONNECT credentials."""

    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    security: MqttSecurityConfig = field(default_factory=MqttSecurityConfig)
    """The TLS files for :func:`make_ssl_context` (credentials already moved to the fields above)."""

    @property
    def display(self) -> str:
        """Return the broker URL for logs and errors: scheme, user and address, never the password.

        >>> broker_connect_args("mqtts://gw:s3cret@broker.local").display
        'mqtts://gw@broker.local:8883'
        """
        user = f"{self.username}@" if self.username else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{host}:{self.port}"

    @property
    def plaintext_password(self) -> bool:
        """Return True if a password would cross a network unencrypted (no TLS, host not loopback)."""
        if self.tls or self.password is None:
            return False
        try:
            return not ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host != "localhost"


def broker_connect_args(url: str, security: MqttSecurityConfig | None = None) -> BrokerConnectArgs:
    """Parse a broker URL and merge the security options; ``ValueError`` says what is wrong.

    >>> args = broker_connect_args("mqtt://127.0.0.1")
    >>> (args.host, args.port, args.tls)
    ('127.0.0.1', 1883, False)
    >>> broker_connect_args("mqtt://h", MqttSecurityConfig(ca_file=Path("ca.pem")))
    Traceback (most recent call last):
    ...
    ValueError: mqtt://h:1883: ca_file and client certificates need an mqtts:// URL (TLS)
    """
    security = security or MqttSecurityConfig()
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ValueError("expected an mqtt://host[:port] or mqtts://host[:port] URL")
    try:
        port = parts.port or _DEFAULT_PORTS[scheme]
    except ValueError as err:  # urlsplit validates the port lazily; the message may hold the URL
        raise ValueError(f"the broker URL has an invalid port ({scheme}://{parts.hostname})") from err
    tls = scheme in _TLS_SCHEMES
    url_user = unquote(parts.username) if parts.username else None
    url_password = unquote(parts.password) if parts.password is not None else None
    if url_user is not None and security.username is not None:
        raise ValueError("broker credentials are both in the URL and in the settings: give them once")
    username = url_user if url_user is not None else security.username
    password = (
        url_password
        if url_user is not None
        else (security.password.get_secret_value() if security.password is not None else None)
    )
    args = BrokerConnectArgs(
        host=parts.hostname,
        port=port,
        tls=tls,
        username=username,
        password=password,
        security=security.model_copy(update={"username": None, "password": None}),
    )
    if security.has_tls_files and not tls:
        raise ValueError(f"{args.display}: ca_file and client certificates need an mqtts:// URL (TLS)")
    return args


def make_ssl_context(security: MqttSecurityConfig) -> ssl.SSLContext:
    """Return a client TLS context: verify the broker (``ca_file`` or system CAs), present our certificate.

    Blocking (reads files): run it with ``asyncio.to_thread``. Raises ``OSError`` for a file that
    cannot be read and ``ssl.SSLError`` for one that holds no usable certificate or key; the
    message names the file.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)  # CERT_REQUIRED, hostname check
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if security.ca_file is not None:
        try:
            context.load_verify_locations(cafile=security.ca_file)
        except ssl.SSLError as err:
            raise ssl.SSLError(
                err.errno, f"ca_file {security.ca_file}: no usable CA certificate ({err})"
            ) from err
        except OSError as err:
            raise OSError(err.errno, f"ca_file {security.ca_file}: {err.strerror}") from err
    if security.client_certificate is not None:
        password = security.client_key_password.get_secret_value() if security.client_key_password else None
        try:
            context.load_cert_chain(security.client_certificate, security.client_key, password=password)
        except ssl.SSLError as err:
            raise ssl.SSLError(
                err.errno,
                f"client_certificate {security.client_certificate} / client_key {security.client_key}: "
                f"not a matching PEM certificate and key ({err.reason or err})",
            ) from err
        except OSError as err:
            raise OSError(err.errno, f"client certificate or key: {err.strerror}: {err.filename}") from err
    return context
