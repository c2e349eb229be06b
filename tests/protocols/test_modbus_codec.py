"""Register codec and block compiler: known vectors, round trips, and block properties."""

from __future__ import annotations

import itertools
import math
import struct

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from protocols.modbus.codec import (
    MAX_BITS_PER_READ,
    EncodeError,
    compile_blocks,
    compile_decoder,
    decode_point,
    decode_raw,
    encode_point,
    encode_raw,
    from_engineering,
)
from protocols.modbus.config import ByteOrder, DataType, ModbusPointConfig, RegisterTable, WordOrder
from simulators.modbus_server import SimulatedPoint, decode_value, encode_value

BIG, LITTLE = WordOrder.BIG, WordOrder.LITTLE
BBIG, BLITTLE = ByteOrder.BIG, ByteOrder.LITTLE


@pytest.mark.parametrize(
    ("data_type", "word_order", "byte_order", "registers", "raw"),
    [
        (DataType.UINT16, BIG, BBIG, [0x1234], 0x1234),
        (DataType.UINT16, BIG, BLITTLE, [0x3412], 0x1234),
        (DataType.INT16, BIG, BBIG, [0xFFFE], -2),
        (DataType.UINT32, BIG, BBIG, [0x1234, 0x5678], 0x12345678),
        (DataType.UINT32, LITTLE, BBIG, [0x5678, 0x1234], 0x12345678),
        (DataType.UINT32, BIG, BLITTLE, [0x3412, 0x7856], 0x12345678),
        (DataType.UINT32, LITTLE, BLITTLE, [0x7856, 0x3412], 0x12345678),
        (DataType.INT32, BIG, BBIG, [0xFFFF, 0xFFFF], -1),
        (DataType.INT64, BIG, BBIG, [0x8000, 0, 0, 0], -(2**63)),
        (DataType.UINT64, LITTLE, BBIG, [0x0008, 0x0007, 0x0006, 0x0005], 0x0005000600070008),
        (DataType.FLOAT32, BIG, BBIG, [0x42F6, 0xE979], struct.unpack(">f", bytes.fromhex("42f6e979"))[0]),
        (
            DataType.FLOAT32,
            LITTLE,
            BLITTLE,
            [0x79E9, 0xF642],
            struct.unpack(">f", bytes.fromhex("42f6e979"))[0],
        ),
        (DataType.FLOAT64, BIG, BBIG, [0x4059, 0x0000, 0x0000, 0x0000], 100.0),
        (DataType.BOOL, BIG, BBIG, [1], 1),
    ],
)
def test_known_vectors(
    data_type: DataType, word_order: WordOrder, byte_order: ByteOrder, registers: list[int], raw: float
) -> None:
    assert decode_raw(registers, data_type, word_order=word_order, byte_order=byte_order) == raw
    assert encode_raw(raw, data_type, word_order=word_order, byte_order=byte_order) == registers


@pytest.mark.parametrize(
    ("value", "data_type", "scale", "offset", "expected"),
    [
        (230.1, DataType.UINT16, 0.1, 0.0, 2301),
        (0.939, DataType.INT16, 0.001, 0.0, 939),
        (-0.5, DataType.INT16, 0.001, 0.0, -500),
        (2.5, DataType.UINT16, 1.0, 0.0, 3),  # half away from zero, as people round
        (-2.5, DataType.INT16, 1.0, 0.0, -3),
        (20.0, DataType.UINT16, 0.5, -40.0, 120),
        (1.0, DataType.BOOL, 1.0, 0.0, 1),
        (12.75, DataType.FLOAT32, 1.0, 0.0, 12.75),
    ],
)
def test_from_engineering(
    value: float, data_type: DataType, scale: float, offset: float, expected: float
) -> None:
    assert from_engineering(value, data_type, scale=scale, offset=offset) == expected


@pytest.mark.parametrize(
    ("value", "data_type", "scale", "message"),
    [
        (7000.0, DataType.UINT16, 0.1, "out of range for uint16 with scale 0.1: 0..6553.5"),
        (-1.0, DataType.UINT32, 1.0, "out of range for uint32"),
        (40000.0, DataType.INT16, 1.0, "out of range for int16"),
        (2.0, DataType.BOOL, 1.0, "out of range for bool"),
        (math.nan, DataType.FLOAT32, 1.0, "not a finite number"),
        (math.inf, DataType.UINT16, 1.0, "not a finite number"),
        (1e39, DataType.FLOAT32, 1.0, "does not fit float32"),
    ],
)
def test_encode_refuses_values_that_do_not_fit(
    value: float, data_type: DataType, scale: float, message: str
) -> None:
    config = ModbusPointConfig(
        table=RegisterTable.COIL if data_type is DataType.BOOL else RegisterTable.HOLDING,
        address=0,
        type=data_type,
    )
    with pytest.raises(EncodeError, match=message):
        encode_point(value, config, scale=scale)


def test_nan_in_float_registers_decodes_to_nan_not_an_error() -> None:
    config = ModbusPointConfig(address=0, type=DataType.FLOAT32)
    assert math.isnan(decode_point([0x7FC0, 0x0000], config))
    assert math.isinf(decode_point([0x7F80, 0x0000], config, scale=2.0))


