"""Validated OPC UA configuration: per device (endpoint, security, subscription) and per point (node).

These models sit next to the driver and are composed into the site file by :mod:`scada.config`.
NodeIds are written in the OPC UA string form: ``ns=2;s=meter-1.active_power_kw``, ``ns=3;i=1001``.
"""

from __future__ import annotations

import enum
import re
from pathlib import Path
from typing import Annotated, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "DeadbandType",
    "OpcUaDeviceConfig",
    "OpcUaMethodConfig",
    "OpcUaPointConfig",
    "SecurityMode",
    "SecurityPolicy",
]

_NODE_ID_RE = re.compile(r"^(ns=\d+;)?[isgb]=.+$")


def _check_node_id(value: str) -> str:
    if not _NODE_ID_RE.match(value):
        raise ValueError(f"{value!r} is not an OPC UA NodeId (e.g. 'ns=2;s=meter.power_kw' or 'ns=2;i=1001')")
    return value


class SecurityPolicy(enum.StrEnum):
    """Message security policies the driver offers."""

    NONE = "none"
    """No signing, no encryption: for tests and isolated benches only."""
    BASIC256SHA256 = "basic256sha256"


class SecurityMode(enum.StrEnum):
    """What the security policy protects."""

    NONE = "none"
    SIGN = "sign"
    SIGN_AND_ENCRYPT = "sign_and_encrypt"


class DeadbandType(enum.StrEnum):
    """OPC UA data-change deadbands (Part 4, 7.17.2)."""

    NONE = "none"
    ABSOLUTE = "absolute"
    PERCENT = "percent"
    """Percent of the variable's EURange; the server must expose one."""


class OpcUaMethodConfig(BaseModel):
    """Write a point by calling a method with the value as its only argument."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    object_id: str
    """NodeId of the object the method belongs to."""
    method_id: str
    """NodeId of the method."""

    @field_validator("object_id", "method_id")
    @classmethod
    def _check_ids(cls, value: str) -> str:
        return _check_node_id(value)


class OpcUaPointConfig(BaseModel):
    """Where one point lives in the server's address space and how to monitor it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    node_id: str
    sampling_interval_ms: Annotated[float, Field(ge=0, le=3_600_000)] | None = None
    """Server-side sampling interval of the monitored item; the device's publishing interval if unset."""
    deadband_type: DeadbandType = DeadbandType.NONE
    deadband: Annotated[float, Field(ge=0)] = 0.0
    """Absolute change (in the variable's unit) or percent of EURange below which no update is sent."""
    method: OpcUaMethodConfig | None = None
    """Writes go through this method call instead of a value write."""

    @field_validator("node_id")
    @classmethod
    def _check_node(cls, value: str) -> str:
        return _check_node_id(value)

    @model_validator(mode="after")
    def _check_deadband(self) -> Self:
        if self.deadband_type is DeadbandType.NONE and self.deadband != 0:
            raise ValueError("deadband needs a deadband_type (absolute or percent)")
        if self.deadband_type is DeadbandType.PERCENT and self.deadband > 100:
            raise ValueError("a percent deadband must be at most 100")
        return self


class OpcUaDeviceConfig(BaseModel):
    """How to reach one OPC UA server and how to subscribe to it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    endpoint: str
    """``opc.tcp://host:port/path``."""
    security_policy: SecurityPolicy = SecurityPolicy.NONE
    security_mode: SecurityMode = SecurityMode.NONE
    certificate: Path | None = None
    """Client application instance certificate (DER or PEM); needed for Sign and SignAndEncrypt."""
    private_key: Path | None = None
    """Private key of :attr:`certificate` (PEM)."""
    server_certificate: Path | None = None
    """Pinned server certificate; the session is refused when the server presents another one."""
    trust_list: tuple[Path, ...] = ()
    """Trusted server and CA certificates: files (PEM, DER) or directories of them. When set, a server
    whose certificate is neither in the list nor issued by a CA in it is refused."""
    username: str | None = None
    password: str | None = Field(default=None, repr=False)
    allow_plaintext_password: bool = False
    """Send ``password`` even where it would travel unencrypted (security none, or a server whose
    user token policy does not encrypt it); for isolated test benches only."""
    user_certificate: Path | None = None
    """X.509 user identity (DER or PEM), instead of username/password; needs :attr:`user_private_key`."""
    user_private_key: Path | None = None
    """Private key of :attr:`user_certificate` (PEM or DER); it signs the server's nonce, never leaves."""
    timeout_s: Annotated[float, Field(gt=0, le=60)] = 5.0
    """Per request (connect, read, write, call)."""
    subscribe: bool = True
    """Monitored items on one subscription; False polls with Read at the device's poll period."""
    publishing_interval_ms: Annotated[float, Field(ge=10, le=3_600_000)] = 500.0
    keepalive_count: Annotated[int, Field(ge=1, le=1000)] = 10
    """Publishing intervals without data after which the server sends a keep-alive."""

    @field_validator("endpoint")
    @classmethod
    def _check_endpoint(cls, value: str) -> str:
        if not value.startswith("opc.tcp://") or len(value) <= len("opc.tcp://"):
            raise ValueError(f"{value!r} is not an opc.tcp:// endpoint URL")
        return value

    @field_validator("trust_list", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, str | Path) else value

    @model_validator(mode="after")
    def _check_security(self) -> Self:
        secure = self.security_policy is not SecurityPolicy.NONE
        if secure != (self.security_mode is not SecurityMode.NONE):
            raise ValueError("security_policy and security_mode must both be none or both be set")
        if secure and (self.certificate is None or self.private_key is None):
            policy = self.security_policy.value
            raise ValueError(f"security policy {policy} needs certificate and private_key")
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together")
        if (self.user_certificate is None) != (self.user_private_key is None):
            raise ValueError("user_certificate and user_private_key go together")
        if self.username is not None and self.user_certificate is not None:
            raise ValueError("give either username/password or user_certificate, not both")
        if self.trust_list and not secure:
            raise ValueError(
                "trust_list needs security_policy basic256sha256: with none no server certificate is checked"
            )
        if self.password is not None and not secure and not self.allow_plaintext_password:
            raise ValueError(
                "a password with security_policy none travels in plain text: use basic256sha256 "
                "(sign_and_encrypt), or set allow_plaintext_password: true on an isolated network"
            )
        return self

    @property
    def host_port(self) -> tuple[str, int]:
        """Return the endpoint's host and port (4840 when the URL names none)."""
        rest = self.endpoint.removeprefix("opc.tcp://").split("/", 1)[0]
        host, _, port = rest.rpartition(":")
        if not host:
            return rest, 4840
        return host.strip("[]"), int(port)
