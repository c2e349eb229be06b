"""Fuzz the MQTT telemetry path: arbitrary bytes and JSON become readings or dead letters, never crashes.

Three layers, each with the invariant the rest of the server relies on:

- :func:`parse_telemetry` (pure): a usable message gives field values where good quality means a
  finite number the device really sent; anything else is a bad value with a reason, or the whole
  message is refused with a :class:`DecodeError` naming what is wrong.
- :meth:`MqttDriver.handle_message` (what gmqtt's callback calls): never raises; a message is
  either a batch of readings (good ones finite) or one dead-letter entry with a reason.
- A real Mosquitto connection (127.0.0.1:1883, a topic prefix of our own): garbage published on the
  device's telemetry topic is dead-lettered and the good message after it is still delivered.
"""

from __future__ import annotations

import asyncio
import json
import math
import uuid
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from protocols.mqtt.config import MqttDeviceConfig, MqttVersion
from protocols.mqtt.connection import MqttConnection, MqttMessage
from protocols.mqtt.driver import MqttDriver, MqttPointSpec
from protocols.mqtt.payload import MAX_PAYLOAD_BYTES, parse_response, parse_telemetry
from scada.model import DecodeError, PointId, QualityCode, Reading
from scada.runtime import SystemClock

NOW = datetime(2026, 3, 4, 2, 0, tzinfo=UTC)
NOW_MS = int(NOW.timestamp() * 1000)
KNOWN = frozenset({"p_kw", "v", "e_kwh"})
MAX_REASON_CHARS = 600

FUZZ_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --------------------------------------------------------------------------------------------------
# Strategies

NUMBERS = (
    st.integers()
    | st.integers(min_value=-(10**330), max_value=10**330)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([1e308, -1e308, 1.7976931348623157e308, 5e-324, -0.0, 10**309])
)
JSON_SCALARS = st.none() | st.booleans() | NUMBERS | st.text(max_size=20)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
TIMESTAMPS = (
    st.none()
    | st.integers(min_value=NOW_MS - 10**9, max_value=NOW_MS + 10**7)
    | st.sampled_from(
        [
            "2026-03-04T10:00:00+08:00",
            "2026-03-04T01:59:00Z",
            "2026-03-04T01:59:00",
            "0001-01-01T00:00:00+01:00",
            "9999-12-31T23:59:59-01:00",
            "not a time",
            1772589600,
            float("nan"),
            float("inf"),
            10**30,
            True,
        ]
    )
    | JSON_VALUES
)
FIELD_NAMES = st.sampled_from(sorted(KNOWN)) | st.text(max_size=6)
FIELD_OBJECTS = st.fixed_dictionaries(
    {},
    optional={
        "v": NUMBERS | JSON_VALUES,
        "q": st.sampled_from(["good", "uncertain", "bad", "GOOD", ""]) | JSON_VALUES,
        "ts": TIMESTAMPS,
    },
)
FIELD_VALUES = NUMBERS | FIELD_OBJECTS | JSON_VALUES
SAMPLES = st.fixed_dictionaries(
    {"values": st.dictionaries(FIELD_NAMES, FIELD_VALUES, max_size=5) | JSON_VALUES},
    optional={"ts": TIMESTAMPS},
)
DOCUMENTS = (
    SAMPLES
    | st.fixed_dictionaries({"samples": st.lists(SAMPLES | JSON_VALUES, max_size=3) | JSON_VALUES})
    | st.fixed_dictionaries({"heartbeat": st.just(True) | JSON_VALUES})
    | JSON_VALUES
)


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, allow_nan=True).encode()


PAYLOADS = (
    DOCUMENTS.map(_dumps)
    | st.binary(max_size=80)
    | st.text(max_size=60).map(lambda t: t.encode("utf-8", errors="surrogatepass"))
    | DOCUMENTS.map(_dumps).flatmap(lambda raw: st.integers(0, len(raw)).map(lambda n: raw[:n]))  # truncated
)

# --------------------------------------------------------------------------------------------------
# Properties


def _usable_number(raw: Any) -> bool:
    """Return True for a raw JSON value the codec must take as a good number."""
    if isinstance(raw, bool):
        return True
    if isinstance(raw, int):
        try:
            return math.isfinite(float(raw))
        except OverflowError:
            return False
    return isinstance(raw, float) and math.isfinite(raw)


def _may_be_good(raw: Any) -> bool:
    """Return True if a field's raw value is well formed enough to give a good reading."""
    if isinstance(raw, dict):
        return "v" in raw and raw.get("q", "good") == "good" and _usable_number(raw["v"])
    return _usable_number(raw)


def check_reason(err: DecodeError) -> None:
    """A refused message is dead-lettered with this reason: present and short."""
    assert str(err), "a DecodeError needs a reason"
    assert len(str(err)) <= MAX_REASON_CHARS, f"reason of {len(str(err))} chars"


