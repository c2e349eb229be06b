"""Validated Modbus TCP configuration: per device (address, timing) and per point (register map).

These models sit next to the driver (STYLE.md: "validate config once, at the edge") and are composed
into the site file by :mod:`scada.config`.

Addresses are the zero-based protocol addresses that travel in the request PDU, as printed in most
meter manuals' "register address (hex)" column; 4xxxx-style "register numbers" must be converted.
"""

from __future__ import annotations

import enum
from typing import Annotated, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["ByteOrder", "DataType", "ModbusDeviceConfig", "ModbusPointConfig", "RegisterTable", "WordOrder"]


class RegisterTable(enum.StrEnum):
    """The four Modbus data tables."""

    HOLDING = "holding"  # 4x, read/write 16-bit registers (FC 3, 6, 16)
    INPUT = "input"  # 3x, read-only 16-bit registers (FC 4)
    COIL = "coil"  # 0x, read/write bits (FC 1, 5, 15)
    DISCRETE_INPUT = "discrete_input"  # 1x, read-only bits (FC 2)

    @property
    def is_bit(self) -> bool:
        """Return True for the single-bit tables."""
        return self in (RegisterTable.COIL, RegisterTable.DISCRETE_INPUT)

    @property
    def is_writable(self) -> bool:
        """Return True for the tables a master may write."""
        return self in (RegisterTable.HOLDING, RegisterTable.COIL)


class DataType(enum.StrEnum):
    """How a value is laid out in registers."""

    BOOL = "bool"
    INT16 = "int16"
    UINT16 = "uint16"
    INT32 = "int32"
    UINT32 = "uint32"
    INT64 = "int64"
    UINT64 = "uint64"
    FLOAT32 = "float32"
    FLOAT64 = "float64"

    @property
    def register_count(self) -> int:
        """Return how many 16-bit registers (or bits, for BOOL) one value occupies.

        >>> DataType.FLOAT32.register_count
        2
        """
        return _REGISTER_COUNT[self]


_REGISTER_COUNT = {
    DataType.BOOL: 1,
    DataType.INT16: 1,
    DataType.UINT16: 1,
    DataType.INT32: 2,
    DataType.UINT32: 2,
    DataType.INT64: 4,
    DataType.UINT64: 4,
    DataType.FLOAT32: 2,
    DataType.FLOAT64: 4,
}


class WordOrder(enum.StrEnum):
    """Order of 16-bit words in a multi-register value: big = most significant word first."""

    BIG = "big"
    LITTLE = "little"


class ByteOrder(enum.StrEnum):
    """Order of the two bytes inside each register: big is the Modbus standard."""

    BIG = "big"
    LITTLE = "little"


class ModbusPointConfig(BaseModel):
    """Where one point lives in a device's register map and how to decode it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    table: RegisterTable = RegisterTable.HOLDING
    address: Annotated[int, Field(ge=0, le=65535)]
    type: DataType = DataType.UINT16
    word_order: WordOrder = WordOrder.BIG
    byte_order: ByteOrder = ByteOrder.BIG

    @model_validator(mode="after")
    def _check_type_fits_table(self) -> Self:
        if self.table.is_bit != (self.type is DataType.BOOL):
            kind = "bit" if self.table.is_bit else "register"
            raise ValueError(f"type {self.type.value!r} does not fit the {kind} table {self.table.value!r}")
        if self.address + self.type.register_count - 1 > 65535:
            raise ValueError("value runs past register 65535")
        return self

    @property
    def end(self) -> int:
        """Return the address one past the last register (or bit) of this value."""
        return self.address + self.type.register_count


class ModbusDeviceConfig(BaseModel):
    """How to reach one Modbus TCP device and how hard it may be polled."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: Annotated[str, Field(min_length=1)]
    port: Annotated[int, Field(ge=1, le=65535)] = 502
    unit_id: Annotated[int, Field(ge=0, le=255)] = 1
    timeout_s: Annotated[float, Field(gt=0, le=60)] = 1.0
    """Per request; slow serial gateways behind Modbus TCP may need several seconds."""
    inter_request_gap_s: Annotated[float, Field(ge=0, le=10)] = 0.0
    """Pause between requests of one poll, for devices that drop back-to-back requests."""
    max_block_registers: Annotated[int, Field(ge=1, le=125)] = 125
    """Largest register block read at once (125 is the protocol's limit for FC 3/4)."""
    max_gap_registers: Annotated[int, Field(ge=0, le=100)] = 10
    """Unused registers a block read may span to merge two neighbouring values into one request."""
