"""Validated OpenADR 2.0b configuration: per device (the VTN we run for one EMS/VEN) and per point.

A ``protocol: openadr`` device is an external energy management system that speaks OpenADR 2.0b as
a VEN. The server runs one VTN endpoint per such device (``listen_host``/``listen_port``); the VEN
registers with it, polls it for events and sends it reports. Every point says what it maps to:

- ``signal``: a writable point; a write becomes an OpenADR event carrying that signal;
- ``status``: a read-only status of the device's latest event (``event``) or of the VEN's answer to
  it (``opt``), published by the driver;
- ``resource_id`` (+ ``measurement``): a value the VEN reports in its TELEMETRY_USAGE (or
  TELEMETRY_STATUS) report.

These models sit next to the driver and are composed into the site file by :mod:`scada.config`.
"""

from __future__ import annotations

import enum
import re
from typing import Annotated, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["OpenAdrDeviceConfig", "OpenAdrPointConfig", "OpenAdrSignal", "OpenAdrStatus"]

_URI_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:\S+$")


class OpenAdrSignal(enum.StrEnum):
    """The event signal a write becomes (OpenADR 2.0b EiEvent signalName/signalType)."""

    LOAD_DISPATCH = "load_dispatch"
    """LOAD_DISPATCH, type ``delta``, in kW: writing 120 (shed 120 kW) sends a payload of -120."""
    SIMPLE = "simple"
    """SIMPLE, type ``level``: writing 0..3 sends that level (normal, moderate, high, special)."""


class OpenAdrStatus(enum.StrEnum):
    """Which status of the device's latest event a status point carries (codes in docs/openadr.md)."""

    EVENT = "event"
    """0 none, 1 far (pending), 2 active, 3 completed, 4 cancelled."""
    OPT = "opt"
    """0 no answer yet, 1 opted in, -1 opted out."""


class OpenAdrPointConfig(BaseModel):
    """What one point of an OpenADR device maps to: exactly one of signal, status or resource_id."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    signal: OpenAdrSignal | None = None
    status: OpenAdrStatus | None = None
    resource_id: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    """The report data source the VEN names in its METADATA report (its ``resourceID``)."""
    measurement: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    """The measurement's name or description in the VEN's report (``powerReal``, ``RealPower``);
    any measurement of the resource when absent."""

    @model_validator(mode="after")
    def _check_one_role(self) -> Self:
        roles = [name for name in ("signal", "status", "resource_id") if getattr(self, name) is not None]
        if len(roles) != 1:
            raise ValueError("an openadr point needs exactly one of 'signal', 'status' or 'resource_id'")
        if self.measurement is not None and self.resource_id is None:
            raise ValueError("'measurement' goes with 'resource_id'")
        return self


class OpenAdrDeviceConfig(BaseModel):
    """The VTN endpoint served for one VEN, and how long a dispatch waits for its answer."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ven_name: Annotated[str, Field(min_length=1, max_length=128)]
    """The name the VEN registers with (oadrCreatePartyRegistration venName); others are refused."""
    ven_id: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")]
    """The venID the VTN assigns at registration; unique among the OpenADR devices of a gateway."""
    vtn_id: Annotated[str, Field(min_length=1, max_length=128)] = "CARBONOS-VTN"
    market_context: str = "oadr://carbonos/default"
    """URI of the demand-response programme the events belong to."""
    listen_host: Annotated[str, Field(min_length=1)] = "127.0.0.1"
    """Address the VTN binds to; ``0.0.0.0`` to accept VENs from other hosts."""
    listen_port: Annotated[int, Field(ge=0, le=65535)]
    """TCP port of the VTN (0 picks a free one: tests only)."""
    http_path_prefix: str = "/OpenADR2/Simple/2.0b"
    poll_interval_s: Annotated[float, Field(ge=0.5, le=3600)] = 10.0
    """oadrPoll frequency requested from the VEN at registration (oadrRequestedOadrPollFreq)."""
    timeout_s: Annotated[float, Field(gt=0, le=3600)] = 30.0
    """How long a write waits for the VEN's opt-in or opt-out; must exceed the poll interval."""
    default_duration_s: Annotated[float, Field(ge=60, le=86_400 * 7)] = 3600.0
    """Length of an event whose command gives no ``hold_until``."""

    @field_validator("market_context")
    @classmethod
    def _check_market_context(cls, value: str) -> str:
        if not _URI_RE.match(value):
            raise ValueError(f"{value!r} is not a URI (e.g. 'oadr://utility/programme')")
        return value

    @field_validator("http_path_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if not value.startswith("/") or any(c.isspace() for c in value):
            raise ValueError("must be a URL path starting with '/'")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _check_timeout(self) -> Self:
        if self.timeout_s <= self.poll_interval_s:
            raise ValueError(
                f"timeout_s ({self.timeout_s:g}) must exceed poll_interval_s ({self.poll_interval_s:g}): "
                "the VEN sees an event only when it polls"
            )
        return self
