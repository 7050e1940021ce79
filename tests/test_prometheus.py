"""shmreg.prometheus against prometheus_client's own multiprocess mode and a
real gunicorn.

* Parity: the same increments made by the same script in separate processes
  (some exited, one SIGKILLed, two alive, one forked child), once with
  prometheus_client's files (a temporary ``PROMETHEUS_MULTIPROC_DIR``, its
  ``mark_process_dead`` called for the dead as its docs require) and once
  with shmreg: the scrapes parse to the same samples (pid labels mapped to
  the worker that had the pid).
* Exactness: processes hammering counters and histograms, SIGKILLed at
  random instants, lose and duplicate nothing.
* Churn: a real gunicorn, 4 workers recycled by ``--max-requests`` and
  SIGKILLed: counter totals equal the requests made, every gauge mode shows
  what prometheus_client documents, and the table stays bounded.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest

import shmreg
from _helpers import unique_name

prometheus_client = pytest.importorskip("prometheus_client", reason="pip install -e .[test]")
from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import shmreg.prometheus as sp  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "prometheus_gunicorn")

WORKER = '"""One worker process for tests/test_prometheus.py: the same increments under\nprometheus_client\'s own multiprocess mode (``files``) or shmreg\'s (``shmreg``).\n\n    python _prom_worker.py MODE TARGET INDEX [hold]\n\nMODE ``files``: TARGET is the PROMETHEUS_MULTIPROC_DIR; ``shmreg``: the table.\nPrints this process\'s pid, then ``ready`` after its last update; with\n``hold`` it then sleeps until killed.\n"""\n\nimport os\nimport sys\nimport time\n\nmode, target, index = sys.argv[1], sys.argv[2], int(sys.argv[3])\nhold = sys.argv[4:] == ["hold"]\nif mode == "files":\n    os.environ["PROMETHEUS_MULTIPROC_DIR"] = target\nelse:\n    import shmreg.prometheus\n\n    shmreg.prometheus.enable(target)\n\nfrom prometheus_client import Counter, Gauge, Histogram, Summary  # noqa: E402\n\nMODES = ("all", "liveall", "min", "livemin", "max", "livemax", "sum", "livesum",\n         "mostrecent", "livemostrecent")\n\nrequests = Counter("app_requests", "Requests served.", ["path"])\nplain = Counter("app_plain", "A counter without labels.")\nlatency = Histogram("app_latency_seconds", "Latency.", ["path"], buckets=(0.25, 1, 4, 16))\nsize = Summary("app_size_bytes", "Sizes.")\ngauges = {m: Gauge(f"app_gauge_{m}", f"A {m} gauge.", ["k"], multiprocess_mode=m) for m in MODES}\nuntouched = Gauge("app_untouched", "Created, never set.")\n\nprint(os.getpid(), flush=True)\nrequests.labels("/a").inc()\nrequests.labels("/a").inc(index + 1)\nrequests.labels("/b").inc(0.25 * index)\nplain.inc(2)\nfor v in (0.125, 0.5, 2.0, 3.75, 64.0)[: index + 2]:\n    latency.labels("/a").observe(v * (index + 1))\nsize.observe(512 * index + 0.5)\nfor m, g in gauges.items():\n    if m.endswith("mostrecent"):\n        g.labels("x").set(10.5 + index)\n        time.sleep(0.002)     # distinct timestamps across workers\n    else:\n        g.labels("x").set(index * 2 - 3)\n        g.labels("y").inc(index + 0.5)\n        g.labels("y").dec(0.25)\nif index == 1:\n    # A forked child (gunicorn --preload style): starts its own share from zero.\n    child = os.fork()\n    if child == 0:\n        requests.labels("/a").inc(7)\n        gauges["all"].labels("x").set(99)\n        gauges["max"].labels("x").set(50)\n        gauges["livesum"].labels("y").inc(1000)\n        os._exit(0)\n    os.waitpid(child, 0)\n    print("child", child, flush=True)\nprint("ready", flush=True)\nif hold:\n    time.sleep(600)\n'


