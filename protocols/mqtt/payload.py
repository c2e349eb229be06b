"""Pure JSON codec of MQTT device messages: telemetry in, commands out, command responses in.

Nothing here does I/O, so the codec is tested table-driven and with hypothesis, and the driver
calls it inside gmqtt's message callback (it must be cheap: 10,000 devices publish once a second).

Telemetry shapes (docs/mqtt.md has the full description)
---------------------------------------------------------
::

    {"ts": <ts>, "values": {"<field>": <number | bool | null>, ...}}
    {"values": {"<field>": {"v": <number | bool | null>, "ts": <ts>, "q": "good|uncertain|bad"}}}
    {"samples": [{"ts": <ts>, "values": {...}}, ...]}
    {"heartbeat": true}

``<ts>`` is an ISO-8601 string with a zone (``2026-03-04T10:00:00+08:00``, ``...Z``) or a number of
milliseconds since the Unix epoch. A missing ``ts`` means "now" (the receive time). A per-field
``ts`` overrides the sample's.

What is wrong, and where it goes
--------------------------------
- A message that cannot be used at all raises :class:`scada.model.DecodeError` with the reason:
  not UTF-8, not JSON, truncated, too large, nested too deep, not the shapes above, a timestamp
  that cannot be parsed, has no zone, lies before 2000 (epoch seconds sent as milliseconds) or more
  than ``max_future_s`` after the receive time. The driver sends it to the dead-letter sink.
- A field whose value is not a number (a string, a list, null, NaN) becomes a bad-quality value
  with the reason; the other fields of the message are still used.
- Fields the device sends but no point uses are skipped and counted (``unknown_fields``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Container
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, NamedTuple

from scada.model import DecodeError, Quality, QualityCode

__all__ = [
    "MAX_PAYLOAD_BYTES",
    "CommandResponse",
    "FieldValue",
    "Telemetry",
    "encode_command",
    "parse_response",
    "parse_telemetry",
    "parse_timestamp",
]

MAX_PAYLOAD_BYTES: Final = 256 * 1024
"""Larger telemetry is refused before parsing: no device of ours sends more than a few kB."""
DEFAULT_MAX_FUTURE_S: Final = 3600.0
"""A device clock this far ahead of ours is wrong, not early."""
_EARLIEST: Final = datetime(2000, 1, 1, tzinfo=UTC)
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_GOOD: Final = Quality.good()
_BIG: Final = 1e300
_DEVICE_QUALITIES: Final = {
    "good": Quality.good(),
    "uncertain": Quality.uncertain("device reports uncertain quality"),
    "bad": Quality.bad("device reports bad quality"),
}


class FieldValue(NamedTuple):
    """One value of one payload field at one instant, before point scaling.

    A named tuple rather than a frozen dataclass: one is made per field of every message, and a
    tuple is several times cheaper to build.
    """

    field: str
    value: float | None
    """None exactly when ``quality`` is bad."""
    ts: datetime
    quality: Quality


@dataclass(frozen=True, slots=True)
class Telemetry:
    """What one telemetry message carried."""

    values: tuple[FieldValue, ...]
    """Values of known fields, in message order (samples first to last)."""
    unknown_fields: int = 0
    """How many field entries named no known field (skipped)."""
    heartbeat: bool = False
    """True for ``{"heartbeat": true}``: the device is alive and has nothing new."""


@dataclass(frozen=True, slots=True)
class CommandResponse:
    """A device's answer to one command."""

    correlation_id: str
    ok: bool
    reason: str = ""
    value: float | None = None
    """The value the device holds after the command, when it said so."""


