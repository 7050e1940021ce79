"""Cache benchmarks: hit latency of shmreg.Cache against cachetools,
diskcache and Redis, and cross-process single flight against per-process
caching (see _bench_cache for the set-up).

**Hit latency** (one pytest-benchmark group): 1,000 ``get`` hits per call
on the data set of the other benchmarks (100,000 entries, 16-byte keys,
64-byte values, the same 1,000 hit keys): **times are per 1,000 ops**.
cachetools is a per-process cache (the floor for "a cache in this
process", not shared); diskcache and Redis are shared like shmreg.

**Single flight** (one test per caching mode and access order): 8 worker
processes each need the same 20 keys whose factory takes 50 ms; factory
calls and wall time go to ``extra_info`` and the terminal summary.  The
benchmark's own time is the wall time of the whole round (process start-up
included); the figure to read is ``wall_s`` (from the barrier's release to
the last worker done).

Correctness is asserted (the loops hit, every worker got every value, the
shared cache computed each key exactly once).
"""

from __future__ import annotations

import shutil

import pytest

import _bench_cache as bk
import _bench_common as bc


@pytest.fixture(scope="module")
def shmreg_cache(dataset):
    name = bc.unique_table_name("cache")
    cache = bk.make_shmreg_cache(dataset, name)
    try:
        yield cache
        cache.table.check()
        assert cache.stats()["evictions"] == 0
    finally:
        cache.close()
        cache.unlink()


@pytest.fixture(scope="module")
def ttlcache_store(dataset):
    pytest.importorskip("cachetools", reason="cachetools is not installed (pip install cachetools)")
    return bk.make_ttlcache(dataset)


@pytest.fixture(scope="module")
def diskcache_store(dataset, tmp_path_factory):
    pytest.importorskip("diskcache", reason="diskcache is not installed (pip install diskcache)")
    path = tmp_path_factory.mktemp("diskcache")
    c = bk.make_diskcache(dataset, str(path))
    yield c
    c.close()
    shutil.rmtree(path, ignore_errors=True)


_STORE_FIXTURE = {"shmreg-cache": "shmreg_cache", "shmreg-get_or_set": "shmreg_cache",
                  "shmreg-table": "shmreg_store", "cachetools": "ttlcache_store",
                  "diskcache": "diskcache_store", "redis": "redis_store"}


@pytest.fixture(scope="module", autouse=True)
def _hits_summary():
    yield
    if bk.HITS:
        bc.NOTES.extend([f"cache hits ({bc.OPS:,} gets per call, {bc.N_ENTRIES:,} entries, "
                         f"{bc.KEY_LEN}-byte keys, {bc.VALUE_LEN}-byte values), ns/op of the "
                         "median and of the fastest call:",
                         bk.markdown_hits_table(bk.HITS, bk.HITS_MIN), ""])
    if bk.SINGLE_FLIGHT:
        bc.NOTES.extend([f"cache single flight ({bk.SF_PROCS} processes x the same {bk.SF_KEYS} "
                         f"keys, factory {bk.SF_DELAY * 1e3:g} ms):",
                         bk.markdown_single_flight_table(bk.SINGLE_FLIGHT), ""])


@pytest.mark.parametrize("backend", list(bk.HIT_BACKENDS))
def test_cache_get_hit_x1000(benchmark, request, dataset, backend):
    store = request.getfixturevalue(_STORE_FIXTURE[backend])
    bk.check_hits(backend, store, dataset)
    benchmark.group = f"cache get-hit (time per {bc.OPS} ops)"
    benchmark.extra_info.update(ops_per_call=bc.OPS, unit=f"time per call = time per {bc.OPS} ops",
                                backend=backend, what=bk.HIT_BACKENDS[backend],
                                entries=bc.N_ENTRIES, key_bytes=bc.KEY_LEN, value_bytes=bc.VALUE_LEN)
    counted = backend in ("shmreg-cache", "shmreg-get_or_set")
    if counted:
        misses0, hits0 = store.misses, store.hits
    benchmark(bk.hit_loop(backend, store, dataset))
    if counted:
        # Every timed call was all hits (the cache counts them exactly).
        assert store.misses == misses0
        assert store.hits > hits0 and (store.hits - hits0) % bc.OPS == 0
    st = benchmark.stats.stats if benchmark.stats else None
    if st is not None and st.rounds:
        bk.HITS[backend] = st.median / bc.OPS * 1e9
        bk.HITS_MIN[backend] = st.min / bc.OPS * 1e9
        benchmark.extra_info["ns_per_op_median"] = bk.HITS[backend]
        benchmark.extra_info["ns_per_op_min"] = bk.HITS_MIN[backend]
        if backend != "shmreg-cache" and "shmreg-cache" in bk.HITS:
            benchmark.extra_info["ratio_vs_shmreg_cache_get"] = bk.HITS[backend] / bk.HITS["shmreg-cache"]


@pytest.mark.parametrize("order", bk.SF_ORDERS)
@pytest.mark.parametrize("mode", bk.SF_MODES)
def test_cache_single_flight(benchmark, mode, order):
    pytest.importorskip("cachetools", reason="cachetools is not installed (pip install cachetools)")
    result = {}

    def run():
        result.update(bk.single_flight(mode, order))

    benchmark.group = (f"cache single flight ({bk.SF_PROCS} procs x {bk.SF_KEYS} keys, "
                       f"{bk.SF_DELAY * 1e3:g} ms factory; whole round, wall_s in extra_info)")
    benchmark.pedantic(run, rounds=1, iterations=1)
    bk.SINGLE_FLIGHT[(mode, order)] = result
    benchmark.extra_info.update(result)
    line = (f"single flight, {order} order, {mode}: {result['factory_calls']} factory calls, "
            f"wall {result['wall_s']:.3f} s (slowest worker {result['worker_s_max']:.3f} s)")
    other = bk.SINGLE_FLIGHT.get(("per-process" if mode == "shmreg" else "shmreg", order))
    if other is not None:
        a, b = (other, result) if mode == "shmreg" else (result, other)
        ratios = {"calls_ratio_per_process_vs_shmreg": a["factory_calls"] / b["factory_calls"],
                  "wall_ratio_per_process_vs_shmreg": a["wall_s"] / b["wall_s"]}
        benchmark.extra_info.update(ratios)
        line += (f"; per-process / shmreg: {ratios['calls_ratio_per_process_vs_shmreg']:.1f}x calls, "
                 f"{ratios['wall_ratio_per_process_vs_shmreg']:.2f}x wall")
    print("\n" + line)

    assert result["all_values_ok"]
    # Per process: every worker computes every key.  Shared: each key once.
    assert result["factory_calls"] == result["expected_calls"], result
    if mode == "per-process":
        assert result["calls_per_proc"] == [bk.SF_KEYS] * bk.SF_PROCS

