"""Process settings from the environment (service URLs, HTTP address, data directory).

The site file says *what* the plant is; these settings say *where* this process finds its services.
Every variable is optional: with none set, the server uses the services on their default localhost
ports, or starts embedded ones (see :mod:`scada.services`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from protocols.mqtt.security import MqttSecurityConfig, broker_connect_args
from scada.model import ConfigError
from scada.sharding import Shard

__all__ = ["EMBEDDED", "ENV_PREFIX", "Settings"]

ENV_PREFIX = "SCADA_"
EMBEDDED = "embedded"
"""Give this as a service URL to force the embedded service even when a local one is running."""


class Settings(BaseModel):
    """Validated process settings; build with :meth:`from_env`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    db_url: str | None = None
    """``SCADA_DB_URL``: postgresql:// URL, ``embedded``, or unset (local service, else embedded)."""
    redis_url: str | None = None
    """``SCADA_REDIS_URL``: redis:// or unix:// URL, ``embedded``, or unset."""
    mqtt_url: str | None = None
    """``SCADA_MQTT_URL``: mqtt://host:port URL, ``embedded``, or unset."""
    data_dir: Path = Path(".scada-data")
    """``SCADA_DATA_DIR``: where embedded services keep their files."""
    http_host: str = "127.0.0.1"
    """``SCADA_HTTP_HOST``: address the REST API binds to."""
    http_port: Annotated[int, Field(ge=0, le=65535)] = 8080
    """``SCADA_HTTP_PORT``: port of the REST API (0 picks a free one)."""
    stream_prefix: Annotated[str, Field(min_length=1, max_length=64)] = "scada:"
    """``SCADA_STREAM_PREFIX``: prefix of every Redis key, so several sites can share one Redis."""
    readings_maxlen: Annotated[int, Field(ge=1_000)] = 2_000_000
    """``SCADA_READINGS_MAXLEN``: approximate cap of the readings stream, in entries."""
    historian_consumers: Annotated[int, Field(ge=1, le=16)] = 2
    """``SCADA_HISTORIAN_CONSUMERS``: historian consumers per process in the one consumer group; two
    keep two PostgreSQL backends busy, which is what 2 cores sustain (docs/benchmarks.md)."""
    service_timeout_s: Annotated[float, Field(gt=0, le=300)] = 5.0
    """``SCADA_SERVICE_TIMEOUT_S``: timeout of each call to PostgreSQL and Redis."""
    gateway_shard: str = "0/1"
    """``SCADA_GATEWAY_SHARD``: ``index/count``: this gateway supervises the devices whose stable hash
    falls in its shard, so ``count`` gateway processes share one fleet (see :mod:`scada.sharding`)."""
    log_level: str = "INFO"
    """``SCADA_LOG_LEVEL``: DEBUG, INFO, WARNING or ERROR."""
    mqtt_ca_file: Path | None = None
    """``SCADA_MQTT_CA_FILE``: PEM CA(s) that issued the broker's certificate (with an mqtts:// URL)."""
    mqtt_cert_file: Path | None = None
    """``SCADA_MQTT_CERT_FILE``: client certificate for a broker that requires one."""
    mqtt_key_file: Path | None = None
    """``SCADA_MQTT_KEY_FILE``: the client certificate's private key."""
    mqtt_key_password: SecretStr | None = None
    """``SCADA_MQTT_KEY_PASSWORD``: password of an encrypted client key."""
    mqtt_username: str | None = None
    """``SCADA_MQTT_USERNAME``: broker user (or put ``user:password@`` in the URL)."""
    mqtt_password: SecretStr | None = None
    """``SCADA_MQTT_PASSWORD``: broker password."""
    cockpit_port: Annotated[int, Field(ge=0, le=65535)] = 5006
    """``SCADA_COCKPIT_PORT``: where ``scada demo`` serves the cockpits (0: no cockpits)."""
    secret_key: str | None = Field(default=None, min_length=32, repr=False)
    """``SCADA_SECRET_KEY``: the key that signs access tokens (at least 32 characters; every API
    process of a deployment needs the same one). Unset: a random key kept in ``SCADA_DATA_DIR``."""
    bootstrap_admin: str | None = Field(default=None, repr=False)
    """``SCADA_BOOTSTRAP_ADMIN``: ``tenant:username:password``: create this admin of the tenant's
    nodes at start-up if the tenant has no such user (the first login of a new installation)."""

    def private_file(self, name: str, make: Callable[[], bytes]) -> bytes:
        """Return a secret kept in ``data_dir/name``, made by ``make`` on first use (mode 0600).

        Blocking (file I/O): call it with ``asyncio.to_thread`` from async code.
        """
        path = self.data_dir / name
        try:
            return path.read_bytes()
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            content = make()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(content)
            return content

    @property
    def mqtt_security(self) -> MqttSecurityConfig:
        """Return the broker connection's TLS files and credentials."""
        return MqttSecurityConfig(
            ca_file=self.mqtt_ca_file,
            client_certificate=self.mqtt_cert_file,
            client_key=self.mqtt_key_file,
            client_key_password=self.mqtt_key_password,
            username=self.mqtt_username,
            password=self.mqtt_password,
        )

    @model_validator(mode="after")
    def _check_mqtt_security(self) -> Self:
        security = self.mqtt_security  # pairs (certificate and key, password and user) checked here
        if self.mqtt_url not in (None, EMBEDDED):
            broker_connect_args(
                str(self.mqtt_url), security
            )  # TLS files need mqtts://, one set of credentials
        return self

    @field_validator("bootstrap_admin")
    @classmethod
    def _check_bootstrap(cls, value: str | None) -> str | None:
        if value is not None and (value.count(":") < 2 or len(value.split(":", 2)[2]) < 8):
            raise ValueError("expected tenant:username:password with a password of at least 8 characters")
        return value

    @field_validator("gateway_shard")
    @classmethod
    def _check_shard(cls, value: str) -> str:
        try:
            Shard.parse(value)
        except ConfigError as err:
            raise ValueError(str(err).removeprefix("SCADA_GATEWAY_SHARD: ")) from None
        return value

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read ``SCADA_*`` variables; raise :class:`ConfigError` naming the bad variable.

        >>> Settings.from_env({"SCADA_HTTP_PORT": "9000"}).http_port
        9000
        >>> Settings.from_env({"SCADA_HTTP_PORT": "-1"})
        Traceback (most recent call last):
        ...
        scada.model.ConfigError: SCADA_HTTP_PORT: Input should be greater than or equal to 0
        """
        env = os.environ if environ is None else environ
        raw = {
            name: env[ENV_PREFIX + name.upper()]
            for name in cls.model_fields
            if env.get(ENV_PREFIX + name.upper(), "") != ""
        }
        try:
            return cls.model_validate(raw)
        except ValidationError as err:
            first = err.errors()[0]
            var = ENV_PREFIX + str(first["loc"][0]).upper() if first["loc"] else "environment"
            raise ConfigError(f"{var}: {first['msg'].removeprefix('Value error, ')}") from None
