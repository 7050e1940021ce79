"""Compare builds of shmreg (e.g. the core before and after a rewrite) in one
session, against a private dict and py-lmdb.

Each build is a Python interpreter with its own shmreg installed (its own
venv).  The driver runs one measurement of each build as a subprocess,
alternating the order every round, so that every build sees the same
machine load.  A measurement times get-hit, get-miss, set and
update_counter (the operations and data set of ``shmreg bench``:
shmreg._benchdata) for dict, shmreg and lmdb at each size: the minimum over
``--repeat`` timings of ``--number`` calls of a 1,000-operation loop (short
timings, so that some escape the scheduler on a loaded machine).  Then 1
and 2 reader processes read a 100k-entry table of each build.  The summary
gives the minimum and the median over the rounds::

    python benchmarks/compare_builds.py --build old=/tmp/old/.venv/bin/python \\
        --build new=.venv/bin/python --rounds 16 --json /tmp/ab.json

Instructions per operation (deterministic under load): run one loop under
callgrind twice, with 2 and with 102 passes over the 1,000 keys, and divide
the difference of the totals by 100,000::

    PYTHONHASHSEED=0 valgrind --tool=callgrind PY benchmarks/compare_builds.py \\
        --worker cg 1000 shmreg:get-hit 102

Not a pytest benchmark: it needs several installed builds.  py-lmdb must be
installed in each build's environment for the lmdb column.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
OPS = 1_000

# The data set of this tree, loaded by path: a build under test may predate it.
_spec = importlib.util.spec_from_file_location(
    "_benchdata", os.path.join(HERE, "..", "src", "shmreg", "_benchdata.py"))
bd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bd)


# -- worker (runs inside the build under test) ---------------------------------

def _loops(get, setitem, incr, ds) -> dict:
    def get_hit(keys=ds.hit_keys):
        for k in keys:
            get(k)

    def get_miss(keys=ds.miss_keys):
        for k in keys:
            get(k)

    def set_(pairs=ds.set_pairs):
        for k, v in pairs:
            setitem(k, v)

    def update_counter(keys=ds.counter_keys):
        for k in keys:
            incr(k)

    return {"get-hit": get_hit, "get-miss": get_miss, "set": set_, "update_counter": update_counter}


def dict_loops(d: dict, ds) -> dict:
    loops = _loops(d.get, d.__setitem__, None, ds)
    get = d.get

    def get_hit(keys=ds.hit_keys):      # written out: dict.get is the floor
        for k in keys:
            get(k)

    def set_(pairs=ds.set_pairs):
        for k, v in pairs:
            d[k] = v

    def update_counter(keys=ds.counter_keys):
        for k in keys:
            d[k] += 1

    loops.update({"get-hit": get_hit, "set": set_, "update_counter": update_counter})
    return loops


def shmreg_loops(t, ds) -> dict:
    loops = _loops(t.get, None, t.update_counter, ds)

    def set_(pairs=ds.set_pairs):
        for k, v in pairs:
            t[k] = v

    loops["set"] = set_
    return loops


def lmdb_loops(env, txn, ds) -> dict:
    """Gets reuse ``txn``; each set / counter update is one write transaction."""
    begin = env.begin
    loops = _loops(txn.get if txn is not None else None, None, None, ds)

    def set_(pairs=ds.set_pairs):
        for k, v in pairs:
            with begin(write=True) as w:
                w.put(k, v)

    def update_counter(keys=ds.counter_keys):
        for k in keys:
            with begin(write=True) as w:
                w.put(k, b"%d" % (int(w.get(k)) + 1))

    loops.update({"set": set_, "update_counter": update_counter})
    return loops


def make_table(ds, name: str):
    import shmreg
    t = shmreg.Table.create(name, capacity=int((ds.n + ds.ops) * 1.25) + 64)
    for k, v in ds.items():
        t[k] = v
    for k in ds.counter_keys:
        t[k] = 0
    assert t.get(ds.hit_keys[0]) == ds.hit_values[0] and t.get(ds.miss_keys[0]) is None
    return t


def best_ns(fn, number: int, repeat: int) -> float:
    fn()
    best = float("inf")
    pc = time.perf_counter
    for _ in range(repeat):
        t0 = pc()
        for _ in range(number):
            fn()
        best = min(best, (pc() - t0) / number)
    return best / OPS * 1e9


def worker_ops(n: int, number: int, repeat: int, peers: list) -> dict:
    import shmreg
    ds = bd.Dataset(n, OPS)
    out = {}
    if "dict" in peers:
        d = dict(ds.items())
        d.update(dict.fromkeys(ds.counter_keys, 0))
        out["dict"] = {op: best_ns(f, number, repeat) for op, f in dict_loops(d, ds).items()}
    if "shmreg" in peers:
        name = f"cmpbuilds-{os.getpid()}-{time.monotonic_ns()}"
        t = make_table(ds, name)
        try:
            out["shmreg"] = {op: best_ns(f, number, repeat) for op, f in shmreg_loops(t, ds).items()}
            assert t[ds.counter_keys[0]] > 0
        finally:
            t.close()
            shmreg.unlink(name)
    if "lmdb" in peers:
        import lmdb
        path = tempfile.mkdtemp(prefix="cmpbuilds-lmdb-")
        try:
            env = lmdb.open(path, map_size=(ds.n + ds.ops) * 512 + (64 << 20), sync=False,
                            metasync=False, writemap=True, max_readers=16)
            with env.begin(write=True) as w:
                for k, v in ds.items():
                    w.put(k, v)
                for k in ds.counter_keys:
                    w.put(k, b"0")
            txn = env.begin()
            loops = lmdb_loops(env, txn, ds)
            res = {op: best_ns(loops[op], number, repeat) for op in ("get-hit", "get-miss")}
            txn.abort()     # an open reader would pin pages while the writes run
            loops = lmdb_loops(env, None, ds)
            res.update({op: best_ns(loops[op], 1, 5) for op in ("set", "update_counter")})
            out["lmdb"] = res
            env.close()
        finally:
            shutil.rmtree(path, ignore_errors=True)
    return out


def worker_create(n: int) -> None:
    """Create a table of n entries, print its name, unlink it at end of stdin."""
    import shmreg
    name = f"cmpbuilds-scale-{os.getpid()}-{time.monotonic_ns()}"
    t = make_table(bd.Dataset(n, OPS), name)
    print(name, flush=True)
    sys.stdin.readline()
    t.close()
    shmreg.unlink(name)


def worker_reader(name: str, n: int, seed: int, duration: float) -> dict:
    import shmreg
    t = shmreg.Table.open(name)
    keys = bd.reader_keys(n, seed, OPS)
    get = t.get
    for k in keys:
        assert get(k) is not None
    print("ready", flush=True)
    sys.stdin.readline()
    ops = 0
    cpu0, start = time.process_time(), time.perf_counter()
    end = start + duration
    while True:
        for k in keys:
            get(k)
        ops += len(keys)
        now = time.perf_counter()
        if now >= end:
            break
    return {"ops": ops, "wall": now - start, "cpu": time.process_time() - cpu0}


def worker_cg(n: int, what: str, passes: int) -> None:
    import shmreg
    ds = bd.Dataset(n, OPS)
    peer, op = what.split(":")
    t = None
    if peer == "dict":
        d = dict(ds.items())
        d.update(dict.fromkeys(ds.counter_keys, 0))
        fn = dict_loops(d, ds)[op]
    else:
        name = f"cmpbuilds-cg-{os.getpid()}-{time.monotonic_ns()}"
        t = make_table(ds, name)
        fn = shmreg_loops(t, ds)[op]
    for _ in range(passes):
        fn()
    if t is not None:
        t.close()
        shmreg.unlink(name)


def worker(argv: list) -> None:
    mode, args = argv[0], argv[1:]
    if mode == "ops":
        print(json.dumps(worker_ops(int(args[0]), int(args[1]), int(args[2]), args[3].split(","))))
    elif mode == "create":
        worker_create(int(args[0]))
    elif mode == "reader":
        print(json.dumps(worker_reader(args[0], int(args[1]), int(args[2]), float(args[3]))), flush=True)
    elif mode == "cg":
        worker_cg(int(args[0]), args[1], int(args[2]))
    else:
        raise SystemExit(f"unknown worker mode {mode!r}")


# -- driver ----------------------------------------------------------------------

def _env() -> dict:
    env = dict(os.environ, PYTHONHASHSEED="0")
    env.pop("SHMREG_CRASH_AT", None)
    return env


def _run(py: str, *args, timeout: float = 600) -> str:
    r = subprocess.run([py, os.path.abspath(__file__), "--worker", *map(str, args)],
                       capture_output=True, text=True, timeout=timeout, env=_env())
    if r.returncode:
        raise RuntimeError(f"{py} {args}: {r.stderr}")
    return r.stdout


def _readers(py: str, name: str, k: int, duration: float, n: int) -> dict:
    procs = [subprocess.Popen([py, os.path.abspath(__file__), "--worker", "reader", name, str(n),
                               str(bd.SEED + 1 + i), str(duration)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env())
             for i in range(k)]
    try:
        for p in procs:
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError("a reader failed to start")
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        res = [json.loads(p.communicate(timeout=duration + 60)[0]) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    return {"total": sum(r["ops"] / r["wall"] for r in res),
            "per_cpu": sum(r["ops"] / r["cpu"] for r in res) / k,
            "cpu_share": [r["cpu"] / r["wall"] for r in res]}


def drive(builds: dict, sizes: list, rounds: int, scale_rounds: int, number: int, repeat: int,
          duration: float, scale_entries: int = 100_000) -> dict:
    ops, scal = {}, {}
    names = list(builds)
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for n in sizes:
            for b in order:
                out = json.loads(_run(builds[b], "ops", n, number, repeat, "dict,shmreg,lmdb"))
                for peer, d in out.items():
                    for op, v in d.items():
                        ops.setdefault(f"{b}|{n}|{peer}|{op}", []).append(v)
        print(f"round {r + 1}/{rounds}", file=sys.stderr, flush=True)
    for r in range(scale_rounds):
        order = names if r % 2 == 0 else names[::-1]
        for b in order:
            c = subprocess.Popen([builds[b], os.path.abspath(__file__), "--worker", "create", str(scale_entries)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env())
            try:
                name = c.stdout.readline().strip()
                for k in (1, 2):
                    scal.setdefault(f"{b}|{k}", []).append(_readers(builds[b], name, k, duration, scale_entries))
            finally:
                c.stdin.write("done\n")
                c.stdin.flush()
                c.wait(timeout=60)
        print(f"scaling round {r + 1}/{scale_rounds}", file=sys.stderr, flush=True)
    return {"ops": ops, "scaling": scal}


def summary(res: dict, builds: list, sizes: list) -> str:
    ops = res["ops"]
    med, lo = statistics.median, min
    lines = []
    for n in sizes:
        lines += ["", f"{n:,} entries: ns/op, min / median over the rounds", "",
                  "| operation | " + " | ".join(builds) + " | dict | lmdb | "
                  + " | ".join(f"{b} vs dict" for b in builds) + " |",
                  "|---|" + "---:|" * (2 * len(builds) + 2)]
        for op in bd.OPERATIONS:
            sh = {b: ops[f"{b}|{n}|shmreg|{op}"] for b in builds}
            d = sum((ops[f"{b}|{n}|dict|{op}"] for b in builds), [])
            lm = sum((ops.get(f"{b}|{n}|lmdb|{op}", []) for b in builds), [])
            cells = [f"{lo(sh[b]):.0f} / {med(sh[b]):.0f}" for b in builds]
            cells += [f"{lo(d):.0f} / {med(d):.0f}", f"{lo(lm):.0f} / {med(lm):.0f}" if lm else "n/a"]
            cells += [f"{lo(sh[b]) / lo(d):.2f}x / {med(sh[b]) / med(d):.2f}x" for b in builds]
            lines.append(f"| {op} | " + " | ".join(cells) + " |")
    if res["scaling"]:
        lines += ["", "reader scaling: total get ops/s (best / median); per-CPU-second work of 2 readers"
                  " over 1 (median)", ""]
        for b in builds:
            one, two = res["scaling"][f"{b}|1"], res["scaling"][f"{b}|2"]
            t1, t2 = [r["total"] for r in one], [r["total"] for r in two]
            eff = med(r["per_cpu"] for r in two) / med(r["per_cpu"] for r in one)
            lines.append(f"- {b}: 1 reader {max(t1):,.0f} / {med(t1):,.0f}; 2 readers {max(t2):,.0f} /"
                         f" {med(t2):,.0f}; per-CPU efficiency {eff:.2f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(argv[1:])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--build", action="append", required=True, metavar="NAME=PYTHON",
                   help="a build: name and the python of its venv (give two or more)")
    p.add_argument("--sizes", default="1000,100000", help="table sizes (entries), comma-separated")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--scale-rounds", type=int, default=4)
    p.add_argument("--number", type=int, default=2, help="calls of the 1,000-op loop per timing")
    p.add_argument("--repeat", type=int, default=25, help="timings per measurement (the minimum is kept)")
    p.add_argument("--duration", type=float, default=1.0, help="seconds per reader run")
    p.add_argument("--json", help="write the raw results here")
    a = p.parse_args(argv)
    builds = dict(b.split("=", 1) for b in a.build)
    sizes = [int(s) for s in a.sizes.split(",")]
    res = drive(builds, sizes, a.rounds, a.scale_rounds, a.number, a.repeat, a.duration)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    print(summary(res, list(builds), sizes))


if __name__ == "__main__":
    main()
