"""shmreg.celery with a real ``celery worker --pool=prefork`` (examples/celery_app).

The broker is kombu's filesystem transport in a temporary directory (no
server); tasks write their results into a shmreg table.  The worker runs 3
pool processes recycled every 8 tasks (``--max-tasks-per-child``), and one
pool process is SIGKILLed in the middle of a task.

Proven against the real worker: tasks in many pool processes update a shared
counter exactly; a cache value is computed once across pool processes and a
dedup recipe fires once; every live pool process is registered and only those;
a pool process SIGKILLed mid-task loses its owned entries at once (reads) and
the watcher in the main worker process reaps them and logs a post-mortem;
Celery's replacement registers itself; prometheus_client counters of every
pool process, dead or alive, add up in one table.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys

import pytest

import shmreg
from _helpers import stop_process_tree, unique_name, unlink_tables, wait_until

celery = pytest.importorskip("celery", reason="pip install -e .[test]")
pytest.importorskip("prometheus_client", reason="pip install -e .[test]")
psutil = pytest.importorskip("psutil")

import shmreg.prometheus as sp  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "celery_app")
CONCURRENCY = 3
MAX_TASKS = 8


def _broker_options(queue_dir: str) -> dict:
    processed = os.path.join(queue_dir, "processed")
    control = os.path.join(queue_dir, "control")
    for d in (processed, control):
        os.makedirs(d, exist_ok=True)
    return {"data_folder_in": queue_dir, "data_folder_out": queue_dir,
            "data_folder_processed": processed, "control_folder": control, "polling_interval": 0.05}


class Worker:
    """A ``celery worker`` subprocess on the example app, and a producer."""

    def __init__(self, tmp_path) -> None:
        self.prefix = unique_name("cel") + "-"
        queue = str(tmp_path / "queue")
        self.log_path = tmp_path / "celery.log"
        env = dict(os.environ)
        for k in ("SHMREG_CRASH_AT", "PROMETHEUS_MULTIPROC_DIR", sp.ENV_TABLE):
            env.pop(k, None)
        env.update(CELERY_EXAMPLE_PREFIX=self.prefix, CELERY_EXAMPLE_QUEUE_DIR=queue,
                   PYTHONPATH=EXAMPLE + os.pathsep + env.get("PYTHONPATH", ""))
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tasks", "worker", "--pool=prefork",
             "-c", str(CONCURRENCY), "--max-tasks-per-child", str(MAX_TASKS), "-l", "info",
             "--without-heartbeat", "--without-gossip", "--without-mingle", "-n", f"{self.prefix}@%h"],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=str(tmp_path))
        # kombu's filesystem transport creates a message file and then writes
        # it; a consumer that lists the directory in between takes an empty
        # message and the task is lost (seen under load).  The producer writes
        # into a staging directory and send() renames each file into the
        # queue: a rename is atomic.
        self.queue = queue
        self.staging = str(tmp_path / "staging")
        os.makedirs(self.staging)
        options = dict(_broker_options(queue), data_folder_out=self.staging)
        self.producer = celery.Celery("producer", broker="filesystem://")
        self.producer.conf.update(broker_transport_options=options, task_ignore_result=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def start(self) -> "Worker":
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"celery exited ({self.proc.returncode}):\n{self.log()}")
            return "ready." in self.log()

        wait_until(ready, 60, "the celery worker to be ready")
        self.state = shmreg.Table.open(self.prefix + "state")
        self.registry = shmreg.Registry(self.prefix + "pool")
        wait_until(lambda: self.registered() == self.pool(), 30, "the pool processes to register")
        return self

    def pool(self) -> set:
        try:
            return {c.pid for c in psutil.Process(self.proc.pid).children()
                    if c.status() != psutil.STATUS_ZOMBIE}
        except psutil.NoSuchProcess:
            return set()

    def registered(self) -> set:
        return {reg.pid for _key, reg in self.registry.items()}

    def send(self, name: str, *args) -> str:
        task_id = self.producer.send_task(f"tasks.{name}", args=args).id
        for f in sorted(os.listdir(self.staging)):
            os.rename(os.path.join(self.staging, f), os.path.join(self.queue, f))
        return task_id

    def results(self, ids) -> dict:
        return {i: self.state.get(f"result:{i}") for i in ids if f"result:{i}" in self.state}

    def wait_results(self, ids, timeout: float = 60) -> dict:
        wait_until(lambda: len(self.results(ids)) == len(ids), timeout,
                   f"{len(ids)} task results")
        return self.results(ids)

    def stop(self) -> None:
        pool = self.pool()
        try:
            # SIGKILL, pool included: no test looks at the shutdown, and the
            # worker's synchronous loop over the filesystem broker takes 5-10 s
            # to notice SIGTERM or SIGQUIT.
            stop_process_tree(self.proc, pool, timeout=20, sig=signal.SIGKILL)
        finally:
            self._log.close()
            unlink_tables(self.prefix)


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    w = Worker(tmp_path_factory.mktemp("celery"))
    try:
        yield w.start()
    finally:
        w.stop()


def _metric(worker: Worker, name: str, labels: dict) -> float:
    for family in sp.ShmregCollector(None, worker.prefix + "metrics").collect():
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return 0.0


@pytest.mark.timeout(120)
def test_tasks_in_many_pool_processes_share_exact_counters_cache_and_dedup(worker):
    ids = [worker.send("add", n) for n in range(1, 61)]
    results = worker.wait_results(ids)
    assert worker.state["total"] == sum(range(1, 61))
    pids = {r["pid"] for r in results.values()}
    by_pid = {int(k.split(":")[1]): v for k, v in worker.state.items() if str(k).startswith("by_pid:")}
    assert sum(by_pid.values()) == 60
    assert set(by_pid) == pids
    # Recycled every MAX_TASKS tasks: many pool processes took part.
    assert len(pids) >= 60 // MAX_TASKS
    assert max(by_pid.values()) <= MAX_TASKS

    reports = worker.wait_results([worker.send("report", 7) for _ in range(6)])
    assert set(reports.values()) == {49}
    assert worker.state["computations"] == 1          # computed once across pool processes
    alerts = worker.wait_results([worker.send("alert", "disk-full") for _ in range(6)])
    assert sorted(alerts.values()) == [False] * 5 + [True]
    assert worker.state["alerts_sent"] == 1

    # Registered: exactly the live pool processes (recycled ones vanished).
    wait_until(lambda: worker.registered() == worker.pool() and len(worker.pool()) == CONCURRENCY,
               30, "the registry to match the live pool")
    # Metrics of every pool process, dead or alive, in one table.
    assert _metric(worker, "example_tasks_total", {"task": "add"}) == 60
    assert _metric(worker, "example_task_seconds_count", {"task": "add"}) == 60
    assert _metric(worker, "example_busy", {}) == 0


def _kill_and_wait_dead(pid: int) -> None:
    """SIGKILL ``pid`` (not our child) and return once it has exited: kill()
    returns before the kernel has torn the process down."""
    if hasattr(os, "pidfd_open"):
        fd = os.pidfd_open(pid)
        try:
            os.kill(pid, signal.SIGKILL)
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            assert poller.poll(30_000), f"pid {pid} did not exit"
        finally:
            os.close(fd)
        return
    os.kill(pid, signal.SIGKILL)

    def dead():
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_until(dead, 30, f"pid {pid} to exit")


@pytest.mark.timeout(120)
def test_a_pool_process_sigkilled_mid_task_is_reaped(worker):
    before = worker.state.get("total", 0)
    task = worker.send("hold", "job-42", 60)
    busy = wait_until(lambda: next((k for k in worker.state.keys() if str(k).startswith("busy:")), None),
                      30, "the hold task to start")
    pid = int(busy.split(":")[1])
    assert worker.state.owner(busy) == pid
    assert pid in worker.registered()
    assert _metric(worker, "example_busy", {}) == 1
    _kill_and_wait_dead(pid)

    # Its owned entries vanish from every read at once ...
    assert busy not in worker.state
    assert pid not in worker.registered()
    assert _metric(worker, "example_busy", {}) == 0
    # ... and the watcher in the main worker process reaps them (post-mortem).
    wait_until(lambda: re.search(rf"pool process {pid} died owning \d+ entries in '{re.escape(worker.prefix)}state'"
                                 rf".*job-42", worker.log()), 30, "the watcher's post-mortem")
    wait_until(lambda: all(p["pid"] != pid for p in worker.state._proc_table()), 30,
               "the dead pool process's slot to be released")
    assert worker.state.reap(pid) == 0                 # nothing left to reap
    # Celery replaces it; the replacement registers; counting goes on exactly.
    wait_until(lambda: worker.registered() == worker.pool() and len(worker.pool()) == CONCURRENCY,
               30, "a replacement pool process")
    ids = [worker.send("add", 1) for _ in range(10)]
    worker.wait_results(ids)
    assert worker.state["total"] == before + 10
    assert task not in worker.results([task])
    assert _metric(worker, "example_tasks_total", {"task": "hold"}) == 1
    worker.state.check()


def test_the_module_named_celery_imports_the_real_celery():
    import shmreg.celery as sc

    assert sc.signals is celery.signals
    assert sc.signals.worker_process_init is celery.signals.worker_process_init


def test_bad_configuration_is_refused_before_the_worker_starts():
    import shmreg.celery as sc

    with pytest.raises(TypeError):
        sc.configure(object())
    with pytest.raises(TypeError):
        sc.configure(None, "one-table")
    with pytest.raises(ValueError):
        sc.configure(None, {"../escape": None})
    with pytest.raises(TypeError):
        sc.configure(None, {"ok-name": 42})
    with pytest.raises(ValueError):
        sc.configure(None, {"same": None}, registry="same")
