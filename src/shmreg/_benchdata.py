"""The one data set and the operation names of every shmreg benchmark.

``shmreg bench`` (the CLI) and the pytest-benchmark suite in ``benchmarks/``
both build their keys and values here, so a number in the README and a
number printed by the CLI measure the same thing: ``n`` entries of
16-byte keys and 64-byte values; ``ops`` present keys sampled from them
(``get-hit``, and ``set`` overwrites them with new values of the same
size); ``ops`` absent keys (``get-miss``); ``ops`` integer counters
starting at 0 (``update_counter``).  Everything is derived from ``seed``,
so two processes (or two builds) given the same arguments get the same
bytes.
"""

from __future__ import annotations

import hashlib
import random

__all__ = ["OPERATIONS", "KEY_BYTES", "VALUE_BYTES", "SEED", "Dataset", "make_key", "reader_keys"]

#: The operations every benchmark times, in report order.
OPERATIONS = ("get-hit", "get-miss", "set", "update_counter")
KEY_BYTES = 16
VALUE_BYTES = 64
SEED = 20_240_601


def make_key(tag: bytes, i: int) -> bytes:
    """Key number ``i`` of family ``tag``: KEY_BYTES hex characters of a hash,
    so keys look random to any hash table (not ``k:000001``, ``k:000002``)."""
    return hashlib.blake2b(tag + i.to_bytes(8, "little"),
                           digest_size=KEY_BYTES // 2).hexdigest().encode()


def _chunks(blob: bytes, size: int) -> list:
    return [blob[i:i + size] for i in range(0, len(blob), size)]


class Dataset:
    """The keys and values every backend is loaded with and timed on.

    ``n`` entries (``keys``/``values``); ``ops`` operations per timed call:
    ``hit_keys`` (with ``hit_values``, their loaded values), ``miss_keys``,
    ``set_values`` and ``set_pairs`` (hit key, new value), ``counter_keys``.
    With ``ops > n`` the hit keys repeat.
    """

    def __init__(self, n: int, ops: int, seed: int = SEED) -> None:
        if n < 1 or ops < 1:
            raise ValueError("a data set needs n >= 1 entries and ops >= 1")
        rng = random.Random(seed)
        self.n, self.ops, self.seed = n, ops, seed
        self.keys = [make_key(b"hit", i) for i in range(n)]
        self.values = _chunks(rng.randbytes(VALUE_BYTES * n), VALUE_BYTES)
        idx = rng.sample(range(n), min(ops, n))
        while len(idx) < ops:
            idx.append(rng.randrange(n))
        self.hit_keys = [self.keys[i] for i in idx]
        self.hit_values = [self.values[i] for i in idx]
        self.miss_keys = [make_key(b"miss", i) for i in range(ops)]
        self.set_values = _chunks(rng.randbytes(VALUE_BYTES * ops), VALUE_BYTES)
        self.set_pairs = list(zip(self.hit_keys, self.set_values))
        self.counter_keys = [b"ctr:%012d" % i for i in range(ops)]
        present = set(self.keys)
        if len(present) != n or present.intersection(self.miss_keys) \
                or present.intersection(self.counter_keys):
            raise AssertionError("key collision in the benchmark data set")

    def items(self):
        """``(key, value)`` of the ``n`` entries."""
        return zip(self.keys, self.values)


def reader_keys(n: int, seed: int, ops: int) -> list:
    """``ops`` present keys of a data set of ``n`` entries, sampled with
    ``seed``: a reader process regenerates these without the whole data set."""
    rng = random.Random(seed)
    return [make_key(b"hit", i) for i in rng.sample(range(n), min(ops, n))]