def parse_telemetry(
    payload: bytes,
    *,
    received: datetime,
    known: Container[str],
    max_future_s: float = DEFAULT_MAX_FUTURE_S,
) -> Telemetry:
    """Parse one telemetry message; raise :class:`DecodeError` if it cannot be used at all.

    Parameters
    ----------
    payload
        The message body as received.
    received
        When it arrived (UTC, aware): the timestamp of values that carry none.
    known
        Field names some point uses; other fields are counted and skipped.
    max_future_s
        Timestamps later than ``received`` plus this are refused.

    Examples
    --------
    >>> now = datetime(2026, 3, 4, 2, 0, tzinfo=UTC)
    >>> t = parse_telemetry(b'{"ts": 1772589600000, "values": {"p_kw": 5, "x": 1}}',
    ...                     received=now, known={"p_kw"})
    >>> [(v.field, v.value, v.ts.isoformat()) for v in t.values], t.unknown_fields
    ([('p_kw', 5.0, '2026-03-04T02:00:00+00:00')], 1)
    """
    doc = _load(payload, max_bytes=MAX_PAYLOAD_BYTES)
    samples = _samples_of(doc)
    if samples is None:
        return Telemetry((), heartbeat=True)
    out: list[FieldValue] = []
    unknown = 0
    latest = received + timedelta(seconds=max_future_s)
    for index, sample in enumerate(samples):
        where = f"samples[{index}]" if "samples" in doc else ""
        if not isinstance(sample, dict):
            raise DecodeError(f"{where}: expected an object, got {_kind(sample)}")
        values = sample.get("values")
        if not isinstance(values, dict):
            raise DecodeError(f"{_at(where, 'values')}: expected an object, got {_kind(values)}")
        sample_ts = _timestamp(sample.get("ts"), received, latest, _at(where, "ts"))
        for name, raw in values.items():
            if name not in known:
                unknown += 1
                continue
            kind = type(raw)
            if (kind is float and math.isfinite(raw)) or (kind is int and -_BIG < raw < _BIG):  # cheap path
                out.append(FieldValue(name, float(raw), sample_ts, _GOOD))
                continue
            out.append(
                _field_value(
                    name,
                    raw,
                    sample_ts=sample_ts,
                    received=received,
                    latest=latest,
                    where=_at(where, f"values.{name}"),
                )
            )
    return Telemetry(tuple(out), unknown_fields=unknown)


def parse_timestamp(raw: Any, *, received: datetime, max_future_s: float = DEFAULT_MAX_FUTURE_S) -> datetime:
    """Parse an ISO-8601 string with a zone or epoch milliseconds into an aware UTC datetime.

    >>> now = datetime(2026, 3, 4, 2, 0, tzinfo=UTC)
    >>> parse_timestamp("2026-03-04T10:00:00+08:00", received=now).isoformat()
    '2026-03-04T02:00:00+00:00'
    >>> parse_timestamp(1772589600, received=now)
    Traceback (most recent call last):
    ...
    scada.model.DecodeError: ts: 1772589600 is before 2000-01-01 (epoch seconds sent as milliseconds?)
    """
    ts = _timestamp(raw, received, received + timedelta(seconds=max_future_s), "ts")
    assert ts is not None
    return ts


def encode_command(*, correlation_id: str, field: str, value: float, ts: datetime) -> bytes:
    """Return the JSON body of a command (the correlation id travels in it for MQTT 3.1.1).

    >>> encode_command(correlation_id="c1", field="sp", value=2.5, ts=datetime(2026, 1, 1, tzinfo=UTC))
    b'{"correlation_id":"c1","point":"sp","value":2.5,"ts":"2026-01-01T00:00:00+00:00"}'
    """
    body = {"correlation_id": correlation_id, "point": field, "value": value, "ts": ts.isoformat()}
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()


def parse_response(payload: bytes, *, correlation_data: bytes | None = None) -> CommandResponse:
    """Parse a device's command response; raise :class:`DecodeError` if it cannot be used.

    The correlation id comes from the body, else from the MQTT 5 correlation data.

    >>> parse_response(b'{"correlation_id": "c1", "status": "rejected", "reason": "locked"}')
    CommandResponse(correlation_id='c1', ok=False, reason='locked', value=None)
    """
    doc = _load(payload, max_bytes=MAX_PAYLOAD_BYTES)
    if not isinstance(doc, dict):
        raise DecodeError(f"expected a JSON object, got {_kind(doc)}")
    correlation_id = doc.get("correlation_id")
    if correlation_id is None and correlation_data is not None:
        try:
            correlation_id = correlation_data.decode()
        except UnicodeDecodeError:
            raise DecodeError("correlation data is not UTF-8") from None
    if not isinstance(correlation_id, str) or not correlation_id:
        raise DecodeError("response without a correlation id")
    status = doc.get("status")
    if status not in ("ok", "rejected"):
        raise DecodeError(f"'status' must be 'ok' or 'rejected', got {status!r:.40}")
    reason = doc.get("reason", "")
    if not isinstance(reason, str):
        reason = json.dumps(reason)[:200]
    value: float | None = None
    if doc.get("value") is not None:
        number = _number(doc["value"])
        if isinstance(number, str):
            raise DecodeError(f"'value': {number}")
        value = number
    return CommandResponse(correlation_id, status == "ok", reason, value)


# --------------------------------------------------------------------------------------------------
# Internals


