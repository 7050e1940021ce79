"""shmreg.prometheus under a real gunicorn (examples/prometheus_gunicorn): 4
sync workers recycled by ``--max-requests`` and SIGKILLed, one of them in the
middle of a request.

After N requests the scrape (served by a worker through prometheus_client's
``make_wsgi_app``) shows exactly N, every gauge mode shows what
prometheus_client documents for it, computed from which worker answered
which request, and the table holds no more entries than the live workers
need (plus the ``all`` gauge's one per worker that ever set it, which is
that mode's meaning).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys

import pytest

import shmreg
from _helpers import stop_process_tree, unique_name, wait_until

pytest.importorskip("gunicorn", reason="pip install -e .[test]")
pytest.importorskip("prometheus_client", reason="pip install -e .[test]")
psutil = pytest.importorskip("psutil")
from gunicorn.config import KNOWN_SETTINGS  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import shmreg.prometheus as sp  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF = os.path.join(ROOT, "examples", "prometheus_gunicorn", "gunicorn.conf.py")
WORKERS = 4
MAX_REQUESTS = 25
N = 300
MODES = ("all", "liveall", "min", "livemin", "max", "livemax", "sum", "livesum",
         "mostrecent", "livemostrecent")
BUCKETS = (0.25, 0.5, 1.0, 2.0, 4.0)


class Server:
    def __init__(self, tmp_path) -> None:
        self.table_name = unique_name("prom")
        self.log_path = tmp_path / "gunicorn.log"
        env = dict(os.environ)
        for k in ("SHMREG_CRASH_AT", "PROMETHEUS_MULTIPROC_DIR", sp.ENV_TABLE):
            env.pop(k, None)
        env.update(PROM_EXAMPLE_TABLE=self.table_name, PROM_EXAMPLE_BIND="127.0.0.1:0",
                   PROM_EXAMPLE_WORKERS=str(WORKERS), PROM_EXAMPLE_MAX_REQUESTS=str(MAX_REQUESTS),
                   PROM_EXAMPLE_TEMPORARY="1")
        cmd = [sys.executable, "-m", "gunicorn", "-c", CONF, "--graceful-timeout", "5"]
        if "control_socket_disable" in {s.name for s in KNOWN_SETTINGS}:
            cmd.append("--no-control-socket")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     cwd=str(tmp_path))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def start(self) -> "Server":
        def listening():
            if self.proc.poll() is not None:
                raise AssertionError(f"gunicorn exited ({self.proc.returncode}):\n{self.log()}")
            m = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", self.log())
            return m and int(m.group(1))

        self.port = wait_until(listening, 30, "gunicorn to listen")
        wait_until(lambda: len(self.workers()) == WORKERS, 30, "4 workers")
        return self

    def workers(self) -> set:
        try:
            return {c.pid for c in psutil.Process(self.proc.pid).children()
                    if c.status() != psutil.STATUS_ZOMBIE}
        except psutil.NoSuchProcess:
            return set()

    def get(self, path: str, timeout: float = 30) -> tuple:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def stop(self) -> None:
        workers = self.workers()
        try:
            stop_process_tree(self.proc, workers, timeout=15)
        finally:
            self._log.close()
            try:
                shmreg.unlink(self.table_name)
            except shmreg.TableNotFoundError:
                pass


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path)
    try:
        yield s.start()
    finally:
        s.stop()


def _held_worker(table: shmreg.Table) -> int | None:
    """The pid whose ``app_in_progress`` share is 1 (the /hold request)."""
    for key, value in table.items():
        if isinstance(key, str) and '"app_in_progress"' in key and "\x1flivesum\x1f" in key and value == 1.0:
            return int(key.split("\x1f")[3])
    return None


@pytest.mark.timeout(180)
def test_counters_exact_and_gauge_modes_under_worker_churn_and_sigkill(server):
    last: dict = {}            # pid -> last request index it served
    served: dict = {}          # pid -> requests it served (max_requests recycles it)
    observed = []
    killed = []
    table = shmreg.Table.open(server.table_name)
    for i in range(1, N + 1):
        v = (i % 9) * 0.5
        status, body = server.get(f"/work?i={i}&v={v}")
        assert status == 200, body
        last[json.loads(body)["pid"]] = i
        served[json.loads(body)["pid"]] = served.get(json.loads(body)["pid"], 0) + 1
        observed.append(v)
        if i in (100, 200):
            # SIGKILL a worker between requests ...
            pid = json.loads(body)["pid"]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        if i == 150:
            # ... and one in the middle of a request (counted, in progress).
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            conn.request("GET", "/hold?s=60")
            pid = wait_until(lambda: _held_worker(table), 20, "the /hold request to be in progress")
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            with pytest.raises((http.client.HTTPException, OSError)):
                conn.getresponse().read()
            conn.close()
    # Let the last recycled worker be replaced; no request is in flight now.
    # A worker that served its max_requests is exiting: shmreg.gunicorn's
    # worker_exit has already deleted what it owned (its live gauges), so it
    # is no longer live even while its process is still winding down.
    recycled = {pid for pid, n in served.items() if n >= MAX_REQUESTS}
    wait_until(lambda: len(server.workers()) == WORKERS
               and not ((set(killed) | recycled) & server.workers()), 30, "4 workers again")
    live_before = server.workers()
    status, body = server.get("/metrics")
    assert status == 200
    # Each pid serves at most MAX_REQUESTS /work requests: at least N // MAX_REQUESTS
    # pids served them (exactly that many when every worker, even a killed one, served its last).
    assert len(last) >= N // MAX_REQUESTS, "workers were recycled"

    samples: dict = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value

    # Counters, histogram: exact, every request of every worker, dead or alive.
    assert samples[("app_requests_total", (("path", "/work"),))] == N
    assert samples[("app_requests_total", (("path", "/hold"),))] == 1
    assert samples[("app_latency_seconds_count", ())] == N
    assert samples[("app_latency_seconds_sum", ())] == sum(observed)
    for b in BUCKETS:
        assert samples[("app_latency_seconds_bucket", (("le", str(b)),))] == sum(1 for v in observed if v <= b)
    assert samples[("app_latency_seconds_bucket", (("le", "+Inf"),))] == N
    # Info: exported (prometheus_client's multiprocess mode cannot).
    assert samples[("app_build_info", (("version", "1.0"), ("worker_class", "sync")))] == 1.0
    # The SIGKILLed /hold request's worker no longer counts as in progress.
    assert samples[("app_in_progress", ())] == 0

    # Gauges: prometheus_client's documented meaning of each mode, where
    # "live" is the workers alive at scrape time.
    lab = (("app", "example"),)
    alive_last = {p: i for p, i in last.items() if p in live_before}
    every = {(("app", "example"), ("pid", str(p))): float(i) for p, i in last.items()}
    got_all = {k[1]: v for k, v in samples.items() if k[0] == "app_last_all"}
    assert got_all == every
    got_liveall = {k[1]: v for k, v in samples.items() if k[0] == "app_last_liveall"}
    assert got_liveall == {k: v for k, v in every.items() if int(dict(k)["pid"]) in live_before}
    assert samples[("app_last_min", lab)] == min(last.values())
    assert samples[("app_last_max", lab)] == max(last.values())
    assert samples[("app_last_sum", lab)] == sum(last.values())
    assert samples[("app_last_mostrecent", lab)] == N
    for mode, agg in (("livemin", min), ("livemax", max), ("livesum", sum), ("livemostrecent", max)):
        if alive_last:
            assert samples[(f"app_last_{mode}", lab)] == agg(alive_last.values()), mode
        else:
            assert (f"app_last_{mode}", lab) not in samples

    # Bounded table: apart from the all-mode gauge (one entry per worker that
    # ever set it: that mode's meaning), entries are the shared series plus
    # what the live workers own.
    kinds: dict = {}
    for key in table.keys():
        kind, _typ, mode, _proc, _tail = key.split("\x1f", 4)
        kinds.setdefault((kind, mode), 0)
        kinds[(kind, mode)] += 1
    all_mode = kinds.pop(("p", "all"), 0)
    assert all_mode == len(last)
    shared = sum(n for (kind, _), n in kinds.items() if kind in ("i", "f", "d", "s"))
    per_process = sum(n for (kind, _), n in kinds.items() if kind in ("p", "m"))
    # counter x2 labels, 6 buckets + sum (int and float) + sum gauge,
    # min/max/mostrecent dead entries, the Info
    assert shared <= 2 + 6 + 2 + 1 + 3 + 1
    # 8 per-process gauges + in-progress + marker, per live worker
    assert per_process <= WORKERS * 10, kinds
    assert len(last) * 8 > WORKERS * 10    # without folding and reaping it would exceed that
    table.check()
