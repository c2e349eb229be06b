"""Validated MQTT configuration: per device (topics, protocol version, QoS) and per point (field).

Topics may contain ``{device}``, replaced by the device id. Payloads are JSON; their shape is in
docs/mqtt.md. These models are composed into the site file by :mod:`scada.config`.
"""

from __future__ import annotations

import enum
from typing import Annotated, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["MqttDeviceConfig", "MqttPointConfig", "MqttVersion"]


class MqttVersion(enum.StrEnum):
    """MQTT protocol version of the server's connection to the broker."""

    V311 = "3.1.1"
    V5 = "5"


def _check_topic(value: str, *, wildcards: bool) -> str:
    if not value or len(value.encode()) > 65535:
        raise ValueError("a topic must be 1 to 65535 bytes")
    if "\x00" in value:
        raise ValueError("a topic must not contain NUL")
    if not wildcards and ("+" in value or "#" in value):
        raise ValueError(f"{value!r}: wildcards are not allowed in a publish topic")
    return value


class MqttPointConfig(BaseModel):
    """Where one point's value sits in the device's JSON payload."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    field: Annotated[str, Field(min_length=1, max_length=128)]
    """Key of the value in the payload's ``values`` object (the point key when the section is absent)."""


class MqttDeviceConfig(BaseModel):
    """Topics and delivery of one MQTT device; the broker is the server's (``SCADA_MQTT_URL``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    telemetry_topic: str = "carbonos/{device}/telemetry"
    """Where the device publishes readings (may contain + and # wildcards)."""
    command_topic: str = "carbonos/{device}/command"
    """Where the server publishes commands."""
    response_topic: str = "carbonos/{device}/command/response"
    """Where the device answers commands, echoing the correlation id."""
    version: MqttVersion = MqttVersion.V5
    qos: Annotated[int, Field(ge=0, le=2)] = 1
    """QoS of commands and their responses."""
    telemetry_qos: Annotated[int, Field(ge=0, le=2)] = 1
    """QoS of the telemetry subscription. 1 survives a broker hiccup without loss; 0 costs the broker
    and the server less per message, which matters for thousands of devices at 1 Hz (see
    docs/benchmarks.md)."""
    timeout_s: Annotated[float, Field(gt=0, le=60)] = 5.0
    """How long a command waits for the device's response."""

    @field_validator("telemetry_topic")
    @classmethod
    def _check_telemetry(cls, value: str) -> str:
        return _check_topic(value, wildcards=True)

    @field_validator("command_topic", "response_topic")
    @classmethod
    def _check_publish_topics(cls, value: str) -> str:
        return _check_topic(value, wildcards=False)

    @model_validator(mode="after")
    def _check_distinct(self) -> Self:
        if self.command_topic == self.response_topic:
            raise ValueError("command_topic and response_topic must differ")
        return self

    def topics_for(self, device: str) -> tuple[str, str, str]:
        """Return (telemetry, command, response) topics with ``{device}`` filled in."""
        return (
            self.telemetry_topic.replace("{device}", device),
            self.command_topic.replace("{device}", device),
            self.response_topic.replace("{device}", device),
        )