def _env() -> dict:
    env = dict(os.environ)
    for k in ("SHMREG_CRASH_AT", "PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir", sp.ENV_TABLE):
        env.pop(k, None)
    return env


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.kill()
    p.wait(timeout=10)
    if p.stdout is not None:
        p.stdout.close()


def _samples(text: str, pids: dict) -> set:
    """Parsed samples with pid labels replaced by the worker that had the pid."""
    out = set()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = dict(s.labels)
            if "pid" in labels:
                labels["pid"] = pids[int(labels["pid"])]
            out.add((family.type, s.name, tuple(sorted(labels.items())), s.value))
    return out


def _run_workers(script, mode: str, target: str) -> tuple:
    """Workers 0-4 one after the other: 0 and 1 exit (1 after forking a child),
    2 is SIGKILLed after its updates, 3 and 4 stay alive.  Returns (procs, pid -> name)."""
    procs, pids = [], {}
    try:
        for i in range(5):
            hold = i >= 2
            p = subprocess.Popen([sys.executable, str(script), mode, target, str(i)] + (["hold"] if hold else []),
                                 stdout=subprocess.PIPE, text=True, env=_env())
            procs.append(p)
            pids[int(p.stdout.readline())] = f"w{i}"
            line = p.stdout.readline().split()
            if line[0] == "child":
                pids[int(line[1])] = f"w{i}-child"
                line = p.stdout.readline().split()
            assert line == ["ready"], line
            if not hold:
                assert p.wait(timeout=30) == 0
        os.kill(procs[2].pid, signal.SIGKILL)
        procs[2].wait(timeout=10)
        return procs, pids
    except BaseException:
        for p in procs:
            _stop(p)
        raise


@pytest.mark.timeout(120)
def test_scrape_is_the_text_of_prometheus_client_multiprocess(tmp_path, table_name):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    mpdir = tmp_path / "multiproc"
    mpdir.mkdir()

    procs, pids_files = _run_workers(script, "files", str(mpdir))
    try:
        for pid, who in pids_files.items():
            if who in ("w0", "w1", "w1-child", "w2"):
                mark_process_dead(pid, str(mpdir))     # what its docs require for live gauges
        reg = CollectorRegistry()
        MultiProcessCollector(reg, path=str(mpdir))
        files_text = generate_latest(reg).decode()
    finally:
        for p in procs:
            _stop(p)

    procs, pids_shm = _run_workers(script, "shmreg", table_name)
    try:
        shm_text = generate_latest(sp.make_registry(table_name)).decode()
    finally:
        for p in procs:
            _stop(p)

    expected = _samples(files_text, pids_files)
    got = _samples(shm_text, pids_shm)
    assert got == expected, (sorted(expected - got), sorted(got - expected))
    # The same families, in the same exposition (HELP/TYPE lines included).
    assert sorted(l for l in shm_text.splitlines() if l.startswith("#")) == \
        sorted(l for l in files_text.splitlines() if l.startswith("#"))
    # Not vacuous: dead processes' counts are in, dead live gauges are out.
    names = {(s[1], s[2]) for s in got}
    assert ("app_requests_total", (("path", "/a"),)) in names
    assert not any(s[1] == "app_gauge_liveall" and dict(s[2])["pid"] in ("w0", "w2") for s in got)
    assert any(s[1] == "app_gauge_all" and dict(s[2])["pid"] == "w2" for s in got)
    assert not any(s[1].endswith("_created") for s in got)


HAMMER = """
import os, sys
import shmreg.prometheus
shmreg.prometheus.enable(sys.argv[1])
from prometheus_client import Counter, Histogram
c = Counter("hammer", "h", ["k"])
h = Histogram("hammer_seconds", "h", buckets=(1, 2))
child = c.labels("x")
out = os.fdopen(1, "w", buffering=1)
n = 0
out.write("go\\n")
while True:
    child.inc()
    h.observe(0.5)
    n += 1
    if n % 64 == 0:
        out.write(f"{n}\\n")
"""


