"""Versioned wire format of the Redis streams: batches of readings and availability events.

One stream entry carries a whole batch, because one XADD per reading would cost a round trip and
an entry header each. The format is plain JSON so operators (and other languages) can read a
dead-letter entry with ``redis-cli``.

Readings entry (version 1)
--------------------------
::

    v = b"1"
    r = [[point_id, ts_epoch_us, value, quality, reason], ...]

- ``point_id``: ``"<device>.<key>"`` (see :data:`scada.model.ID_PATTERN`).
- ``ts_epoch_us``: integer microseconds since the Unix epoch, UTC; must fall in
  [2000-01-01, 2100-01-01) so that seconds or nanoseconds sent by mistake are caught.
- ``value``: a JSON number, ``null`` (only with bad quality) or one of the strings ``"NaN"``,
  ``"Infinity"``, ``"-Infinity"`` (JSON has no literal for them; PostgreSQL stores them).
- ``quality``: :class:`scada.model.QualityCode` as an integer (0 bad, 1 uncertain, 2 good).
- ``reason``: the quality reason, or ``null`` when empty.

Event entry (version 1)
-----------------------
::

    v = b"1"
    type = b"availability"
    e = {"device": ..., "ts_us": ..., "availability": "online" | "offline" | "stale", "reason": ...}

Decoding anything else raises :class:`scada.model.DecodeError` with a reason an operator can act on;
the consumer then moves the entry to the dead-letter stream.

Two decoders, one format
------------------------
:func:`decode_readings` builds :class:`scada.model.Reading` objects. :func:`decode_reading_rows`
accepts and refuses exactly the same entries but keeps each row as a plain tuple
(:data:`WireRow`) inside a :class:`ReadingRows`, a lazy ``Sequence[Reading]``: a stage that
understands rows (the historian, which COPYs them) never pays for a ``Reading``, a ``Quality`` and a
``datetime`` per value, and any other stage still sees readings.
"""

from __future__ import annotations

import functools
import json
import math
import re
import reprlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final, overload

from scada.model import (
    ID_PATTERN,
    Availability,
    AvailabilityEvent,
    DecodeError,
    DeviceId,
    PointId,
    Quality,
    QualityCode,
    Reading,
)

__all__ = [
    "EVENT_TYPE_AVAILABILITY",
    "FIELD_EVENT",
    "FIELD_READINGS",
    "FIELD_TYPE",
    "FIELD_VERSION",
    "MAX_TS",
    "MIN_TS",
    "VERSION",
    "EntryFields",
    "ReadingRows",
    "WireRow",
    "decode_event",
    "decode_json_event",
    "decode_reading_rows",
    "decode_readings",
    "encode_event",
    "encode_json_event",
    "encode_readings",
    "encode_row",
    "fields_from_rows",
    "reading_from_row",
    "row_from_reading",
]

EntryFields = Mapping[bytes, bytes] | Mapping[str, str] | Mapping[bytes | str, bytes | str]
"""Fields of one stream entry as redis-py returns them (bytes, or str with ``decode_responses``)."""

VERSION: Final = b"1"
FIELD_VERSION: Final = b"v"
FIELD_READINGS: Final = b"r"
FIELD_TYPE: Final = b"type"
FIELD_EVENT: Final = b"e"
EVENT_TYPE_AVAILABILITY: Final = b"availability"

MIN_TS: Final = datetime(2000, 1, 1, tzinfo=UTC)
"""Earliest timestamp accepted on the wire; earlier ones are unit mistakes (s or ms sent as us)."""
MAX_TS: Final = datetime(2100, 1, 1, tzinfo=UTC)
"""Latest timestamp accepted on the wire (exclusive)."""

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US: Final = timedelta(microseconds=1)
_MIN_TS_US: Final = (MIN_TS - _EPOCH) // timedelta(microseconds=1)
_MAX_TS_US: Final = (MAX_TS - _EPOCH) // timedelta(microseconds=1)
_POINT_ID_RE: Final = re.compile(rf"^{ID_PATTERN}\.{ID_PATTERN}$")
_DEVICE_ID_RE: Final = re.compile(rf"^{ID_PATTERN}$")
_NON_FINITE_TO_WIRE: Final = {math.inf: "Infinity", -math.inf: "-Infinity"}
_WIRE_TO_NON_FINITE: Final = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_ROW_LEN: Final = 5
_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
"""Made once: ``json.dumps`` with non-default arguments builds a new encoder on every call."""


