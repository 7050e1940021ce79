"""prometheus_client metrics: shmreg.prometheus vs prometheus_client's own
multiprocess mode (mmap files in ``PROMETHEUS_MULTIPROC_DIR``), with
prometheus_client's single-process mode as the floor.

    python -m pytest benchmarks/test_bench_prometheus.py -q -s

- **call cost**: ``Counter.inc()``, ``Histogram.observe()`` (a fractional
  value: the ``_sum`` takes shmreg's compare-and-swap path) and
  ``Gauge.set()`` (``livesum`` mode), 1,000 calls per round, the three
  value classes side by side in one process (each metric is created while
  its value class is installed).
- **scrape after restarts**: a worker process is forked, creates the app's
  metrics (4 labelled counters x 5 label values, 2 histograms x 5 labels,
  a ``livesum`` and a ``max`` gauge), increments each, and exits; repeated
  0, 100 and 1,000 times, then 8 workers stay alive and the parent times
  ``generate_latest`` on a registry with ``MultiProcessCollector`` /
  ``ShmregCollector`` (best and median of 7).  Also: files in the directory
  and their bytes, the table's entries and bytes used.  Target: shmreg's
  scrape time flat in the number of restarts.

Both modes get exactly the same work; totals are checked equal (so the
figures compare equal outputs).  Results print in the terminal summary and
go to ``extra_info``; nothing about speed is asserted.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import tempfile
import time

import pytest

import _bench_common as bc

import shmreg

prometheus_client = pytest.importorskip("prometheus_client", reason="pip install -e .[prometheus]")
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values  # noqa: E402
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import shmreg.prometheus as sp  # noqa: E402

CALLS = 1000
RESTARTS = (0, 100, 1000)
LIVE = 8
_cost: dict = {}


class _Mode:
    """Installs one value class while metrics are created."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.dir = tempfile.mkdtemp(prefix="bench-prom-") if name == "files" else None
        self.table = bc.unique_table_name("prom") if name == "shmreg" else None

    def __enter__(self):
        self._saved = values.ValueClass
        if self.name == "files":
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = self.dir
            values.ValueClass = values.MultiProcessValue()
        elif self.name == "shmreg":
            sp.enable(self.table, export_env=False)
        return self

    def __exit__(self, *exc):
        if self.name == "shmreg":
            sp.disable()
        values.ValueClass = self._saved
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)

    def cleanup(self) -> None:
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        if self.table:
            try:
                shmreg.unlink(self.table)
            except shmreg.TableNotFoundError:
                pass


@pytest.fixture(scope="module")
def modes():
    ms = {name: _Mode(name) for name in ("single", "files", "shmreg")}
    yield ms
    for m in ms.values():
        m.cleanup()
    _summary()


def _make(mode: _Mode, kind: str):
    with mode:
        if kind == "inc":
            c = Counter(f"bench_{mode.name}_c", "c", ["path"], registry=None).labels("/x")
            return lambda: [c.inc() for _ in range(CALLS)]
        if kind == "observe":
            h = Histogram(f"bench_{mode.name}_h", "h", ["path"], registry=None).labels("/x")
            return lambda: [h.observe(0.0123) for _ in range(CALLS)]
        g = Gauge(f"bench_{mode.name}_g", "g", registry=None, multiprocess_mode="livesum")
        return lambda: [g.set(7.0) for _ in range(CALLS)]


@pytest.mark.parametrize("kind", ["inc", "observe", "set"])
@pytest.mark.parametrize("mode", ["single", "files", "shmreg"])
def test_call_cost(benchmark, modes, mode, kind):
    benchmark.group = f"prometheus-{kind}"
    fn = _make(modes[mode], kind)
    benchmark.pedantic(fn, rounds=30, warmup_rounds=2, iterations=1)
    best = benchmark.stats.stats.min / CALLS * 1e9
    median = benchmark.stats.stats.median / CALLS * 1e9
    benchmark.extra_info.update(ns_per_call_best=round(best), ns_per_call_median=round(median))
    _cost[(kind, mode)] = (best, median)


# -- scrape after restarts ----------------------------------------------------------


def _app_metrics():
    reg = None
    counters = [Counter(f"app_c{i}", "c", ["path"], registry=reg) for i in range(4)]
    hists = [Histogram(f"app_h{i}", "h", ["path"], registry=reg) for i in range(2)]
    busy = Gauge("app_busy", "b", registry=reg, multiprocess_mode="livesum")
    peak = Gauge("app_peak", "p", registry=reg, multiprocess_mode="max")
    return counters, hists, busy, peak


def _worker(mode: str, target: str, hold_fd: int | None) -> None:
    """In a forked child: be one worker's lifetime, then exit (or hold)."""
    try:
        if mode == "files":
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = target
            values.ValueClass = values.MultiProcessValue()
        else:
            sp.enable(target, export_env=False)
        counters, hists, busy, peak = _app_metrics()
        for p in range(5):
            for c in counters:
                c.labels(f"/p{p}").inc()
            for h in hists:
                h.labels(f"/p{p}").observe(0.05 * (p + 1))
        busy.inc()
        peak.set(os.getpid() % 1000)
        if hold_fd is not None:
            os.write(hold_fd, b"x")
            time.sleep(3600)
    finally:
        os._exit(0)