def test_decode_checks_register_count_and_range() -> None:
    with pytest.raises(ValueError, match="needs 2 registers"):
        decode_raw([1], DataType.FLOAT32)
    with pytest.raises(ValueError, match="16-bit"):
        decode_raw([70000], DataType.UINT16)


# --------------------------------------------------------------------------------------------------
# Round trips

REGISTER_TYPES = [t for t in DataType if t is not DataType.BOOL]
INT_BOUNDS = {
    DataType.INT16: (-(2**15), 2**15 - 1),
    DataType.UINT16: (0, 2**16 - 1),
    DataType.INT32: (-(2**31), 2**31 - 1),
    DataType.UINT32: (0, 2**32 - 1),
    DataType.INT64: (-(2**63), 2**63 - 1),
    DataType.UINT64: (0, 2**64 - 1),
}


@st.composite
def typed_raw(draw: st.DrawFn) -> tuple[DataType, WordOrder, ByteOrder, int | float]:
    data_type = draw(st.sampled_from(REGISTER_TYPES))
    word_order = draw(st.sampled_from(list(WordOrder)))
    byte_order = draw(st.sampled_from(list(ByteOrder)))
    raw: int | float
    if data_type in INT_BOUNDS:
        low, high = INT_BOUNDS[data_type]
        raw = draw(st.integers(low, high))
    elif data_type is DataType.FLOAT32:
        raw = draw(st.floats(width=32, allow_nan=False))
    else:
        raw = draw(st.floats(allow_nan=False))
    return data_type, word_order, byte_order, raw


@given(typed_raw())
def test_raw_round_trip(case: tuple[DataType, WordOrder, ByteOrder, int | float]) -> None:
    data_type, word_order, byte_order, raw = case
    registers = encode_raw(raw, data_type, word_order=word_order, byte_order=byte_order)
    assert len(registers) == data_type.register_count
    assert all(0 <= r <= 0xFFFF for r in registers)
    assert decode_raw(registers, data_type, word_order=word_order, byte_order=byte_order) == raw


@given(
    data_type=st.sampled_from(REGISTER_TYPES),
    word_order=st.sampled_from(list(WordOrder)),
    byte_order=st.sampled_from(list(ByteOrder)),
    scale=st.sampled_from([0.001, 0.01, 0.1, 0.5, 1.0, 10.0, 3.7]),
    offset=st.sampled_from([0.0, -40.0, 100.0]),
    words=st.lists(st.integers(0, 0xFFFF), min_size=4, max_size=4),
    lead=st.integers(0, 3),
)
@example(DataType.FLOAT32, WordOrder.BIG, ByteOrder.BIG, 1.0, 0.0, [0x7FC0, 0, 0, 0], 0)  # NaN stays NaN
def test_compiled_decoder_equals_decode_point(
    data_type: DataType,
    word_order: WordOrder,
    byte_order: ByteOrder,
    scale: float,
    offset: float,
    words: list[int],
    lead: int,
) -> None:
    """The hot-path decoder reads the answer's bytes; it must give exactly decode_point's value."""
    registers = words[: data_type.register_count]
    config = ModbusPointConfig(address=0, type=data_type, word_order=word_order, byte_order=byte_order)
    expected = decode_point(registers, config, scale=scale, offset=offset)
    data = bytes(2 * lead) + struct.pack(f">{len(registers)}H", *registers) + b"\xff\xff"
    got = compile_decoder(data_type, word_order, byte_order, scale, offset)(data, 2 * lead)
    assert got == expected or (math.isnan(got) and math.isnan(expected))


def test_compiled_decoders_are_shared_and_refuse_bits() -> None:
    assert compile_decoder(DataType.FLOAT32) is compile_decoder(DataType.FLOAT32)
    with pytest.raises(ValueError, match="bits"):
        compile_decoder(DataType.BOOL)


@given(
    data_type=st.sampled_from([DataType.INT16, DataType.UINT16, DataType.INT32, DataType.UINT32]),
    word_order=st.sampled_from(list(WordOrder)),
    scale=st.sampled_from([0.001, 0.01, 0.1, 0.5, 1.0, 10.0]),
    offset=st.sampled_from([0.0, -40.0, 100.0]),
    value=st.floats(-1e6, 1e6),
)
def test_engineering_round_trip_is_within_half_a_step(
    data_type: DataType, word_order: WordOrder, scale: float, offset: float, value: float
) -> None:
    config = ModbusPointConfig(address=0, type=data_type, word_order=word_order)
    try:
        registers = encode_point(value, config, scale=scale, offset=offset)
    except EncodeError:
        low, high = INT_BOUNDS[data_type]
        raw = (value - offset) / scale
        assert raw < low - 0.5 or raw > high + 0.5 - 1e-6
        return
    assert abs(decode_point(registers, config, scale=scale, offset=offset) - value) <= scale / 2 + 1e-9 * abs(
        value
    )


