"""Memory per entry for 100k entries of 16-byte keys and 64-byte values.

shmreg two ways: (a) bytes actually used (item bytes + index slots x 8 +
header, process table and shard structs) / entries, in a capacity=100k
table; (b) the whole segment / entries for capacity=100k and the smallest
``memory`` that still holds the entries (bisection).  Against py-lmdb
((last_pgno+1) x page size), a dict (getsizeof of dict + keys + values) and,
when redis-server is installed, Redis (used_memory growth).

Not a timing: no benchmark fixture; the numbers go to the terminal summary
(and stdout with ``-s``).
"""

from __future__ import annotations

import shutil

import pytest

import _bench_common as bc


def test_memory_per_entry(dataset, tmp_path, request):
    mem = {"shmreg": bc.shmreg_memory(dataset), "dict": bc.dict_memory(dataset)}
    try:
        import lmdb  # noqa: F401
    except ImportError:
        pass
    else:
        try:
            mem["lmdb"] = bc.lmdb_memory(dataset, str(tmp_path / "lmdb-mem"))
        finally:
            shutil.rmtree(tmp_path / "lmdb-mem", ignore_errors=True)
    if bc.redis_server_binary() is not None:
        try:
            client = request.getfixturevalue("redis_store")
        except pytest.skip.Exception:
            pass
        else:
            mem["redis"] = bc.redis_memory(dataset, client)

    s = mem["shmreg"]
    assert s["entries"] == dataset.n
    # Sanity, not performance: the payload alone is 80 bytes an entry, and
    # the smallest segment cannot be smaller than the bytes used.
    assert s["item_bytes_per_entry"] >= bc.KEY_LEN + bc.VALUE_LEN
    assert s["smallest_segment_bytes"] >= s["item_bytes_used"] + s["index_bytes"] + s["fixed_bytes"]

    table = bc.markdown_memory_table(mem)
    tries = ", ".join(f"{m:,}{'' if ok else ' (full)'}" for m, ok in s["memory_search"])
    lines = [f"memory per entry ({dataset.n:,} entries, {bc.KEY_LEN}-byte keys, {bc.VALUE_LEN}-byte values):",
             table, f"shmreg memory= tried: {tries}", ""]
    bc.NOTES.extend(lines)
    print("\n".join(lines))