def check_telemetry(payload: bytes, *, known: Collection[str] = KNOWN) -> None:
    """parse_telemetry returns well-formed values or raises a short DecodeError; nothing else."""
    try:
        telemetry = parse_telemetry(payload, received=NOW, known=known)
    except DecodeError as err:
        check_reason(err)
        return
    latest = NOW + timedelta(hours=1)
    for item in telemetry.values:
        assert item.field in known
        assert item.ts.tzinfo is not None
        assert datetime(2000, 1, 1, tzinfo=UTC) <= item.ts <= latest
        if item.value is None:
            assert item.quality.code is QualityCode.BAD
            assert item.quality.reason
        else:
            assert type(item.value) is float
            assert math.isfinite(item.value)
            assert item.quality.code is not QualityCode.BAD
    if telemetry.heartbeat:
        assert not telemetry.values
    # Good quality only for values the device sent as finite numbers (single-sample shape).
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError):
        return
    if isinstance(doc, dict) and isinstance(doc.get("values"), dict) and "samples" not in doc:
        for item in telemetry.values:
            if item.quality.code is QualityCode.GOOD:
                assert _may_be_good(doc["values"][item.field]), (item, doc["values"][item.field])


def check_response(payload: bytes) -> None:
    """parse_response returns a response with a finite value (or none), or a short DecodeError."""
    try:
        response = parse_response(payload, correlation_data=b"c-1")
    except DecodeError as err:
        check_reason(err)
        return
    assert response.correlation_id
    assert response.value is None or math.isfinite(response.value)


@dataclass
class DeadLetters:
    """A DeadLetterSink that keeps what it is given."""

    items: list[tuple[str, bytes, str]] = field(default_factory=list)

    def reject(self, *, origin: str, payload: bytes, reason: str) -> None:
        self.items.append((origin, payload, reason))


def make_driver(connection: MqttConnection, dead_letters: DeadLetters, prefix: str = "fuzz") -> MqttDriver:
    config = MqttDeviceConfig(
        telemetry_topic=f"{prefix}/{{device}}/telemetry",
        command_topic=f"{prefix}/{{device}}/command",
        response_topic=f"{prefix}/{{device}}/response",
        timeout_s=2.0,
    )
    specs = [
        MqttPointSpec(point=PointId("m1.p_kw"), field="p_kw", scale=1000.0),  # device sends MW
        MqttPointSpec(point=PointId("m1.v"), field="v"),
        MqttPointSpec(point=PointId("m1.v_kv"), field="v", scale=0.001, offset=-0.5),
    ]
    return MqttDriver(
        "m1",
        config,
        specs,
        connection=connection,
        clock=SystemClock(),
        dead_letters=dead_letters,
        queue_batches=4,
    )


def offline_connection(dead_letters: DeadLetters) -> MqttConnection:
    """A connection object that is never started: handle_message does not touch the broker."""
    return MqttConnection(
        "mqtt://127.0.0.1:1883",
        client_id=f"fuzz-{uuid.uuid4().hex[:8]}",
        version=MqttVersion.V5,
        timeout_s=1.0,
        dead_letters=dead_letters,
    )


def check_driver_message(
    driver: MqttDriver, dead_letters: DeadLetters, payload: bytes, *, retained: bool
) -> None:
    """handle_message never raises: one dead letter with a reason, or a batch whose good readings are finite."""
    rejected_before, dropped_before = len(dead_letters.items), driver.stats.dropped
    batches_before = list(driver._batches)
    driver.handle_message(MqttMessage(topic=driver.topics[0], payload=payload, retained=retained))
    if len(dead_letters.items) > rejected_before:
        assert len(dead_letters.items) == rejected_before + 1
        origin, kept, reason = dead_letters.items[-1]
        assert origin == f"mqtt:{driver.topics[0]}"
        assert kept == payload
        assert reason.startswith("telemetry: ")
        assert len(reason) > len("telemetry: ")
        return
    queued = list(driver._batches)
    assert len(queued) == min(len(batches_before) + 1, 4)
    assert driver.stats.dropped >= dropped_before
    for reading in queued[-1]:
        assert isinstance(reading, Reading)
        if reading.value is not None:
            assert math.isfinite(reading.value), reading
        else:
            assert reading.quality.code is QualityCode.BAD
            assert reading.quality.reason
        if retained:
            assert reading.quality.code is not QualityCode.GOOD


# --------------------------------------------------------------------------------------------------
# Tests

DEEP = b'{"values": {"p_kw": ' + b"[" * 100_000 + b"}}"


@FUZZ_SETTINGS
@given(PAYLOADS)
@example(DEEP)
@example(b'{"heartbeat": ' + b"[" * 900 + b"]" * 900 + b"}")
@example(b'{"values": {"p_kw": {"v": 1, "q": ' + b"[" * 900 + b"]" * 900 + b"}}}")
@example(b'{"values": {"p_kw": 1' + b"0" * 5000 + b"}}")
@example(b'{"values": {"p_kw": 1' + b"0" * 400 + b"}}")
@example(b'{"values": {"p_kw": 1e400, "v": -1e400, "e_kwh": NaN}}')
@example(b'{"ts": 1e400, "values": {"p_kw": 1}}')
@example(b'{"ts": "9999-12-31T23:59:59-01:00", "values": {"p_kw": 1}}')
@example(b'{"values": {"p_kw": 1}}' + b" " * MAX_PAYLOAD_BYTES)
@example('{"values": {"p_kw": "\ud800"}}'.encode("utf-8", errors="surrogatepass"))
@example(b'{"values": {"p_kw": "\\ud800"}}')
@example(b"\xef\xbb\xbf{}")
def test_telemetry_parses_or_refuses_with_a_reason(payload: bytes) -> None:
    check_telemetry(payload)


