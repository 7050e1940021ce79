"""A Celery app whose prefork pool processes share shmreg tables (see README.md).

    celery -A tasks worker --pool=prefork -c 3 --max-tasks-per-child 8

The broker is kombu's filesystem transport (a directory, no server) and
results are written into a shmreg table, so the example needs nothing but
Python.  Environment (optional):

  CELERY_EXAMPLE_PREFIX     prefix of the table names (default "celery-example-")
  CELERY_EXAMPLE_QUEUE_DIR  the broker's directory (default /tmp/celery-example-queue)
"""

import os
import time

from celery import Celery
from prometheus_client import Counter, Gauge, Histogram

import shmreg.celery
import shmreg.prometheus
from shmreg.celery import CacheSpec, TableSpec
from shmreg.recipes import emit_once

PREFIX = os.environ.get("CELERY_EXAMPLE_PREFIX", "celery-example-")
QUEUE_DIR = os.environ.get("CELERY_EXAMPLE_QUEUE_DIR", "/tmp/celery-example-queue")
STATE, CACHE, POOL, METRICS = (PREFIX + s for s in ("state", "cache", "pool", "metrics"))


def broker_options(queue_dir: str) -> dict:
    """kombu filesystem transport settings (a producer uses the same)."""
    processed = os.path.join(queue_dir, "processed")
    control = os.path.join(queue_dir, "control")
    for d in (processed, control):
        os.makedirs(d, exist_ok=True)
    return {"data_folder_in": queue_dir, "data_folder_out": queue_dir,
            "data_folder_processed": processed, "control_folder": control, "polling_interval": 0.05}


def send(name: str, *args) -> str:
    """Queue task ``name`` from a producer process; return its id.

    kombu's filesystem transport creates a message file and then writes it,
    so a worker listing the directory in between can take an empty message
    (the task is lost).  Write into a staging directory, then rename into
    the queue (atomic)."""
    global _producer
    staging = os.path.join(QUEUE_DIR, "staging")
    if _producer is None:
        os.makedirs(staging, exist_ok=True)
        _producer = Celery("producer", broker="filesystem://")
        _producer.conf.update(broker_transport_options=dict(broker_options(QUEUE_DIR),
                                                            data_folder_out=staging),
                              task_ignore_result=True)
    task_id = _producer.send_task(f"tasks.{name}", args=args).id
    for f in sorted(os.listdir(staging)):
        os.rename(os.path.join(staging, f), os.path.join(QUEUE_DIR, f))
    return task_id


_producer = None
app = Celery("tasks", broker="filesystem://")
app.conf.update(broker_transport_options=broker_options(QUEUE_DIR), task_ignore_result=True,
                worker_prefetch_multiplier=1, broker_connection_retry_on_startup=True)

# The shared tables, the pool registry and a watcher that reaps dead pool processes.
shmreg.celery.configure(app, tables={STATE: TableSpec(capacity=10_000),
                                     CACHE: CacheSpec(ttl=300, capacity=1_000)},
                        registry=POOL)
# prometheus_client metrics of every pool process in one table (before any metric).
shmreg.prometheus.enable(METRICS)

TASKS = Counter("example_tasks", "Tasks run.", ["task"])
DURATION = Histogram("example_task_seconds", "Task duration.", ["task"])
BUSY = Gauge("example_busy", "Tasks in progress.", multiprocess_mode="livesum")


def _result(task_id: str, value) -> None:
    # The result backend: one shared table, read by whoever waits.
    shmreg.celery.table(STATE).set(f"result:{task_id}", value)


@app.task(bind=True)
def add(self, n: int):
    """Add ``n`` to the shared total (exact across pool processes)."""
    with BUSY.track_inprogress(), DURATION.labels("add").time():
        t = shmreg.celery.table(STATE)
        total = t.update_counter("total", n)
        t.update_counter(f"by_pid:{os.getpid()}", 1)
        TASKS.labels("add").inc()
    _result(self.request.id, {"pid": os.getpid(), "total": total})


@app.task(bind=True)
def hold(self, key: str, seconds: float):
    """Mark this pool process busy with ``key`` (an owned entry) and sleep."""
    with BUSY.track_inprogress():
        TASKS.labels("hold").inc()
        shmreg.celery.table(STATE).set(f"busy:{os.getpid()}", key, owned=True)
        time.sleep(seconds)
        shmreg.celery.table(STATE).pop(f"busy:{os.getpid()}", None)
    _result(self.request.id, {"pid": os.getpid()})


@app.task(bind=True)
def report(self, n: int):
    """An expensive value computed once across every pool process (single flight)."""
    def compute():
        shmreg.celery.table(STATE).update_counter("computations")
        time.sleep(0.5)
        return n * n

    TASKS.labels("report").inc()
    _result(self.request.id, shmreg.celery.cache(CACHE).get_or_set(f"report:{n}", compute))


@app.task(bind=True)
def alert(self, key: str):
    """Send an alert at most once a minute across every pool process (dedup recipe)."""
    TASKS.labels("alert").inc()
    sent = emit_once(shmreg.celery.table(STATE), key, 60.0)
    if sent:
        shmreg.celery.table(STATE).update_counter("alerts_sent")
    _result(self.request.id, sent)
