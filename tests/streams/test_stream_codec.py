"""The stream entry codec: lossless round trips, and a clear DecodeError for anything malformed."""

from __future__ import annotations

import math
import struct
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scada.model import (
    Availability,
    AvailabilityEvent,
    DecodeError,
    DeviceId,
    PointId,
    Quality,
    QualityCode,
    Reading,
)
from streams.codec import (
    MAX_TS,
    MIN_TS,
    decode_event,
    decode_readings,
    encode_event,
    encode_readings,
    encode_row,
)

_ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"
_ID = st.builds(str.__add__, st.sampled_from(_ALNUM), st.text(alphabet=_ALNUM + "_-", max_size=20))
_ZONES = st.sampled_from([UTC, timezone(timedelta(hours=8)), timezone(timedelta(hours=-5, minutes=-30))])
_TS = st.datetimes(
    min_value=MIN_TS.replace(tzinfo=None) + timedelta(days=1),
    max_value=MAX_TS.replace(tzinfo=None) - timedelta(days=1),
    timezones=_ZONES,
)


@st.composite
def readings(draw: st.DrawFn) -> Reading:
    code = draw(st.sampled_from(QualityCode))
    value = draw(st.floats(allow_nan=True, allow_infinity=True))
    if code is QualityCode.BAD:
        value = draw(st.one_of(st.none(), st.just(value)))
    reason = draw(st.text(max_size=40))
    return Reading(
        point=PointId(f"{draw(_ID)}.{draw(_ID)}"),
        ts=draw(_TS),
        value=value,
        quality=Quality(code, reason),
    )


def _bits(value: float | None) -> bytes | None:
    """Compare floats bit for bit (so -0.0 differs from 0.0), with every NaN payload as one NaN."""
    if value is None:
        return None
    return b"nan" if math.isnan(value) else struct.pack("<d", value)


@given(st.lists(readings(), max_size=30))
def test_readings_round_trip(batch: list[Reading]) -> None:
    decoded = decode_readings(encode_readings(batch))
    assert [(r.point, r.ts, r.quality) for r in decoded] == [(r.point, r.ts, r.quality) for r in batch]
    assert [_bits(r.value) for r in decoded] == [_bits(r.value) for r in batch]
    assert all(r.ts.tzinfo is UTC for r in decoded)


@given(st.lists(readings(), max_size=5))
def test_round_trip_with_decoded_responses(batch: list[Reading]) -> None:
    """A client made with ``decode_responses=True`` hands over str fields; they decode the same."""
    fields = {k.decode(): v.decode() for k, v in encode_readings(batch).items()}
    assert [r.point for r in decode_readings(fields)] == [r.point for r in batch]


@given(
    device=_ID,
    ts=_TS,
    availability=st.sampled_from(Availability),
    reason=st.text(max_size=40),
)
def test_event_round_trip(device: str, ts: datetime, availability: Availability, reason: str) -> None:
    event = AvailabilityEvent(device=DeviceId(device), ts=ts, availability=availability, reason=reason)
    assert decode_event(encode_event(event)) == event


def test_non_finite_values_travel_as_standard_json() -> None:
    ts = datetime(2026, 1, 5, tzinfo=UTC)
    batch = [Reading(point=PointId("m1.x"), ts=ts, value=v) for v in (math.nan, math.inf, -math.inf)]
    fields = encode_readings(batch)
    assert b"NaN" in fields[b"r"]
    assert b'"NaN"' in fields[b"r"]  # a JSON string, not the non-standard bare token
    values = [r.value for r in decode_readings(fields)]
    assert math.isnan(values[0])
    assert values[1:] == [math.inf, -math.inf]