@given(typed_raw())
@example((DataType.INT64, WordOrder.BIG, ByteOrder.BIG, 2**52 + 1))  # +0.5 would round it to 2**52 + 2
def test_simulator_encoder_agrees_with_driver_codec(
    case: tuple[DataType, WordOrder, ByteOrder, int | float],
) -> None:
    """The simulators carry their own encoder (import rule); both must read the wire the same way."""
    data_type, word_order, byte_order, raw = case
    point = SimulatedPoint(
        key="k", address=0, type=data_type.value, word_order=word_order.value, byte_order=byte_order.value
    )
    registers = encode_raw(raw, data_type, word_order=word_order, byte_order=byte_order)
    assert decode_value(registers, point) == float(raw)
    if abs(raw) < 2**53:  # beyond that a float cannot carry a 64-bit integer exactly
        assert encode_value(float(raw), point) == registers


# --------------------------------------------------------------------------------------------------
# Block compilation


def holding(address: int, data_type: DataType = DataType.UINT16) -> ModbusPointConfig:
    return ModbusPointConfig(address=address, type=data_type)


def coil(address: int) -> ModbusPointConfig:
    return ModbusPointConfig(table=RegisterTable.COIL, address=address, type=DataType.BOOL)


@pytest.mark.parametrize(
    ("points", "max_block", "max_gap", "expected"),
    [
        ({"a": holding(0, DataType.FLOAT32), "b": holding(2, DataType.FLOAT32)}, 125, 0, [("holding", 0, 4)]),
        ({"a": holding(0), "b": holding(5)}, 125, 3, [("holding", 0, 1), ("holding", 5, 1)]),
        ({"a": holding(0), "b": holding(5)}, 125, 4, [("holding", 0, 6)]),
        ({"a": holding(0), "b": holding(3, DataType.FLOAT32)}, 4, 10, [("holding", 0, 1), ("holding", 3, 2)]),
        ({"a": holding(0), "b": holding(3, DataType.FLOAT32)}, 5, 10, [("holding", 0, 5)]),
        (
            {"c": coil(10), "h": holding(10), "i": ModbusPointConfig(table=RegisterTable.INPUT, address=10)},
            125,
            10,
            [("holding", 10, 1), ("input", 10, 1), ("coil", 10, 1)],
        ),
        ({"c1": coil(0), "c2": coil(1999)}, 1, 2000, [("coil", 0, 2000)]),  # bit tables: up to 2000 bits
        ({"c1": coil(0), "c2": coil(2000)}, 1, 2000, [("coil", 0, 1), ("coil", 2000, 1)]),
        ({}, 125, 10, []),
    ],
)
def test_compile_blocks(
    points: dict[str, ModbusPointConfig], max_block: int, max_gap: int, expected: list[tuple[str, int, int]]
) -> None:
    blocks = compile_blocks(points, max_block_registers=max_block, max_gap_registers=max_gap)
    assert [(b.table.value, b.address, b.count) for b in blocks] == expected


def test_compile_blocks_refuses_a_point_wider_than_a_block() -> None:
    with pytest.raises(ValueError, match="needs 4 registers but max_block_registers is 2"):
        compile_blocks({"e": holding(0, DataType.FLOAT64)}, max_block_registers=2, max_gap_registers=0)


@st.composite
def register_maps(draw: st.DrawFn) -> dict[int, ModbusPointConfig]:
    """Non-overlapping points spread over the four tables."""
    points: dict[int, ModbusPointConfig] = {}
    for table in RegisterTable:
        address = draw(st.integers(0, 50))
        for _ in range(draw(st.integers(0, 12))):
            data_type = DataType.BOOL if table.is_bit else draw(st.sampled_from(REGISTER_TYPES))
            points[len(points)] = ModbusPointConfig(table=table, address=address, type=data_type)
            address += data_type.register_count + draw(st.integers(0, 30))
    return points


@given(register_maps(), st.integers(4, 125), st.integers(0, 40))
def test_blocks_cover_every_point_once_within_limits(
    points: dict[int, ModbusPointConfig], max_block: int, max_gap: int
) -> None:
    blocks = compile_blocks(points, max_block_registers=max_block, max_gap_registers=max_gap)
    members = [key for block in blocks for key, _ in block.members]
    assert sorted(members) == sorted(points)
    for block in blocks:
        limit = MAX_BITS_PER_READ if block.table.is_bit else max_block
        assert 1 <= block.count <= limit
        previous_end = block.address
        for _, config in block.members:
            assert config.table is block.table
            assert block.address <= config.address
            assert config.end <= block.end
            assert config.address - previous_end <= max_gap
            previous_end = config.end
        assert previous_end == block.end
    for first, second in itertools.pairwise(blocks):
        if first.table is second.table:
            assert first.end <= second.address


def test_words_of_slices_one_member() -> None:
    [block] = compile_blocks(
        {"a": holding(10), "b": holding(12, DataType.UINT32)}, max_block_registers=125, max_gap_registers=5
    )
    assert list(block.words_of(holding(12, DataType.UINT32), [1, 2, 3, 4, 5])) == [3, 4]