def _brief_repr() -> reprlib.Repr:
    shown = reprlib.Repr()  # Python 3.11 takes no keyword arguments here
    shown.maxlevel, shown.maxstring, shown.maxother, shown.maxlong = 3, 80, 80, 40
    shown.maxlist = shown.maxdict = shown.maxtuple = 6
    return shown


_BRIEF: Final = _brief_repr()
"""Shows a bad value in a decode error: bounded in length and depth, so a 100 kB string or a list
nested 900 deep makes a short reason (and no RecursionError) instead of an unreadable one."""

WireRow = tuple[str, int, float | None, int, str | None]
"""One decoded row: ``(point_id, ts_epoch_us, value, quality_code, reason)``, checked like a Reading."""


# --------------------------------------------------------------------------------------------------
# Readings


def encode_row(reading: Reading) -> str:
    """Encode one reading as the JSON text of one row; raise ValueError if it cannot travel.

    The sink calls this when a reading is published, so a bad reading is refused at the edge
    instead of poisoning a whole batch later.

    >>> from datetime import datetime, UTC
    >>> r = Reading(point=PointId("m1.power_kw"), ts=datetime(2026, 1, 5, tzinfo=UTC), value=1.5)
    >>> encode_row(r)
    '["m1.power_kw",1767571200000000,1.5,2,null]'
    """
    if not _valid_point(reading.point):
        raise ValueError(f"malformed point id {reading.point!r}: expected '<device>.<key>'")
    ts_us = _to_epoch_us(reading.ts)
    if not _MIN_TS_US <= ts_us < _MAX_TS_US:
        raise ValueError(f"reading for {reading.point}: timestamp {reading.ts.isoformat()} out of range")
    value = reading.value
    row = [
        reading.point,
        ts_us,
        value if type(value) is float and math.isfinite(value) else _value_to_wire(value),
        int(reading.quality.code),
        reading.quality.reason or None,
    ]
    return _ENCODER.encode(row)


def fields_from_rows(rows: Iterable[str]) -> dict[bytes, bytes]:
    """Join rows made by :func:`encode_row` into the fields of one stream entry."""
    return {FIELD_VERSION: VERSION, FIELD_READINGS: ("[" + ",".join(rows) + "]").encode()}


def encode_readings(readings: Iterable[Reading]) -> dict[bytes, bytes]:
    """Encode a batch of readings as the fields of one stream entry; raise ValueError if one can't.

    >>> from datetime import datetime, UTC
    >>> r = Reading(point=PointId("m1.power_kw"), ts=datetime(2026, 1, 5, tzinfo=UTC), value=None,
    ...             quality=Quality.bad("timeout"))
    >>> encode_readings([r])
    {b'v': b'1', b'r': b'[["m1.power_kw",1767571200000000,null,0,"timeout"]]'}
    """
    return fields_from_rows(encode_row(r) for r in readings)


def decode_readings(fields: EntryFields) -> list[Reading]:
    """Decode one stream entry into readings; raise DecodeError naming what is wrong.

    >>> decode_readings({b"v": b"1", b"r": b'[["m1.power_kw",1767571200000000,2.0,2,null]]'})
    [Reading(point='m1.power_kw', ts=datetime.datetime(2026, 1, 5, 0, 0, tzinfo=datetime.timezone.utc), value=2.0, quality=Quality(code=<QualityCode.GOOD: 2>, reason=''))]
    >>> decode_readings({b"v": b"2", b"r": b"[]"})
    Traceback (most recent call last):
    ...
    scada.model.DecodeError: unsupported format version '2' (expected '1')
    """  # noqa: E501 -- the doctest output is one line
    raw = _field_map(fields)
    _check_version(raw)
    payload = _load_json(raw, FIELD_READINGS)
    if not isinstance(payload, list):
        raise DecodeError(f"field 'r' must be a JSON array, got {type(payload).__name__}")
    return [_decode_row(i, row) for i, row in enumerate(payload)]