@FUZZ_SETTINGS
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "correlation_id": st.text(max_size=8) | JSON_VALUES,
            "status": st.sampled_from(["ok", "rejected"]) | JSON_VALUES,
            "reason": JSON_VALUES,
            "value": NUMBERS | JSON_VALUES,
        },
    ).map(_dumps)
    | PAYLOADS
)
@example(b'{"correlation_id": "c", "status": "ok", "value": 1' + b"0" * 400 + b"}")
@example(b'{"status": "ok", "reason": ' + b"[" * 900 + b"]" * 900 + b"}")
def test_command_responses_parse_or_refuse_with_a_reason(payload: bytes) -> None:
    check_response(payload)


@FUZZ_SETTINGS
@given(PAYLOADS, st.booleans())
def test_driver_turns_any_message_into_readings_or_a_dead_letter(payload: bytes, retained: bool) -> None:
    dead_letters = DeadLetters()
    driver = make_driver(offline_connection(dead_letters), dead_letters)
    check_driver_message(driver, dead_letters, payload, retained=retained)


def test_driver_never_scales_a_value_into_infinity() -> None:
    dead_letters = DeadLetters()
    driver = make_driver(offline_connection(dead_letters), dead_letters)
    check_driver_message(driver, dead_letters, b'{"values": {"p_kw": 1e307}}', retained=False)


GARBAGE = [
    b"",
    b"\xff\xfe\x00garbage",
    b"not json at all",
    b'{"values": {"p_kw": 1.5',  # truncated
    b"[" * 5_000,
    b'{"values": {"p_kw": 1' + b"0" * 5000 + b"}}",
    b'{"values": [1, 2, 3]}',
    b'{"heartbeat": "yes"}',
    b'{"ts": "yesterday", "values": {"p_kw": 1}}',
    b'{"ts": 1e400, "values": {"p_kw": 1}}',
    b"x" * (MAX_PAYLOAD_BYTES + 1),
]
ODD_BUT_USABLE = [
    b'{"values": {"p_kw": NaN, "v": "230"}}',  # two bad values, no dead letter
    b'{"values": {"p_kw": {"v": 1, "q": "weird"}, "v": null}}',
]


@pytest.fixture
async def broker_driver(mqtt_url: str) -> AsyncIterator[tuple[MqttConnection, MqttDriver, DeadLetters]]:
    dead_letters = DeadLetters()
    connection = MqttConnection(
        mqtt_url,
        client_id=f"scada-fuzz-{uuid.uuid4().hex[:8]}",
        version=MqttVersion.V5,
        timeout_s=3.0,
        dead_letters=dead_letters,
    )
    await connection.start()
    assert connection.connected, connection.last_error
    driver = make_driver(connection, dead_letters, prefix=f"scada-fuzz-{uuid.uuid4().hex[:10]}")
    try:
        await driver.connect()
        yield connection, driver, dead_letters
    finally:
        await driver.close()
        await connection.close()


async def test_garbage_over_a_real_broker_is_dead_lettered_and_the_driver_keeps_going(
    broker_driver: tuple[MqttConnection, MqttDriver, DeadLetters],
) -> None:
    connection, driver, dead_letters = broker_driver
    telemetry_topic = driver.topics[0]
    for payload in [*GARBAGE, *ODD_BUT_USABLE]:
        connection.publish(telemetry_topic, payload, qos=1)
    connection.publish(telemetry_topic, b'{"values": {"p_kw": 0.25, "v": 231}}', qos=1)

    batches: list[list[Reading]] = []
    async with asyncio.timeout(10):
        while not any(r.point == "m1.p_kw" and r.value == 250.0 for b in batches for r in b):
            batches.append(await driver.receive())

    assert len(dead_letters.items) == len(GARBAGE), [reason for _, _, reason in dead_letters.items]
    assert all(reason.startswith("telemetry: ") for _, _, reason in dead_letters.items)
    assert driver.stats.rejected == len(GARBAGE)
    odd = [r for batch in batches[:-1] for r in batch]
    assert odd
    assert all(r.quality.code is QualityCode.BAD and r.value is None for r in odd)
    good = {r.point: r for r in batches[-1]}
    assert good[PointId("m1.p_kw")].quality.code is QualityCode.GOOD
    assert good[PointId("m1.v")].value == 231.0
    assert good[PointId("m1.v_kv")].value == pytest.approx(231 * 0.001 - 0.5)
