"""The MQTT JSON codec: telemetry shapes, per-field problems, refused messages, responses, fuzzing."""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.mqtt.payload import (
    MAX_PAYLOAD_BYTES,
    encode_command,
    parse_response,
    parse_telemetry,
)
from scada.model import DecodeError, QualityCode

NOW = datetime(2026, 3, 4, 2, 0, tzinfo=UTC)
NOW_MS = int(NOW.timestamp() * 1000)
KNOWN = frozenset({"p_kw", "v", "e_kwh"})


def parse(doc: object) -> list[tuple[str, float | None, datetime, QualityCode, str]]:
    raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    telemetry = parse_telemetry(raw, received=NOW, known=KNOWN)
    return [(v.field, v.value, v.ts, v.quality.code, v.quality.reason) for v in telemetry.values]


GOOD, UNCERTAIN, BAD = QualityCode.GOOD, QualityCode.UNCERTAIN, QualityCode.BAD


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        pytest.param(
            {"ts": NOW_MS - 1000, "values": {"p_kw": 12.5, "v": 230}},
            [
                ("p_kw", 12.5, NOW - timedelta(seconds=1), GOOD, ""),
                ("v", 230.0, NOW - timedelta(seconds=1), GOOD, ""),
            ],
            id="epoch-ms-many-points",
        ),
        pytest.param(
            {"ts": "2026-03-04T09:59:00+08:00", "values": {"p_kw": 1}},
            [("p_kw", 1.0, NOW - timedelta(minutes=1), GOOD, "")],
            id="iso-with-zone",
        ),
        pytest.param(
            {"ts": "2026-03-04T01:59:00Z", "values": {"p_kw": 1}},
            [("p_kw", 1.0, NOW - timedelta(minutes=1), GOOD, "")],
            id="iso-zulu",
        ),
        pytest.param({"values": {"p_kw": 3}}, [("p_kw", 3.0, NOW, GOOD, "")], id="no-ts-is-receive-time"),
        pytest.param({"values": {"p_kw": True}}, [("p_kw", 1.0, NOW, GOOD, "")], id="bool-is-1"),
        pytest.param({"values": {"p_kw": None}}, [("p_kw", None, NOW, BAD, "device sent null")], id="null"),
        pytest.param(
            {"values": {"p_kw": "12.5"}},
            [("p_kw", None, NOW, BAD, "expected a number, got a string")],
            id="string-is-bad-quality",
        ),
        pytest.param(
            {"values": {"p_kw": [1]}, "ts": NOW_MS},
            [("p_kw", None, NOW, BAD, "expected a number, got a list")],
            id="list-is-bad-quality",
        ),
        pytest.param(
            b'{"values": {"p_kw": NaN, "v": 1e400}}',
            [
                ("p_kw", None, NOW, BAD, "not a finite number (nan)"),
                ("v", None, NOW, BAD, "not a finite number (inf)"),
            ],
            id="nan-and-overflow",
        ),
        pytest.param(
            b'{"values": {"p_kw": 1' + b"0" * 400 + b', "v": -7}}',
            [("p_kw", None, NOW, BAD, "number too large"), ("v", -7.0, NOW, GOOD, "")],
            id="huge-integer",
        ),
        pytest.param(
            {"values": {"p_kw": {"v": 2, "ts": NOW_MS - 5000, "q": "uncertain"}, "v": {"v": 3, "q": "bad"}}},
            [
                ("p_kw", 2.0, NOW - timedelta(seconds=5), UNCERTAIN, "device reports uncertain quality"),
                ("v", None, NOW, BAD, "device reports bad quality"),
            ],
            id="per-field-ts-and-quality",
        ),
        pytest.param(
            {"values": {"p_kw": {"v": 2, "q": "meh"}, "v": {"ts": NOW_MS}}},
            [
                ("p_kw", None, NOW, BAD, "unknown quality 'meh'"),
                ("v", None, NOW, BAD, "field object without 'v'"),
            ],
            id="per-field-problems",
        ),
        pytest.param(
            {
                "samples": [
                    {"ts": NOW_MS - 2000, "values": {"p_kw": 1}},
                    {"ts": NOW_MS - 1000, "values": {"p_kw": 2}},
                ]
            },
            [
                ("p_kw", 1.0, NOW - timedelta(seconds=2), GOOD, ""),
                ("p_kw", 2.0, NOW - timedelta(seconds=1), GOOD, ""),
            ],
            id="samples",
        ),
        pytest.param({"values": {}}, [], id="empty-values"),
        pytest.param(
            {"values": {"p_kw": 1}, "device": "m1", "seq": 7}, [("p_kw", 1.0, NOW, GOOD, "")], id="extra-keys"
        ),
    ],
)
def test_telemetry_shapes(
    doc: object, expected: list[tuple[str, float | None, datetime, QualityCode, str]]
) -> None:
    assert parse(doc) == expected


def test_unknown_fields_are_counted_and_skipped() -> None:
    raw = json.dumps({"samples": [{"values": {"p_kw": 1, "x": 2}}, {"values": {"x": 3, "y": 4}}]}).encode()
    telemetry = parse_telemetry(raw, received=NOW, known=KNOWN)
    assert [v.field for v in telemetry.values] == ["p_kw"]
    assert telemetry.unknown_fields == 3


