"""Fuzz the stream entry decoders: any field map either decodes or raises a short DecodeError.

Consumers move an entry whose decoder raises :class:`DecodeError` to the dead-letter stream with the
message as the reason; any other exception leaves the entry pending for ever (it is retried after
every restart) or kills the stage. So for arbitrary field maps (arbitrary bytes, arbitrary JSON,
mutations of valid entries) every decoder must return a value or raise ``DecodeError`` with a
reason an operator can read; and the two readings decoders must agree entry by entry.

The strategies and ``check_*`` properties are plain module members so ``bench/parser_fuzz.py`` runs
the same properties with many more examples.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from scada.model import DecodeError, Reading
from streams.codec import decode_event, decode_json_event, decode_reading_rows, decode_readings
from streams.commands import decode_command, decode_result

MAX_REASON_CHARS = 600
"""A dead-letter reason is read by people: a decode error must stay short, whatever the input."""

FUZZ_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --------------------------------------------------------------------------------------------------
# Strategies

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=15,
)
POINT_IDS = st.sampled_from(["m1.p_kw", "a-b.c_d", "m1", "M1.P", ".x", "x.", "a.b.c", ""]) | st.text(
    max_size=12
)
TS_US = st.sampled_from([1767571200000000, 946684800000000, 4102444800000000, 0, -1]) | st.integers()


def _dumps(value: Any) -> bytes:
    """JSON as Python writes it, NaN and Infinity literals included (other writers may send them)."""
    return json.dumps(value, allow_nan=True).encode()


ROWS = st.lists(
    st.tuples(
        POINT_IDS | JSON_VALUES,
        TS_US | JSON_VALUES,
        st.floats() | st.none() | st.sampled_from(["NaN", "Infinity", "-Infinity", "nan"]) | JSON_VALUES,
        st.sampled_from([0, 1, 2, 3, -1, True]) | JSON_VALUES,
        st.none() | st.text(max_size=20) | JSON_VALUES,
    ).map(list)
    | JSON_VALUES,
    max_size=4,
)
RAW_FIELD = st.binary(max_size=60) | st.text(max_size=40) | JSON_VALUES.map(_dumps)


@st.composite
def readings_fields(draw: st.DrawFn) -> dict[Any, Any]:
    """A readings entry: usually well framed with fuzzed rows, sometimes arbitrary fields."""
    fields: dict[Any, Any] = {b"v": draw(st.sampled_from([b"1", "1", b"2", b""]) | st.binary(max_size=4))}
    fields[b"r"] = draw(ROWS.map(_dumps) | RAW_FIELD)
    if draw(st.booleans()):
        fields = {(k.decode() if isinstance(k, bytes) else k): v for k, v in fields.items()}
    for key in draw(st.lists(st.sampled_from([b"v", b"r", "v", "r"]), max_size=1)):
        fields.pop(key, None)
    fields.update(draw(st.dictionaries(st.binary(max_size=3) | st.text(max_size=3), RAW_FIELD, max_size=2)))
    return fields


@st.composite
def event_fields(draw: st.DrawFn) -> dict[Any, Any]:
    """An availability or JSON event entry with a fuzzed body."""
    body = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "device": st.sampled_from(["m1", "M1", "", "a" * 70]) | JSON_VALUES,
                "ts_us": TS_US | JSON_VALUES,
                "availability": st.sampled_from(["online", "offline", "stale", "gone"]) | JSON_VALUES,
                "reason": st.text(max_size=20) | JSON_VALUES,
            },
        )
        | JSON_VALUES
    )
    return {
        b"v": draw(st.sampled_from([b"1", b"2"])),
        b"type": draw(st.sampled_from([b"availability", b"ledger", b"\xff"]) | st.binary(max_size=5)),
        b"e": draw(st.just(_dumps(body)) | RAW_FIELD),
    }


@st.composite
def command_fields(draw: st.DrawFn, name: bytes) -> dict[Any, Any]:
    """A ``commands`` (name ``c``) or ``command_results`` (name ``r``) entry with a fuzzed body."""
    body = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "point": POINT_IDS | JSON_VALUES,
                "value": st.floats() | st.integers() | JSON_VALUES,
                "requested": st.floats() | st.integers() | JSON_VALUES,
                "readback": st.floats() | st.none() | JSON_VALUES,
                "priority": st.sampled_from([0, 10, 20, 30, 5, "10"]) | JSON_VALUES,
                "status": st.sampled_from(["verified", "rejected", "timeout", "bogus"]) | JSON_VALUES,
                "source": st.text(max_size=10) | JSON_VALUES,
                "reason": st.text(max_size=10) | JSON_VALUES,
                "correlation_id": st.text(max_size=10) | JSON_VALUES,
                "hold_until_us": st.none() | TS_US | JSON_VALUES,
                "ts_us": TS_US | JSON_VALUES,
                "elapsed_ms": st.floats() | JSON_VALUES,
            },
        )
        | JSON_VALUES
    )
    return {b"v": draw(st.sampled_from([b"1", "1", b"2"])), name: draw(st.just(_dumps(body)) | RAW_FIELD)}


# --------------------------------------------------------------------------------------------------
# Properties (plain functions: the bench runs them with many more examples)


def decodes_or_refuses(decode: Callable[[Mapping[Any, Any]], object], fields: Mapping[Any, Any]) -> object:
    """Return what ``decode`` made of ``fields``, or None after a short DecodeError; else fail."""
    try:
        return decode(fields)
    except DecodeError as err:
        reason = str(err)
        assert reason, "a DecodeError needs a reason"
        assert len(reason) <= MAX_REASON_CHARS, f"reason of {len(reason)} chars"
        return None


def check_readings_entry(fields: Mapping[Any, Any]) -> None:
    """Both readings decoders accept and refuse the same entries and agree on what they accept."""
    readings = decodes_or_refuses(decode_readings, fields)
    rows = decodes_or_refuses(decode_reading_rows, fields)
    assert (readings is None) == (rows is None), f"decoders disagree on {fields!r}"
    if isinstance(readings, list) and rows is not None:
        assert all(isinstance(r, Reading) for r in readings)
        assert [_key(r) for r in readings] == [_key(r) for r in rows]  # type: ignore[attr-defined]


def _key(reading: Reading) -> tuple[object, ...]:
    value = reading.value
    return (reading.point, reading.ts, "nan" if value != value else value, reading.quality)


def check_event_entry(fields: Mapping[Any, Any]) -> None:
    """Event decoders return an event or a dict, or raise a short DecodeError."""
    decodes_or_refuses(decode_event, fields)
    body = decodes_or_refuses(lambda f: decode_json_event(f, b"ledger"), fields)
    assert body is None or isinstance(body, dict)


def check_command_entry(fields: Mapping[Any, Any]) -> None:
    """The command decoder returns a Command with a finite value, or raises a short DecodeError."""
    command = decodes_or_refuses(decode_command, fields)
    if command is not None:
        value = command.value  # type: ignore[attr-defined]
        assert value == value
        assert abs(value) != float("inf")


def check_result_entry(fields: Mapping[Any, Any]) -> None:
    """The result decoder returns a CommandResult, or raises a short DecodeError."""
    decodes_or_refuses(decode_result, fields)


# --------------------------------------------------------------------------------------------------
# Tests

DEEP = b"[" * 50_000
NESTED_900 = b"[" * 900 + b"]" * 900


@FUZZ_SETTINGS
@given(readings_fields())
@example({b"v": b"1", b"r": DEEP})
@example({b"v": b"1", b"r": b'[["' + b"x" * 100_000 + b'",1767571200000000,1.0,2,null]]'})
@example({b"v": b"1", b"r": b"[[" + NESTED_900 + b",1767571200000000,1.0,2,null]]"})
@example({b"v": b"1", b"r": b'[["m1.p",1767571200000000,1' + b"0" * 400 + b",2,null]]"})
@example({"v": "1", "r": '[["m1.p",1767571200000000,"\ud800",2,null]]'})
@example({b"v": 1, b"r": b"[]"})
def test_readings_entries_decode_or_dead_letter(fields: dict[Any, Any]) -> None:
    check_readings_entry(fields)


@FUZZ_SETTINGS
@given(event_fields())
@example({b"v": b"1", b"type": b"availability", b"e": b'{"device":"m1","availability":[]}'})
@example({b"v": b"1", b"type": b"availability", b"e": b'{"device":"m1","availability":{"a":1}}'})
@example({b"v": b"1", b"type": b"ledger", b"e": DEEP})
@example({b"v": b"1", b"type": b"x" * 10_000, b"e": b"{}"})
def test_event_entries_decode_or_dead_letter(fields: dict[Any, Any]) -> None:
    check_event_entry(fields)


@FUZZ_SETTINGS
@given(command_fields(b"c"))
def test_command_entries_decode_or_dead_letter(fields: dict[Any, Any]) -> None:
    check_command_entry(fields)


@FUZZ_SETTINGS
@given(command_fields(b"r"))
def test_result_entries_decode_or_dead_letter(fields: dict[Any, Any]) -> None:
    check_result_entry(fields)


_VALID_COMMAND = {"point": "m1.p", "value": 1.0, "source": "s", "correlation_id": "c", "priority": 10}


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({b"v": b"1", b"c": DEEP}, id="deeply-nested-body"),
        pytest.param(
            {b"v": b"1", b"c": _dumps({**_VALID_COMMAND, "priority": float("inf")})}, id="priority-inf"
        ),
        pytest.param({b"v": b"1", b"c": _dumps({**_VALID_COMMAND, "value": 10**400})}, id="value-10e400"),
        pytest.param({b"v": b"1", b"r": DEEP}, id="deeply-nested-result"),
        pytest.param(
            {b"v": b"1", b"c": _dumps({**_VALID_COMMAND, "hold_until_us": 10**700})},
            id="hold-until-700-digits",
        ),
        pytest.param(
            {b"v": b"1", b"c": _dumps({**_VALID_COMMAND, "source": [["x" * 900]]})}, id="long-source"
        ),
        pytest.param({b"v": b"1", b"c": _dumps({**_VALID_COMMAND, "point": "m" * 900})}, id="long-point"),
    ],
)
def test_command_codec_known_crashes(fields: dict[Any, Any]) -> None:
    """Inputs that made the command-channel decoders raise something other than DecodeError."""
    check_command_entry(fields) if b"c" in fields else check_result_entry(fields)
