"""Which gateway process owns which device: a stable hash, so several gateways share one fleet.

Gateways are numbered ``0 .. count-1`` (``SCADA_GATEWAY_SHARD=i/n``). A device belongs to the shard
with the highest rendezvous weight ``blake2b(shard, device)`` (highest-random-weight hashing):

- stable: the same device lands on the same shard in every process, on every machine, after every
  restart (Python's ``hash()`` is salted per process and would not do);
- balanced: each shard gets about ``1/n`` of the devices;
- minimal movement: growing from ``n`` to ``n+1`` shards moves only the ~``1/(n+1)`` of devices the new
  shard wins; the others stay where their connections already are.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Self

from scada.model import ConfigError

__all__ = ["Shard", "shard_of"]

_SHARD_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def _weight(shard: int, device: str) -> int:
    digest = hashlib.blake2b(f"{shard}\x00{device}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def shard_of(device: str, count: int) -> int:
    """Return the shard (``0 .. count-1``) that owns ``device``.

    >>> shard_of("meter-1", 1)
    0
    >>> shard_of("meter-1", 4) == shard_of("meter-1", 4)
    True
    """
    if count < 1:
        raise ValueError("count must be at least 1")
    if count == 1:
        return 0
    return max(range(count), key=lambda shard: _weight(shard, device))


@dataclass(frozen=True, slots=True)
class Shard:
    """One gateway's share of the fleet: shard ``index`` of ``count``."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index}/{self.count}: need 0 <= index < count")

    @classmethod
    def parse(cls, text: str) -> Self:
        """Parse ``"i/n"``; raise :class:`ConfigError` naming the variable when malformed.

        >>> Shard.parse("1/3")
        Shard(index=1, count=3)
        >>> Shard.parse("3/3")
        Traceback (most recent call last):
        ...
        scada.model.ConfigError: SCADA_GATEWAY_SHARD: '3/3': the index must be below the count (0/3 .. 2/3)
        """
        match = _SHARD_RE.match(text)
        if match is None:
            raise ConfigError(f"SCADA_GATEWAY_SHARD: {text!r}: expected 'index/count', e.g. '0/2'")
        index, count = int(match[1]), int(match[2])
        if count < 1:
            raise ConfigError(f"SCADA_GATEWAY_SHARD: {text!r}: the count must be at least 1")
        if index >= count:
            last = f"{count - 1}/{count}"
            raise ConfigError(
                f"SCADA_GATEWAY_SHARD: {text!r}: the index must be below the count (0/{count} .. {last})"
            )
        return cls(index, count)

    def owns(self, device: str) -> bool:
        """Return True if this shard supervises ``device``."""
        return self.count == 1 or shard_of(device, self.count) == self.index

    def select(self, devices: Iterable[str]) -> Iterator[str]:
        """Yield the devices this shard owns, in the given order."""
        return (d for d in devices if self.owns(d))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"