@pytest.mark.timeout(120)
def test_totals_are_exact_when_workers_are_sigkilled_at_random_instants(table_name):
    rng = random.Random(1234)
    done = 0
    killed = 0
    procs = []
    try:
        for _ in range(3):
            batch = [subprocess.Popen([sys.executable, "-c", HAMMER, table_name], stdout=subprocess.PIPE,
                                      text=True, env=_env()) for _ in range(3)]
            procs += batch
            for p in batch:
                assert p.stdout.readline().strip() == "go"
            time.sleep(rng.uniform(0.2, 0.6))
            for p in batch:
                time.sleep(rng.uniform(0, 0.05))
                os.kill(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
                reported = [int(x) for x in p.stdout.read().split()]
                done += max(reported, default=0)
                killed += 1
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in sp.ShmregCollector(None, table_name).collect() for s in f.samples}
        total = samples[("hammer_total", (("k", "x"),))]
        count = samples[("hammer_seconds_count", ())]
        # Each worker reported every 64th increment; it may have done up to
        # 63 more plus the one in flight: nothing lost, nothing counted twice.
        assert done <= total <= done + 64 * killed, (done, total)
        assert total == int(total)
        # observe() adds its _sum before its bucket: a kill in between leaves
        # at most one observation's sum without its count, per killed worker.
        assert 0 <= samples[("hammer_seconds_sum", ())] - 0.5 * count <= 0.5 * killed
        assert abs(count - total) <= killed
        assert samples[("hammer_seconds_bucket", (("le", "1.0"),))] == count
        assert total > 1000        # the workers really ran
        shmreg.Table.open(table_name).check()
    finally:
        for p in procs:
            _stop(p)


FLOATS = """
import sys
import shmreg.prometheus
shmreg.prometheus.enable(sys.argv[1])
from prometheus_client import Counter, Gauge, Summary
s = Summary("fl", "f")
c = Counter("fl_c", "f")
g = Gauge("fl_g", "f", multiprocess_mode="sum")
for i in range(2000):
    s.observe(0.25)
    c.inc(0.5)
    g.inc(1.5)
    g.dec(0.5)
g.set(3.25)
"""


@pytest.mark.timeout(120)
def test_fractional_increments_are_exact_under_contention(table_name):
    procs = [subprocess.Popen([sys.executable, "-c", FLOATS, table_name], env=_env()) for _ in range(4)]
    for p in procs:
        assert p.wait(timeout=60) == 0
    got = {s.name: s.value for f in sp.ShmregCollector(None, table_name).collect() for s in f.samples}
    assert got["fl_sum"] == 0.25 * 2000 * 4
    assert got["fl_count"] == 2000 * 4
    assert got["fl_c_total"] == 0.5 * 2000 * 4
    assert got["fl_g"] == 3.25 * 4          # sum mode: every process's last value


def test_switch_by_environment_variable(table_name):
    code = """
import shmreg.prometheus
from prometheus_client import values, Counter
assert values.ValueClass is shmreg.prometheus.ShmregValue, values.ValueClass
Counter("env_switch", "e").inc(3)
print(shmreg.prometheus.enabled().name)
"""
    env = _env()
    env[sp.ENV_TABLE] = table_name
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == table_name
    text = generate_latest(sp.make_registry(table_name)).decode()
    assert "env_switch_total 3.0" in text


def test_bad_input(table_name):
    env_before = os.environ.pop(sp.ENV_TABLE, None)
    try:
        with pytest.raises(ValueError):
            sp.enable()
        with pytest.raises(TypeError):
            sp.enable(42)
        with pytest.raises(ValueError):
            sp.enable("../etc")
        with pytest.raises(shmreg.TableNotFoundError):
            sp.ShmregCollector(None, unique_name("absent"))
        with pytest.raises(ValueError):
            sp.ShmregCollector(None)
        assert sp.enabled() is None
    finally:
        if env_before is not None:
            os.environ[sp.ENV_TABLE] = env_before