def test_heartbeat() -> None:
    telemetry = parse_telemetry(b'{"heartbeat": true}', received=NOW, known=KNOWN)
    assert telemetry.heartbeat
    assert telemetry.values == ()


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "empty payload"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b'{"values": {"p_kw": 1', "truncated JSON"),
        (b"hello", "not JSON"),
        (b"[1, 2]", "expected a JSON object, got a list"),
        (b'"values"', "expected a JSON object, got a string"),
        (b"{}", "expected 'values', 'samples' or 'heartbeat'"),
        (b'{"values": [1]}', "values: expected an object, got a list"),
        (b'{"values": {}, "samples": []}', "either 'values' or 'samples'"),
        (b'{"samples": {"values": {}}}', "'samples' must be a list"),
        (b'{"samples": [1]}', "samples[0]: expected an object"),
        (b'{"samples": [{"values": {}}, {"values": 3}]}', "samples[1].values: expected an object"),
        (b'{"heartbeat": "yes"}', "'heartbeat' must be true"),
        (b'{"ts": "yesterday", "values": {}}', "ts: 'yesterday' is not an ISO-8601 time"),
        (b'{"ts": "2026-03-04T02:00:00", "values": {}}', "has no time zone"),
        (b'{"ts": 1772589600, "values": {}}', "before 2000-01-01 (epoch seconds sent as milliseconds?)"),
        (b'{"ts": 1e300, "values": {}}', "out of range"),
        (b'{"ts": true, "values": {}}', "expected an ISO-8601 string or epoch milliseconds, got a boolean"),
        (b'{"ts": "2030-01-01T00:00:00Z", "values": {}}', "too far in the future"),
        (b'{"values": {"p_kw": {"v": 1, "ts": "2099-01-01T00:00:00Z"}}}', "values.p_kw.ts: "),
        (b"[" * 200_000 + b"]" * 200_000, "larger than"),
        (b"[" * 50_000 + b"]" * 50_000, "nested too deep"),
        (b'{"values": {"p_kw": ' + b"9" * 5000 + b"}}", "not JSON"),
    ],
)
def test_refused_messages(raw: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        parse_telemetry(raw, received=NOW, known=KNOWN)
    assert reason in str(info.value)


def test_size_limit_is_checked_before_parsing() -> None:
    raw = json.dumps({"values": {"p_kw": 1, "pad": "x" * MAX_PAYLOAD_BYTES}}).encode()
    with pytest.raises(DecodeError, match="larger than"):
        parse_telemetry(raw, received=NOW, known=KNOWN)


def test_command_round_trip() -> None:
    body = encode_command(correlation_id="c-1", field="sp", value=21.5, ts=NOW)
    assert json.loads(body) == {"correlation_id": "c-1", "point": "sp", "value": 21.5, "ts": NOW.isoformat()}


@pytest.mark.parametrize(
    ("raw", "correlation_data", "expected"),
    [
        (b'{"correlation_id": "c1", "status": "ok", "value": 5}', None, ("c1", True, "", 5.0)),
        (b'{"status": "ok"}', b"c2", ("c2", True, "", None)),
        (
            b'{"correlation_id": "c3", "status": "rejected", "reason": "locked out"}',
            None,
            ("c3", False, "locked out", None),
        ),
        (
            b'{"correlation_id": "c4", "status": "rejected", "reason": {"code": 3}}',
            None,
            ("c4", False, '{"code": 3}', None),
        ),
    ],
)
def test_responses(
    raw: bytes, correlation_data: bytes | None, expected: tuple[str, bool, str, float | None]
) -> None:
    response = parse_response(raw, correlation_data=correlation_data)
    assert (response.correlation_id, response.ok, response.reason, response.value) == expected


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"status": "ok"}', "without a correlation id"),
        (b'{"correlation_id": "c", "status": "done"}', "'status' must be"),
        (b'{"correlation_id": "c", "status": "ok", "value": "x"}', "expected a number"),
        (b"[]", "expected a JSON object"),
    ],
)
def test_refused_responses(raw: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        parse_response(raw)
    assert reason in str(info.value)


_json = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=True) | st.integers() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
_field_value = st.one_of(
    _json,
    st.fixed_dictionaries(
        {"v": _json},
        optional={
            "ts": st.one_of(st.integers(), st.floats(), st.text(max_size=30)),
            "q": st.text(max_size=10),
        },
    ),
)
_shaped = st.fixed_dictionaries(
    {"values": st.dictionaries(st.sampled_from(["p_kw", "v", "other"]), _field_value, max_size=4)},
    optional={"ts": st.one_of(st.integers(), st.floats(), st.text(max_size=30), st.datetimes().map(str))},
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_no_bytes_crash_the_parser(raw: bytes) -> None:
    with contextlib.suppress(DecodeError):
        parse_telemetry(raw, received=NOW, known=KNOWN)


@settings(max_examples=500, deadline=None)
@given(st.one_of(_json, _shaped, st.fixed_dictionaries({"samples": st.lists(_shaped | _json, max_size=3)})))
def test_no_json_crashes_the_parser(doc: object) -> None:
    raw = json.dumps(doc).encode()
    try:
        telemetry = parse_telemetry(raw, received=NOW, known=KNOWN)
    except DecodeError:
        return
    for value in telemetry.values:
        assert value.ts.tzinfo is not None
        assert (value.value is None) == (value.quality.code is QualityCode.BAD)


@settings(max_examples=200, deadline=None)
@given(_json, st.one_of(st.none(), st.binary(max_size=10)))
def test_no_json_crashes_the_response_parser(doc: object, correlation_data: bytes | None) -> None:
    with contextlib.suppress(DecodeError):
        parse_response(json.dumps(doc).encode(), correlation_data=correlation_data)