_GOOD_ROW = '["m1.power_kw",1767571200000000,1.5,2,null]'


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "missing field 'v'"),
        ({b"v": b"2", b"r": b"[]"}, "unsupported format version '2'"),
        ({b"v": b"1"}, "missing field 'r'"),
        ({b"v": b"1", b"r": b"[[1,"}, "not valid JSON"),
        ({b"v": b"1", b"r": b"\xff\xfe"}, "not valid JSON"),
        ({b"v": b"1", b"r": b"[NaN]"}, "not valid JSON"),
        ({b"v": b"1", b"r": b"{}"}, "must be a JSON array"),
        ({b"v": b"1", b"r": b"[1]"}, "row 0: expected [point, ts_us, value, quality, reason]"),
        ({b"v": b"1", b"r": b'[["m1.p",1767571200000000,1.0,2]]'}, "expected [point"),
        ({b"v": b"1", b"r": f'[{_GOOD_ROW},["M1.P",1767571200000000,1,2,null]]'.encode()}, "row 1: malf"),
        ({b"v": b"1", b"r": b'[["m1",1767571200000000,1.0,2,null]]'}, "malformed point id 'm1'"),
        ({b"v": b"1", b"r": b"[[7,1767571200000000,1.0,2,null]]"}, "malformed point id 7"),
        ({b"v": b"1", b"r": b'[["m1.p",1767571200.5,1.0,2,null]]'}, "integer microseconds"),
        ({b"v": b"1", b"r": b'[["m1.p",true,1.0,2,null]]'}, "integer microseconds"),
        ({b"v": b"1", b"r": b'[["m1.p","2026-01-05",1.0,2,null]]'}, "integer microseconds"),
        ({b"v": b"1", b"r": b'[["m1.p",1767571200,1.0,2,null]]'}, "outside [2000-01-01"),  # seconds
        ({b"v": b"1", b"r": b'[["m1.p",1767571200000000000,1.0,2,null]]'}, "outside"),  # nanoseconds
        ({b"v": b"1", b"r": b'[["m1.p",-5,1.0,2,null]]'}, "outside"),
        ({b"v": b"1", b"r": b'[["m1.p",1767571200000000,"1.5",2,null]]'}, "number or null, got '1.5'"),
        ({b"v": b"1", b"r": b'[["m1.p",1767571200000000,true,2,null]]'}, "got a boolean"),
        ({b"v": b"1", b"r": b'[["m1.p",1767571200000000,' + b"9" * 400 + b",2,null]]"}, "overflows"),
        ({b"v": b"1", b"r": b'[["m1.p",1767571200000000,null,2,null]]'}, "value is null but quality is GOOD"),
        ({b"v": b"1", b"r": b'[["m1.p",1767571200000000,null,1,"x"]]'}, "null but quality is UNCERTAIN"),
        ({b"v": b"1", b"r": b'[["m1.p",1767571200000000,1.0,3,null]]'}, "quality must be 0, 1 or 2"),
        ({b"v": b"1", b"r": b'[["m1.p",1767571200000000,1.0,"2",null]]'}, "quality must be"),
        ({b"v": b"1", b"r": b'[["m1.p",1767571200000000,1.0,false,null]]'}, "quality must be"),
        ({b"v": b"1", b"r": b'[["m1.p",1767571200000000,1.0,0,5]]'}, "reason must be null or a string"),
    ],
)
def test_malformed_readings_entries(fields: dict[bytes, bytes], message: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode_readings(fields)
    assert message in str(info.value)


def test_deeply_nested_json_is_a_decode_error() -> None:
    with pytest.raises(DecodeError, match="not valid JSON"):
        decode_readings({b"v": b"1", b"r": b"[" * 100_000 + b"]" * 100_000})


@pytest.mark.parametrize(
    ("reading", "message"),
    [
        (Reading(point=PointId("M1.P"), ts=datetime(2026, 1, 5, tzinfo=UTC), value=1.0), "malformed point"),
        (Reading(point=PointId("m1.p"), ts=datetime(1970, 1, 2, tzinfo=UTC), value=1.0), "out of range"),
        (Reading(point=PointId("m1.p"), ts=datetime(2150, 1, 2, tzinfo=UTC), value=1.0), "out of range"),
    ],
)
def test_encode_refuses_what_could_not_be_decoded(reading: Reading, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode_row(reading)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({b"v": b"1", b"e": b"{}"}, "unsupported event type <missing>"),
        ({b"v": b"1", b"type": b"alarm", b"e": b"{}"}, "unsupported event type 'alarm'"),
        ({b"v": b"1", b"type": b"availability"}, "missing field 'e'"),
        ({b"v": b"1", b"type": b"availability", b"e": b"[]"}, "must be a JSON object"),
        (
            {b"v": b"1", b"type": b"availability", b"e": b'{"device":"M","ts_us":1767571200000000}'},
            "malformed device id",
        ),
        (
            {
                b"v": b"1",
                b"type": b"availability",
                b"e": b'{"device":"m1","ts_us":1767571200000000,"availability":"gone"}',
            },
            "unknown availability 'gone'",
        ),
        (
            {b"v": b"1", b"type": b"availability", b"e": b'{"device":"m1","ts_us":1,"availability":"stale"}'},
            "outside",
        ),
    ],
)
def test_malformed_events(fields: dict[bytes, bytes], message: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode_event(fields)
    assert message in str(info.value)
