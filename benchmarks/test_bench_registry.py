"""Registry benchmarks: how fast a dead owner's entries disappear, and what a
read of an owned entry costs (see _bench_registry for the set-up).

**Reap latency** (one test per scenario): 100 owner children, each holding 4
entries (2 ``Registry.register`` keys, 2 ``set(..., owned=True)``), killed
one at a time with SIGKILL; per death the time from the kill until the
entries are *gone* (a watcher deleted them: ``stats()['owned']`` dropped by
4), until they are *invisible* (``Registry.lookup`` returns None: no watcher
needed) and until the kernel reports the exit (pidfd readable).  Target: gone
p99 < 50 ms with a watcher.  The benchmark's own time is the wall time of the
100 deaths, not a latency: the latencies (ms: p50/p95/p99/max) are in
``extra_info`` and the terminal summary.  The owner children are forked
from a pre-started zygote, so the scenario runs in about a second.

**Lookup cost** (one pytest-benchmark group): 1,000 reads per call, 16-byte
keys and 64-byte values, all in one registry table: ``t.get`` of an unowned
entry (the baseline), of an entry owned by this process, by another live
process, by a process registered with ``pid=``; ``Registry.lookup`` and
``Registry.whereis``.  Target: owned ``t.get`` within 1.2x of unowned.  The
ratios go to the terminal summary.

Correctness is asserted (every death's entries vanish and are reaped, the
loops read what they claim); the targets are only reported, unless
``SHMREG_BENCH_ENFORCE=1`` (a busy machine is not a bug).
"""

from __future__ import annotations

import os

import pytest

import _bench_common as bc
import _bench_registry as br

ENFORCE = os.environ.get("SHMREG_BENCH_ENFORCE") == "1"


@pytest.mark.parametrize("scenario", br.REAP_SCENARIOS)
def test_reap_latency(benchmark, scenario):
    result = {}

    def run():
        result.update(br.reap_latency(scenario))

    benchmark.group = f"registry reap ({br.REAP_ROUNDS} SIGKILLs; wall time, latencies in extra_info)"
    benchmark.pedantic(run, rounds=1, iterations=1)
    br.REAP[scenario] = result
    info = {"scenario": scenario, "deaths": result["rounds"],
            "entries_per_child": result["entries_per_child"], "table_capacity": result["capacity"],
            "failed_rounds": len(result["failures"])}
    for what in ("gone", "invisible", "exited"):
        for field, v in result.get(what, {}).items():
            info[f"{what}_{field}"] = v
    if "gone" in result:
        info.update(target_p99_ms=br.REAP_TARGET_P99_MS, meets_target=result["meets_target"])
    benchmark.extra_info.update(info)

    lines = [f"registry reap latency, {scenario} ({result['rounds']} SIGKILLs, "
             f"{result['entries_per_child']} entries each, {result['cpus']} CPUs), ms:"]
    for what in ("gone", "invisible", "exited"):
        d = result.get(what)
        if d:
            lines.append(f"  {what:9}: p50 {d['p50_ms']:.3f}  p95 {d['p95_ms']:.3f}  "
                         f"p99 {d['p99_ms']:.3f}  max {d['max_ms']:.3f}")
    if "gone" in result:
        lines.append(f"  gone p99 < {br.REAP_TARGET_P99_MS:g} ms: "
                     f"{'met' if result['meets_target'] else 'MISSED'}")
    print("\n" + "\n".join(lines))
    bc.NOTES.extend(lines + [""])

    # Correctness, whatever the timings: every death made its entries
    # invisible and (watcher or t.reap) deleted them, and nothing is left.
    assert not result["failures"], result["failures"][:5]
    assert result["invisible"]["n"] == br.REAP_ROUNDS
    assert result["owned_left"] == 0
    if scenario == "no watcher":
        assert result["reaped_by_hand"] == br.REAP_ROUNDS * br.ENTRIES_PER_CHILD
    else:
        assert result["gone"]["n"] == br.REAP_ROUNDS
    if "watcher_reaped_entries" in result:
        assert result["watcher_reaped_entries"] == br.REAP_ROUNDS * br.ENTRIES_PER_CHILD
    if ENFORCE and "gone" in result:
        assert result["meets_target"], f"gone p99 {result['gone']['p99_ms']:.1f} ms"


@pytest.fixture(scope="module")
def lookup_bench():
    lb = br.LookupBench()
    try:
        lb.check()
        yield lb
        lb.check()      # nothing changed while being timed
    finally:
        lb.close()
        if br.LOOKUP:
            ratios = br.lookup_ratios(br.LOOKUP)
            bc.NOTES.extend([f"registry reads ({bc.OPS:,} per call, {bc.KEY_LEN}-byte keys, "
                             f"{bc.VALUE_LEN}-byte values, one table), ns/op of the median "
                             "and of the fastest call:",
                             br.markdown_lookup_table(br.LOOKUP, br.LOOKUP_MIN), ""])
            if ENFORCE and "get-owned" in ratios:
                assert ratios["get-owned"] <= br.LOOKUP_TARGET_RATIO, ratios


@pytest.mark.parametrize("op", list(br.LOOKUP_OPS))
def test_registry_read_x1000(benchmark, lookup_bench, op):
    benchmark.group = f"registry reads (time per {bc.OPS} ops)"
    benchmark.extra_info.update(ops_per_call=bc.OPS, unit=f"time per call = time per {bc.OPS} ops",
                                operation=op, what=br.LOOKUP_OPS[op], key_bytes=bc.KEY_LEN,
                                value_bytes=bc.VALUE_LEN, table_capacity=br.LOOKUP_CAPACITY)
    benchmark(lookup_bench.loops()[op])
    st = benchmark.stats.stats if benchmark.stats else None
    if st is not None and st.rounds:
        ns = st.median / bc.OPS * 1e9
        benchmark.extra_info["ns_per_op_min"] = st.min / bc.OPS * 1e9
        benchmark.extra_info["ns_per_op_median"] = ns
        br.LOOKUP[op] = ns
        br.LOOKUP_MIN[op] = st.min / bc.OPS * 1e9
        if op != "get-unowned" and "get-unowned" in br.LOOKUP:
            benchmark.extra_info["ratio_vs_unowned_get"] = ns / br.LOOKUP["get-unowned"]
