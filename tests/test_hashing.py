"""The keyed hash spreads adversarial-looking key sets evenly over shards, and
each table has its own seed."""

from __future__ import annotations

import pytest

import shmreg

N = 32_768


@pytest.mark.parametrize("keys", [
    [i for i in range(N)],                                    # sequential ints
    [i << 32 for i in range(N)],                              # ints differing only in high bits
    [f"user:{i:08d}" for i in range(N)],                      # shared prefix
    [b"\x00" * 40 + i.to_bytes(3, "big") for i in range(N)],  # long shared prefix, binary
    ["x" * (i % 97) + str(i) for i in range(N)],             # many lengths
], ids=["ints", "high-bits", "prefix", "binary", "lengths"])
def test_keys_spread_evenly_over_shards(table_name, keys):
    t = shmreg.Table.create(table_name, capacity=N, memory=16 << 20, shards=64)
    for k in keys:
        t[k] = 0
    st = t._shard_stats()
    mean = N / 64
    # Binomial spread: sigma ~ sqrt(mean) = 22.6; 6 sigma above the mean is
    # practically impossible for a good hash, and certain for a flooded shard.
    assert st["max_shard_count"] < mean + 6 * mean ** 0.5
    assert len(t) == N
    t.check()
    t.close()


def test_each_table_has_its_own_seed(table_name):
    a = shmreg.Table.create(table_name, capacity=1000, memory=1 << 20, shards=16)
    b = shmreg.Table.create(table_name + "-b", capacity=1000, memory=1 << 20, shards=16)
    try:
        for k in range(200):
            a[k] = b[k] = k
        order_a = [a._shard_entries(s, 0) for s in range(16)]
        order_b = [b._shard_entries(s, 0) for s in range(16)]
        assert order_a != order_b
    finally:
        a.close()
        b.close()
        shmreg.unlink(table_name + "-b")
