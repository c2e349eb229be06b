"""Device sharding across gateway processes: stable, balanced, and minimal movement when growing."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest

from scada.model import ConfigError
from scada.sharding import Shard, shard_of

DEVICES = [f"meter-{i}" for i in range(10_000)]


def test_every_device_has_exactly_one_owner() -> None:
    shards = [Shard(i, 3) for i in range(3)]
    for device in DEVICES[:2000]:
        assert sum(s.owns(device) for s in shards) == 1


def test_shards_are_balanced() -> None:
    counts = Counter(shard_of(d, 4) for d in DEVICES)
    assert set(counts) == {0, 1, 2, 3}
    assert all(abs(n - 2500) < 200 for n in counts.values()), counts  # within 8 % of an even split


def test_growing_by_one_shard_moves_only_what_the_new_shard_takes() -> None:
    moved = [d for d in DEVICES if shard_of(d, 3) != shard_of(d, 4)]
    assert all(shard_of(d, 4) == 3 for d in moved)  # devices only move to the new shard
    assert 0.20 < len(moved) / len(DEVICES) < 0.30  # about 1/4 of the fleet


def test_the_hash_is_the_same_in_another_process() -> None:
    """Python's hash() is salted per process; the shard of a device must not be."""
    code = "from scada.sharding import shard_of; print([shard_of(f'meter-{i}', 5) for i in range(50)])"
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert other.stdout.strip() == str([shard_of(f"meter-{i}", 5) for i in range(50)])


@pytest.mark.parametrize("text", ["", "1", "a/b", "2/2", "0/0", "-1/2"])
def test_malformed_shard_settings_name_the_variable(text: str) -> None:
    with pytest.raises(ConfigError, match="SCADA_GATEWAY_SHARD"):
        Shard.parse(text)


def test_select_keeps_order() -> None:
    shard = Shard.parse(" 1 / 2 ")
    assert str(shard) == "1/2"
    assert list(shard.select(DEVICES[:100])) == [d for d in DEVICES[:100] if shard_of(d, 2) == 1]
