"""What every driver does alike with its point specs: index them by point, and refuse unknown points.

Each driver keeps its own spec type (a Modbus register, an OPC UA node, an MQTT payload field); the
rules here are the ones they share, so a refusal reads the same whatever the protocol.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol, TypeVar

from scada.model import DeviceId, PointId, RequestRejected

__all__ = ["PointRejected", "index_points", "lookup_point"]


class PointRejected(RequestRejected):
    """The request names a point this driver does not serve or a value the point cannot take.

    Raised before anything is sent, so the device is not to blame and stays online (the kernel's
    :class:`RequestRejected`, which the command path reports as FAILED: never applied).
    """


class _HasPoint(Protocol):
    @property
    def point(self) -> PointId: ...


_S = TypeVar("_S", bound=_HasPoint)


def index_points(device: str, specs: Iterable[_S]) -> dict[PointId, _S]:
    """Return the specs by point, in configuration order; a point configured twice is a ValueError.

    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Spec:
    ...     point: PointId
    >>> list(index_points("m1", [Spec(PointId("m1.a")), Spec(PointId("m1.b"))]))
    ['m1.a', 'm1.b']
    >>> index_points("m1", [Spec(PointId("m1.a")), Spec(PointId("m1.a"))])
    Traceback (most recent call last):
    ...
    ValueError: m1: point m1.a is configured twice
    """
    by_point: dict[PointId, _S] = {}
    for spec in specs:
        if spec.point in by_point:
            raise ValueError(f"{device}: point {spec.point} is configured twice")
        by_point[spec.point] = spec
    return by_point


_V = TypeVar("_V")


def lookup_point(device: DeviceId, by_point: Mapping[PointId, _V], point: PointId) -> _V:
    """Return what ``by_point`` holds for ``point``; :class:`PointRejected` if the device lacks it."""
    try:
        return by_point[point]
    except KeyError:
        raise PointRejected(f"{point}: not a point of device {device}") from None