BOUNDED = """
import os, sys
import shmreg.prometheus
shmreg.prometheus.enable(sys.argv[1])
from prometheus_client import Counter, Gauge, Histogram
modes = [m for m in Gauge._MULTIPROC_MODES if m != "all"]
c = Counter("b_req", "r")
h = Histogram("b_lat", "l")
gs = [Gauge("b_" + m, m, multiprocess_mode=m) for m in modes]
for i in range(int(sys.argv[2])):
    if os.fork() == 0:
        c.inc()
        h.observe(0.1)
        for g in gs:
            g.set(i)
        os._exit(0)
    os.wait()
"""


@pytest.mark.timeout(120)
def test_table_does_not_grow_with_restarts(table_name):
    def run(n):
        out = subprocess.run([sys.executable, "-c", BOUNDED, table_name, str(n)], env=_env(),
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        samples = {s.name: s.value for f in sp.ShmregCollector(None, table_name).collect() for s in f.samples}
        return samples, len(shmreg.Table.open(table_name))

    first, size_first = run(20)
    second, size_second = run(200)
    assert second["b_req_total"] == 220
    assert second["b_lat_count"] == 220
    assert second["b_min"] == 0 and second["b_max"] == 199 and second["b_sum"] == sum(range(20)) + sum(range(200))
    assert second["b_mostrecent"] == 199
    assert "b_livemax" not in second and "b_liveall" not in second   # every process is dead
    assert size_second == size_first, (size_first, size_second)


def test_values_in_one_process_follow_prometheus_client(table_name):
    from prometheus_client import Counter, Gauge, values

    before = values.ValueClass
    t = sp.enable(table_name, export_env=False)
    try:
        assert sp.enabled() is t and values.ValueClass is sp.ShmregValue
        c = Counter("one_c", "c", registry=None)
        c.inc(2)
        c.inc(0.5)
        assert c._value.get() == 2.5
        c.reset()                                # this process's share back to 0
        c.inc(1)
        s = Gauge("one_sum", "s", registry=None, multiprocess_mode="sum")
        s.set(7.75)
        s.inc(2)
        s.set(-1.5)
        m = Gauge("one_mr", "m", registry=None, multiprocess_mode="mostrecent")
        with pytest.raises(RuntimeError):
            m.inc()                              # prometheus_client forbids it in mostrecent mode
        m.set(4)
        got = {x.name: x.value for f in sp.ShmregCollector(None).collect() for x in f.samples}
        assert got == {"one_c_total": 1.0, "one_sum": -1.5, "one_mr": 4.0}
    finally:
        sp.disable()
    assert values.ValueClass is before and sp.enabled() is None


INFO_ENUM = """
import sys
import shmreg.prometheus
shmreg.prometheus.enable(sys.argv[1])
from prometheus_client import Enum, Info
build = Info("build", "Build info.")
state = Enum("task_state", "Task state.", ["queue"], states=["idle", "busy", "done"])
never = Info("never", "Never set.")
if sys.argv[2] == "first":
    build.info({"version": "1.0"})
    state.labels("q1").state("busy")
    state.labels("q2").state("done")
else:
    build.info({"version": "1.1"})
    state.labels("q1").state("done")
    state.labels("q3")                 # created, never set: its first state
"""


def test_info_and_enum_show_the_latest_value_of_any_process(table_name):
    from prometheus_client import Enum, Info

    for which in ("first", "second"):
        out = subprocess.run([sys.executable, "-c", INFO_ENUM, table_name, which], env=_env(),
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
    # What one process making the latest calls exports (prometheus_client's
    # multiprocess mode exports no Info or Enum at all).
    reg = CollectorRegistry()
    Info("build", "Build info.", registry=reg).info({"version": "1.1"})
    state = Enum("task_state", "Task state.", ["queue"], states=["idle", "busy", "done"], registry=reg)
    state.labels("q1").state("done")
    state.labels("q2").state("done")
    state.labels("q3")
    Info("never", "Never set.", registry=reg)
    expected = generate_latest(reg).decode()
    got = generate_latest(sp.make_registry(table_name)).decode()
    assert _samples(got, {}) == _samples(expected, {})
    assert sorted(l for l in got.splitlines() if l.startswith("#")) == \
        sorted(l for l in expected.splitlines() if l.startswith("#"))