def _fork(mode: str, target: str, hold_fd: int | None = None) -> int:
    pid = os.fork()
    if pid == 0:
        _worker(mode, target, hold_fd)
    return pid


def _restart(mode: str, target: str, n: int) -> None:
    for _ in range(n):
        pid = _fork(mode, target)
        os.waitpid(pid, 0)
        if mode == "files":
            # What prometheus_client's docs require in gunicorn's child_exit
            # (else the dead workers' live gauges stay); shmreg needs nothing.
            mark_process_dead(pid, target)


def _scrape_registry(mode: str, target: str) -> CollectorRegistry:
    reg = CollectorRegistry()
    if mode == "files":
        MultiProcessCollector(reg, path=target)
    else:
        sp.ShmregCollector(reg, target)
    return reg


def _footprint(mode: str, target: str) -> dict:
    if mode == "files":
        files = [os.path.join(target, f) for f in os.listdir(target)]
        return {"files": len(files), "bytes": sum(os.path.getsize(f) for f in files),
                "disk_bytes": sum(os.stat(f).st_blocks * 512 for f in files)}
    t = shmreg.Table.open(target)
    try:
        s = t.stats()
        return {"entries": s["entries"], "bytes": s["bytes_used"], "segment_bytes": s["segment_bytes"]}
    finally:
        t.close()


_scrapes: dict = {}


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("mode", ["files", "shmreg"])
def test_scrape_after_restarts(benchmark, mode):
    benchmark.group = "prometheus-scrape"
    target = tempfile.mkdtemp(prefix="bench-prom-") if mode == "files" else bc.unique_table_name("scrape")
    if mode == "shmreg":
        shmreg.Table(target, capacity=20_000).close()
    done = 0
    totals = {}
    try:
        for restarts in RESTARTS:
            _restart(mode, target, restarts - done)
            done = restarts
            r, w = os.pipe()
            live = [_fork(mode, target, w) for _ in range(LIVE)]
            for _ in live:
                os.read(r, 1)
            os.close(r)
            os.close(w)
            try:
                reg = _scrape_registry(mode, target)
                times = []
                for _ in range(7):
                    t0 = time.perf_counter()
                    text = generate_latest(reg)
                    times.append(time.perf_counter() - t0)
                fams = {f.name: f for f in text_string_to_metric_families(text.decode())}
                totals[restarts] = sum(s.value for s in fams["app_c0"].samples if s.name == "app_c0_total")
                assert totals[restarts] == 5 * (restarts + LIVE)
                assert sum(s.value for s in fams["app_busy"].samples) == LIVE
                _scrapes[(mode, restarts)] = {"best_ms": min(times) * 1e3,
                                              "median_ms": statistics.median(times) * 1e3,
                                              "bytes": len(text), **_footprint(mode, target)}
            finally:
                for pid in live:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    if mode == "files":
                        mark_process_dead(pid, target)
            done += LIVE
        benchmark.extra_info.update({f"{k[1]}": v for k, v in _scrapes.items() if k[0] == mode})
        # One timed scrape for pytest-benchmark's table (the last state).
        benchmark.pedantic(lambda: generate_latest(_scrape_registry(mode, target)), rounds=3, iterations=1)
    finally:
        if mode == "files":
            shutil.rmtree(target, ignore_errors=True)
        else:
            try:
                shmreg.unlink(target)
            except shmreg.TableNotFoundError:
                pass


def _summary() -> None:
    lines = ["", "prometheus_client metrics: ns per call, best (median) of 30 rounds of 1,000 calls", "",
             "| call | single-process | files (multiprocess) | shmreg | shmreg vs files (best) |",
             "|---|---:|---:|---:|---:|"]
    for kind, label in (("inc", "Counter.inc()"), ("observe", "Histogram.observe()"),
                        ("set", "Gauge.set() livesum")):
        c = {m: _cost.get((kind, m)) for m in ("single", "files", "shmreg")}
        if None in c.values():
            continue
        ratio = c["files"][0] / c["shmreg"][0]
        cell = {m: f"{c[m][0]:,.0f} ({c[m][1]:,.0f})" for m in c}
        lines.append(f"| {label} | {cell['single']} | {cell['files']} | {cell['shmreg']} | "
                     f"{ratio if ratio >= 1 else 1 / ratio:.2f}x {'faster' if ratio >= 1 else 'slower'} |")
    if _scrapes:
        lines += ["", f"scrape with {LIVE} live workers after N restarts (generate_latest, best / median of 7)", "",
                  "| restarts | files: ms | files: files, bytes | shmreg: ms | shmreg: entries, bytes used |",
                  "|---:|---:|---:|---:|---:|"]
        for n in RESTARTS:
            f, s = _scrapes.get(("files", n)), _scrapes.get(("shmreg", n))
            if not f or not s:
                continue
            lines.append(f"| {n:,} | {f['best_ms']:.1f} / {f['median_ms']:.1f} | {f['files']:,}, "
                         f"{f['bytes']:,} B ({f['disk_bytes']:,} B on disk) | {s['best_ms']:.1f} / "
                         f"{s['median_ms']:.1f} | {s['entries']:,}, {s['bytes']:,} B |")
    bc.NOTES.extend(lines)