def _load(payload: bytes, *, max_bytes: int) -> Any:
    if len(payload) > max_bytes:
        raise DecodeError(f"payload of {len(payload)} bytes is larger than {max_bytes}")
    if not payload:
        raise DecodeError("empty payload")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DecodeError(f"payload is not UTF-8 (byte {err.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        if err.pos >= len(text.rstrip()):
            raise DecodeError(f"truncated JSON: {err.msg} at the end (char {err.pos})") from None
        raise DecodeError(f"not JSON: {err.msg} at char {err.pos}") from None
    except RecursionError:
        raise DecodeError("JSON nested too deep") from None
    except ValueError as err:  # e.g. an integer literal longer than Python's digit limit
        raise DecodeError(f"not JSON: {err}") from None


def _samples_of(doc: Any) -> list[Any] | None:
    """Return the message's samples (one for the single-sample shape), None for a heartbeat."""
    if not isinstance(doc, dict):
        raise DecodeError(f"expected a JSON object, got {_kind(doc)}")
    if "samples" in doc:
        if "values" in doc:
            raise DecodeError("a message has either 'values' or 'samples', not both")
        samples = doc["samples"]
        if not isinstance(samples, list):
            raise DecodeError(f"'samples' must be a list, got {_kind(samples)}")
        return samples
    if "values" in doc:
        return [doc]
    if "heartbeat" in doc:
        if doc["heartbeat"] is not True:
            raise DecodeError(f"'heartbeat' must be true, got {doc['heartbeat']!r:.40}")
        return None
    raise DecodeError("expected 'values', 'samples' or 'heartbeat' in the message")


def _at(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def _number(raw: Any) -> float | str:
    """Return the value as a float, or the reason it is not a usable number."""
    if isinstance(raw, bool):
        return 1.0 if raw else 0.0
    if isinstance(raw, int | float):
        try:
            value = float(raw)
        except OverflowError:
            return "number too large"
        if not math.isfinite(value):
            return f"not a finite number ({value})"
        return value
    return f"expected a number, got {_kind(raw)}"


def _field_value(
    name: str, raw: Any, *, sample_ts: datetime, received: datetime, latest: datetime, where: str
) -> FieldValue:
    ts, quality = sample_ts, Quality.good()
    if isinstance(raw, dict):
        if "v" not in raw:
            return FieldValue(name, None, ts, Quality.bad("field object without 'v'"))
        if raw.get("ts") is not None:
            ts = _timestamp(raw["ts"], received, latest, f"{where}.ts")
        q = raw.get("q", "good")
        device_quality = _DEVICE_QUALITIES.get(q) if isinstance(q, str) else None
        if device_quality is None:
            return FieldValue(name, None, ts, Quality.bad(f"unknown quality {q!r:.40}"))
        if device_quality.code is QualityCode.BAD:
            return FieldValue(name, None, ts, device_quality)
        quality = device_quality
        raw = raw["v"]
    if raw is None:
        return FieldValue(name, None, ts, Quality.bad("device sent null"))
    number = _number(raw)
    if isinstance(number, str):
        return FieldValue(name, None, ts, Quality.bad(number))
    return FieldValue(name, number, ts, quality)


def _timestamp(raw: Any, received: datetime, latest: datetime, where: str) -> datetime:
    if raw is None:
        return received
    if isinstance(raw, str):
        try:
            ts = datetime.fromisoformat(raw)
        except ValueError:
            raise DecodeError(f"{where}: {raw!r:.60} is not an ISO-8601 time") from None
        if ts.tzinfo is None:
            raise DecodeError(f"{where}: {raw!r:.60} has no time zone")
        try:
            ts = ts.astimezone(UTC)
        except OverflowError:
            raise DecodeError(f"{where}: {raw!r:.60} is out of range") from None
    elif isinstance(raw, int | float) and not isinstance(raw, bool):
        try:
            ms = float(raw)
            ts = _EPOCH + timedelta(milliseconds=ms)
        except (OverflowError, ValueError):
            raise DecodeError(f"{where}: {raw!r:.60} is out of range") from None
    else:
        raise DecodeError(f"{where}: expected an ISO-8601 string or epoch milliseconds, got {_kind(raw)}")
    if ts < _EARLIEST:
        raise DecodeError(f"{where}: {raw!r:.60} is before 2000-01-01 (epoch seconds sent as milliseconds?)")
    if ts > latest:
        raise DecodeError(f"{where}: {raw!r:.60} is too far in the future (after {latest.isoformat()})")
    return ts