def _decode_row(index: int, row: Any) -> Reading:
    if not isinstance(row, list) or len(row) != _ROW_LEN:
        raise DecodeError(f"row {index}: expected [point, ts_us, value, quality, reason]")
    point, ts_us, wire_value, code, reason = row
    if not isinstance(point, str) or not _POINT_ID_RE.match(point):
        raise DecodeError(f"row {index}: malformed point id {_brief(point)}")
    ts = _decode_ts(f"row {index} ({point})", ts_us)
    value = _value_from_wire(index, point, wire_value)
    if isinstance(code, bool) or not isinstance(code, int) or code not in _QUALITY_CODES:
        raise DecodeError(f"row {index} ({point}): quality must be 0, 1 or 2, got {_brief(code)}")
    if reason is not None and not isinstance(reason, str):
        raise DecodeError(f"row {index} ({point}): reason must be null or a string, got {_brief(reason)}")
    quality_code = QualityCode(code)
    if value is None and quality_code is not QualityCode.BAD:
        raise DecodeError(f"row {index} ({point}): value is null but quality is {quality_code.name}")
    quality = Quality(quality_code, reason or "")
    return Reading(point=PointId(point), ts=ts, value=value, quality=quality)


class ReadingRows(Sequence[Reading]):
    """Decoded rows that read as a ``Sequence[Reading]``; ``rows`` gives the tuples themselves.

    Readings are built on access only, so a consumer that hands the whole batch to a row-aware stage
    builds none.

    >>> rows = decode_reading_rows({b"v": b"1", b"r": b'[["m1.power_kw",1767571200000000,2.0,2,null]]'})
    >>> rows.rows
    [('m1.power_kw', 1767571200000000, 2.0, 2, None)]
    >>> rows[0].value, len(rows)
    (2.0, 1)
    """

    __slots__ = ("rows",)

    def __init__(self, rows: list[WireRow]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    @overload
    def __getitem__(self, index: int) -> Reading: ...

    @overload
    def __getitem__(self, index: slice) -> ReadingRows: ...

    def __getitem__(self, index: int | slice) -> Reading | ReadingRows:
        if isinstance(index, slice):
            return ReadingRows(self.rows[index])
        return reading_from_row(self.rows[index])

    def __iter__(self) -> Iterator[Reading]:
        return map(reading_from_row, self.rows)

    def __repr__(self) -> str:
        return f"ReadingRows({len(self.rows)} rows)"

    @classmethod
    def concat(cls, parts: Iterable[ReadingRows]) -> ReadingRows:
        """Join several entries' rows into one batch."""
        rows: list[WireRow] = []
        for part in parts:
            rows.extend(part.rows)
        return cls(rows)


def decode_reading_rows(fields: EntryFields) -> ReadingRows:
    """Decode one stream entry into rows; accept and refuse exactly what :func:`decode_readings` does.

    The common row (a valid point id seen before, integer time in range, float value, known quality,
    no reason or a string) is checked inline; anything else goes through the full row decoder, which
    either normalises it (an integer or non-finite value) or raises its DecodeError.
    """
    raw = _field_map(fields)
    _check_version(raw)
    payload = _load_json(raw, FIELD_READINGS)
    if not isinstance(payload, list):
        raise DecodeError(f"field 'r' must be a JSON array, got {type(payload).__name__}")
    out: list[WireRow] = []
    append = out.append
    valid_point = _valid_point
    lo, hi = _MIN_TS_US, _MAX_TS_US
    for index, row in enumerate(payload):
        if type(row) is list and len(row) == _ROW_LEN:
            point, ts_us, value, code, reason = row
            if (
                type(ts_us) is int
                and lo <= ts_us < hi
                and type(code) is int
                and 0 <= code <= 2  # QualityCode.BAD .. GOOD
                and (type(value) is float or (value is None and code == 0))
                and (reason is None or type(reason) is str)
                and type(point) is str
                and valid_point(point)
            ):
                append((point, ts_us, value, code, reason or None))
                continue
        append(row_from_reading(_decode_row(index, row)))  # raises, or normalises an unusual row
    return ReadingRows(out)


@functools.lru_cache(maxsize=1 << 17)
def _valid_point(point: str) -> bool:
    return _POINT_ID_RE.match(point) is not None


def reading_from_row(row: WireRow) -> Reading:
    """Build the :class:`Reading` of a decoded row."""
    point, ts_us, value, code, reason = row
    quality = _GOOD if code == QualityCode.GOOD and not reason else Quality(QualityCode(code), reason or "")
    return Reading(
        point=PointId(point), ts=_EPOCH + timedelta(microseconds=ts_us), value=value, quality=quality
    )


def row_from_reading(reading: Reading) -> WireRow:
    """Return the row of a reading (the inverse of :func:`reading_from_row`)."""
    return (
        reading.point,
        _to_epoch_us(reading.ts),
        reading.value,
        int(reading.quality.code),
        reading.quality.reason or None,
    )


_GOOD: Final = Quality.good()


_QUALITY_CODES: Final = frozenset(int(c) for c in QualityCode)
_AVAILABILITIES: Final = frozenset(a.value for a in Availability)


def _value_to_wire(value: float | None) -> float | str | None:
    if value is None:
        return None
    if math.isnan(value):
        return "NaN"
    return _NON_FINITE_TO_WIRE.get(value, float(value))


def _value_from_wire(index: int, point: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise DecodeError(f"row {index} ({point}): value must be a number or null, got a boolean")
    if isinstance(value, float):
        return value
    if isinstance(value, int):
        try:
            return float(value)
        except OverflowError:
            raise DecodeError(f"row {index} ({point}): value {value} overflows a double") from None
    if isinstance(value, str) and value in _WIRE_TO_NON_FINITE:
        return _WIRE_TO_NON_FINITE[value]
    raise DecodeError(f"row {index} ({point}): value must be a number or null, got {_brief(value)}")


# --------------------------------------------------------------------------------------------------
# Events


def encode_event(event: AvailabilityEvent) -> dict[bytes, bytes]:
    """Encode an availability change as the fields of one ``events`` stream entry.

    >>> from datetime import datetime, UTC
    >>> e = AvailabilityEvent(device=DeviceId("m1"), ts=datetime(2026, 1, 5, tzinfo=UTC),
    ...                       availability=Availability.OFFLINE, reason="timeout")
    >>> encode_event(e)[b"e"]
    b'{"device":"m1","ts_us":1767571200000000,"availability":"offline","reason":"timeout"}'
    """
    if not _DEVICE_ID_RE.match(event.device):
        raise ValueError(f"malformed device id {event.device!r}")
    body = {
        "device": event.device,
        "ts_us": _to_epoch_us(event.ts),
        "availability": event.availability.value,
        "reason": event.reason,
    }
    return {
        FIELD_VERSION: VERSION,
        FIELD_TYPE: EVENT_TYPE_AVAILABILITY,
        FIELD_EVENT: json.dumps(body, separators=(",", ":")).encode(),
    }


def decode_event(fields: EntryFields) -> AvailabilityEvent:
    """Decode one ``events`` entry made by :func:`encode_event`; raise DecodeError otherwise."""
    raw = _field_map(fields)
    _check_version(raw)
    kind = raw.get(FIELD_TYPE)
    if kind != EVENT_TYPE_AVAILABILITY:
        raise DecodeError(f"unsupported event type {_show(kind)}")
    body = _load_json(raw, FIELD_EVENT)
    if not isinstance(body, dict):
        raise DecodeError("field 'e' must be a JSON object")
    device, reason = body.get("device"), body.get("reason", "")
    if not isinstance(device, str) or not _DEVICE_ID_RE.match(device):
        raise DecodeError(f"event: malformed device id {_brief(device)}")
    if not isinstance(reason, str):
        raise DecodeError("event: reason must be a string")
    state = body.get("availability")
    if not isinstance(state, str) or state not in _AVAILABILITIES:  # a list or object is unhashable
        raise DecodeError(f"event: unknown availability {_brief(state)}")
    availability = Availability(state)
    ts = _decode_ts(f"event ({device})", body.get("ts_us"))
    return AvailabilityEvent(device=DeviceId(device), ts=ts, availability=availability, reason=reason)


def encode_json_event(kind: bytes, body: Mapping[str, Any]) -> dict[bytes, bytes]:
    """Encode a JSON event (a ledger update, a quota alert, an alarm transition) for a stream."""
    return {
        FIELD_VERSION: VERSION,
        FIELD_TYPE: kind,
        FIELD_EVENT: json.dumps(body, ensure_ascii=False, allow_nan=False).encode(),
    }


def decode_json_event(fields: EntryFields, kind: bytes) -> dict[str, Any]:
    """Decode an entry made by :func:`encode_json_event` of type ``kind``; raise DecodeError otherwise."""
    raw = _field_map(fields)
    _check_version(raw)
    if raw.get(FIELD_TYPE) != kind:
        raise DecodeError(f"unsupported event type {_show(raw.get(FIELD_TYPE))}, expected {kind.decode()!r}")
    body = _load_json(raw, FIELD_EVENT)
    if not isinstance(body, dict):
        raise DecodeError("field 'e' must be a JSON object")
    return body


# --------------------------------------------------------------------------------------------------
# Shared helpers


def _field_map(fields: EntryFields) -> dict[bytes, bytes]:
    """Normalise fields to bytes, whether the client was made with ``decode_responses`` or not."""
    out: dict[bytes, bytes] = {}
    for key, value in fields.items():
        out[_as_bytes(key, "name")] = _as_bytes(value, "value")
    return out


def _as_bytes(item: object, what: str) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode("utf-8", errors="surrogatepass")  # a lone surrogate: refused as not UTF-8
    raise DecodeError(f"field {what} must be bytes or text, got {type(item).__name__}")


def _check_version(raw: Mapping[bytes, bytes]) -> None:
    version = raw.get(FIELD_VERSION)
    if version is None:
        raise DecodeError("missing field 'v' (format version)")
    if version != VERSION:
        raise DecodeError(f"unsupported format version {_show(version)} (expected '1')")


def _load_json(raw: Mapping[bytes, bytes], name: bytes) -> Any:
    data = raw.get(name)
    if data is None:
        raise DecodeError(f"missing field {name.decode()!r}")
    try:
        return json.loads(data, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueError
        raise DecodeError(f"field {name.decode()!r} is not valid JSON: {err}") from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _decode_ts(where: str, ts_us: Any) -> datetime:
    if isinstance(ts_us, bool) or not isinstance(ts_us, int):
        raise DecodeError(f"{where}: timestamp must be integer microseconds, got {_brief(ts_us)}")
    if not _MIN_TS_US <= ts_us < _MAX_TS_US:
        raise DecodeError(f"{where}: timestamp {ts_us} us is outside [2000-01-01, 2100-01-01)")
    return _EPOCH + timedelta(microseconds=ts_us)


def _to_epoch_us(ts: datetime) -> int:
    if ts.tzinfo is None:
        raise ValueError("timestamp must be timezone-aware")
    return (ts - _EPOCH) // _ONE_US


def _show(value: bytes | None) -> str:
    return "<missing>" if value is None else _brief(value.decode(errors="replace"))


def _brief(value: Any) -> str:
    """Return a short ``repr`` of a bad value for a decode error (see :data:`_BRIEF`)."""
    return _BRIEF.repr(value)
