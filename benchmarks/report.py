#!/usr/bin/env python
"""Quick comparison report (plain Python, no pytest): prints Markdown.

    python benchmarks/report.py [--no-redis] [--no-lmdb] [--no-memory] [--no-scaling]
                                [--no-registry] [--no-cache]

The same comparisons as the pytest-benchmark suite (see _bench_common.py):
100,000 entries of 16-byte keys and 64-byte values; get hit, get miss, set
(overwrite) and update_counter on the same 1,000 keys for every backend -
a dict, shmreg, py-lmdb and (when redis-server is on PATH) Redis over a unix
socket - timed with ``timeit`` (best of ``--repeat`` runs of 1,000 ops);
then memory per entry, 1 vs 2 reader processes, and the registry: reap
latency after SIGKILL with and without a watcher, and the cost of reading
owned entries (see _bench_registry.py); and the cache: hit latency of
shmreg.Cache against cachetools, diskcache and Redis, and 8 processes
sharing one cache (single flight) against a cache per process (see
_bench_cache.py).  Takes ~30 s.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import timeit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _bench_cache as bk  # noqa: E402
import _bench_common as bc  # noqa: E402
import _bench_registry as br  # noqa: E402

import shmreg  # noqa: E402


def time_ns_per_op(fn, repeat: int, target: float = 0.02) -> float:
    """Best of ``repeat`` timings, in ns per operation (``fn`` does bc.OPS ops)."""
    t1 = timeit.timeit(fn, number=1)
    number = max(1, int(target / max(t1, 1e-9)))
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number / bc.OPS * 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-redis", action="store_true", help="skip Redis")
    ap.add_argument("--no-lmdb", action="store_true", help="skip py-lmdb")
    ap.add_argument("--no-memory", action="store_true", help="skip memory per entry")
    ap.add_argument("--no-scaling", action="store_true", help="skip 1 vs 2 reader processes")
    ap.add_argument("--no-registry", action="store_true",
                    help="skip the registry (reap latency, owned-entry reads)")
    ap.add_argument("--no-cache", action="store_true",
                    help="skip the cache (hit latency, single flight across processes)")
    ap.add_argument("--reap-rounds", type=int, default=br.REAP_ROUNDS,
                    help=f"SIGKILLed owners per reap scenario (default {br.REAP_ROUNDS})")
    ap.add_argument("--repeat", type=int, default=7, help="timeit repeats (best is kept)")
    ap.add_argument("--duration", type=float, default=1.0, help="seconds per reader-scaling run")
    args = ap.parse_args(argv)

    ds = bc.Dataset()
    stores: dict = {"dict": bc.make_dict(ds)}
    notes: list = []
    versions = [f"Python {platform.python_version()}", f"shmreg {shmreg.__version__}"]
    tmp = tempfile.mkdtemp(prefix="shmreg-report-")
    name = bc.unique_table_name("report")
    server = None
    try:
        stores["shmreg"] = bc.make_shmreg(ds, name)
        if not args.no_lmdb:
            try:
                import lmdb
            except ImportError:
                notes.append("lmdb: skipped (py-lmdb is not installed)")
            else:
                stores["lmdb"] = bc.make_lmdb(ds, os.path.join(tmp, "lmdb"))
                versions.append(f"py-lmdb {lmdb.__version__} (LMDB {'.'.join(map(str, lmdb.version()))})")
        if not args.no_redis:
            binary = bc.redis_server_binary()
            if binary is None:
                notes.append("redis: skipped (redis-server is not on PATH)")
            else:
                try:
                    import redis
                except ImportError:
                    notes.append("redis: skipped (redis-py is not installed)")
                else:
                    rdir = os.path.join(tmp, "redis")
                    os.mkdir(rdir)
                    server = bc.RedisServer(rdir, binary).start()
                    stores["redis"] = server.client()
                    bc.fill_redis(ds, stores["redis"])
                    ver = subprocess.run([binary, "--version"], capture_output=True, text=True,
                                         timeout=10).stdout.split()
                    sv = next((w[2:] for w in ver if w.startswith("v=")), "?")
                    versions.append(f"redis-server {sv} + redis-py {redis.__version__}")

        # -- ns/op -----------------------------------------------------------------
        ns: dict = {}
        for backend, store in stores.items():
            bc.check_backend(backend, store, ds)
            # LMDB: gets reuse one read txn, aborted before the write loops run.
            txn = store.begin() if backend == "lmdb" else None
            try:
                loops = bc.backend_loops(backend, store, ds, txn)
                for op in ("get-hit", "get-miss"):
                    ns[(op, backend)] = time_ns_per_op(loops[op], args.repeat)
            finally:
                if txn is not None:
                    txn.abort()
            loops = bc.backend_loops(backend, store, ds)
            for op in ("set", "update_counter"):
                ns[(op, backend)] = time_ns_per_op(loops[op], args.repeat)
        if server is not None:
            floor = bc.redis_wire_floor_ns(server.socket, ds.hit_keys[0])
            notes.append(f"redis: a GET round trip on the unix socket with no client library takes "
                         f"{floor:,.0f} ns; the rest of the redis column is redis-py.")

        print(f"### shmreg vs dict / py-lmdb / Redis ({platform.machine()}, {os.cpu_count()} CPUs)\n")
        print("; ".join(versions) + ".\n")
        print(f"{ds.n:,} entries, {bc.KEY_LEN}-byte keys, {bc.VALUE_LEN}-byte values; "
              f"each figure is the best of {args.repeat} timeit runs of {bc.OPS:,} ops on the same "
              f"{bc.OPS:,} keys, in ns per op (Python loop included).\n")
        print(bc.markdown_ops_table(ns))
        print()
        print("- dict: in-process `dict.get` / `d[k] = v` / `d[k] += 1` (the floor; not shared).")
        print("- shmreg: `t.get(k)` / `t[k] = v` / `t.update_counter(k)`, capacity 110,000.")
        if "lmdb" in stores:
            print("- lmdb: gets reuse one read txn; one write txn per set; counter = get + put in one "
                  "write txn; `sync=False, metasync=False, writemap=True` (not durable, like shmreg).")
        if "redis" in stores:
            print("- redis: GET / SET / INCR through redis-py over a unix socket, one round trip each.")
        for n in notes:
            print(f"- {n}")
        print()

        # -- memory ----------------------------------------------------------------
        if not args.no_memory:
            mem = {"shmreg": bc.shmreg_memory(ds), "dict": bc.dict_memory(ds)}
            if "lmdb" in stores:
                mem["lmdb"] = bc.lmdb_memory(ds, os.path.join(tmp, "lmdb-mem"))
            if "redis" in stores:
                mem["redis"] = bc.redis_memory(ds, stores["redis"])
            print(f"### Memory per entry ({ds.n:,} entries, {bc.KEY_LEN}-byte keys, "
                  f"{bc.VALUE_LEN}-byte values)\n")
            print(bc.markdown_memory_table(mem))
            print()

        # -- reader scaling --------------------------------------------------------
        if not args.no_scaling:
            r = bc.reader_scaling(name, duration=args.duration, repeats=2)
            print(f"### Read scaling across processes (get hits, {os.cpu_count()} CPUs, "
                  f"{args.duration:g} s runs, best of 2)\n")
            print("| readers | total ops/s | ns/op per reader | CPU share per reader | ops per CPU second |")
            print("|---:|---:|---:|---:|---:|")
            print(f"| 1 | {r['ops_per_s_1_reader']:,.0f} | {1e9 / r['ops_per_s_1_reader']:,.0f} | "
                  f"{r['cpu_share_1_reader'][0]:.2f} | {r['ops_per_cpu_s_1_reader']:,.0f} |")
            per = r["per_reader_ops_per_s_2_readers"]
            print(f"| 2 | {r['ops_per_s_2_readers']:,.0f} | "
                  f"{' / '.join(f'{1e9 / x:,.0f}' for x in per)} | "
                  f"{' / '.join(f'{x:.2f}' for x in r['cpu_share_2_readers'])} | "
                  f"{' / '.join(f'{x:,.0f}' for x in r['ops_per_cpu_s_2_readers'])} |")
            print(f"\n2 readers / 1 reader = **{r['ratio_2_vs_1']:.2f}x** (target >= 1.8x: "
                  f"{'met' if r['meets_target'] else 'missed'}).  CPU share = reader CPU time / wall "
                  "time: below 1, other processes took CPU during the run.  Work per CPU second "
                  f"with 2 readers vs 1: {r['per_cpu_efficiency_2_vs_1']:.2f} (1.0 = the readers do "
                  "not slow each other down).")

        # -- registry ----------------------------------------------------------------
        if not args.no_registry:
            print()
            registry_section(args.repeat, args.reap_rounds)

        # -- cache -------------------------------------------------------------------
        if not args.no_cache:
            print()
            cache_section(ds, stores, tmp, args.repeat)
    finally:
        for backend, store in stores.items():
            if backend in ("shmreg", "lmdb", "redis"):
                store.close()
        try:
            shmreg.unlink(name)
        except shmreg.TableNotFoundError:
            pass
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def registry_section(repeat: int, rounds: int) -> None:
    """Print the registry section: reap latency per scenario, then reads."""
    reap = {sc: br.reap_latency(sc, rounds) for sc in br.REAP_SCENARIOS}
    print(f"### Registry: reap latency after SIGKILL ({os.cpu_count()} CPUs)\n")
    print(f"{rounds} owner processes per scenario, each holding {br.ENTRIES_PER_CHILD} entries "
          f"({br.REG_KEYS} `Registry.register` keys + {br.OWNED_KEYS} `set(..., owned=True)`), "
          "killed one at a time; ms from `os.kill` until the entries are *gone* (a watcher "
          "deleted them: `stats()['owned']` dropped), *invisible* (`Registry.lookup` returns "
          "None) and *exited* (a pidfd of the process turned readable).  Target: gone p99 < "
          f"{br.REAP_TARGET_P99_MS:g} ms.\n")
    print(br.markdown_reap_table(reap))
    print()
    print("- no watcher: entries are invisible as soon as the owner is dead (every read checks "
          "the owner's liveness), but stay in memory until reaped (`t.reap(pid)` here).")
    print("- watcher process: `shmreg watch NAME`.  watcher thread: a `Watcher` thread in the "
          "measuring process, whose poll loop sleeps 50 us between checks; busy poller: the loop "
          "never sleeps, so the watcher thread waits for the GIL (5 ms switch interval).")
    bad = {sc: r["failures"] for sc, r in reap.items() if r["failures"]}
    if bad:
        print(f"- **failed rounds**: {bad}")
    print()

    lb = br.LookupBench()
    try:
        lb.check()
        ns = {op: time_ns_per_op(fn, repeat) for op, fn in lb.loops().items()}
        lb.check()
    finally:
        lb.close()
    print(f"### Registry: reading owned entries ({bc.OPS:,} reads per run, {bc.KEY_LEN}-byte keys, "
          f"{bc.VALUE_LEN}-byte values, one table, best of {repeat})\n")
    print(br.markdown_lookup_table(ns))
    print()
    print("- A process that registered itself is checked with one load of its liveness mutex; "
          "one registered by another with `register(key, pid=...)` costs a `poll()` of a pidfd "
          "per read.  `Registry.lookup` also builds a `Registration` namedtuple and resolves "
          "the pid; `whereis` is a `lookup` plus a call.")


def cache_section(ds: "bc.Dataset", stores: dict, tmp: str, repeat: int) -> None:
    """Print the cache section: get hits per cache, then single flight."""
    caches: dict = {}
    notes: list = []
    name = bc.unique_table_name("report-cache")
    caches["shmreg-cache"] = caches["shmreg-get_or_set"] = bk.make_shmreg_cache(ds, name)
    try:
        caches["shmreg-table"] = stores["shmreg"]
        try:
            caches["cachetools"] = bk.make_ttlcache(ds)
        except ImportError:
            notes.append("cachetools: skipped (not installed: pip install cachetools)")
        try:
            caches["diskcache"] = bk.make_diskcache(ds, os.path.join(tmp, "diskcache"))
        except ImportError:
            notes.append("diskcache: skipped (not installed: pip install diskcache)")
        if "redis" in stores:
            caches["redis"] = stores["redis"]
        ns = {}
        for backend in bk.HIT_BACKENDS:
            if backend in caches:
                bk.check_hits(backend, caches[backend], ds)
                ns[backend] = time_ns_per_op(bk.hit_loop(backend, caches[backend], ds), repeat)
    finally:
        caches["shmreg-cache"].close()
        caches["shmreg-cache"].unlink()
        if "diskcache" in caches:
            caches["diskcache"].close()
    print(f"### Cache: get hits ({bc.OPS:,} gets per run, {ds.n:,} entries, {bc.KEY_LEN}-byte keys, "
          f"{bc.VALUE_LEN}-byte values, best of {repeat})\n")
    print(bk.markdown_hits_table(ns))
    print()
    print("- shmreg `Cache`: ttl 1 h, capacity 110,000, shared by every process on the host; "
          "`Table.get` is the table underneath (no hit counting, no cache layer).")
    print("- cachetools `TTLCache` lives in one process: every worker holds (and fills) its own.")
    print("- diskcache: SQLite in a tmp dir; redis: the server of the table above, no TTLs "
          "(a GET costs the same).")
    for n in notes:
        print(f"- {n}")
    print()
    try:
        import cachetools  # noqa: F401
    except ImportError:
        print("(single flight skipped: the per-process side needs cachetools)")
        return
    sf = {(mode, order): bk.single_flight(mode, order) for order in bk.SF_ORDERS for mode in bk.SF_MODES}
    print(f"### Cache: single flight across processes ({bk.SF_PROCS} processes each need the same "
          f"{bk.SF_KEYS} keys, factory {bk.SF_DELAY * 1e3:g} ms, {os.cpu_count()} CPUs)\n")
    print(bk.markdown_single_flight_table(sf))
    print()
    print("- same order: every worker walks the keys in one order, so all of them wait for each "
          "computation in turn (no wall-time gain, 8x fewer factory calls); staggered: worker *i* "
          f"starts at key i x {bk.SF_KEYS}/{bk.SF_PROCS}, so the computations spread over the workers.")
    bad = [k for k, r in sf.items() if r["factory_calls"] != r["expected_calls"] or not r["all_values_ok"]]
    if bad:
        print(f"- **unexpected factory calls or values**: {[(k, sf[k]) for k in bad]}")


if __name__ == "__main__":
    sys.exit(main())
