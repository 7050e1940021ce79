"""Workers on several hosts sharing jobs, a registry and a cache through one
Redis/Valkey server, with the code a single host would use.

    python examples/redis_jobs.py redis://localhost:6379/0     # or unix:///path.sock

Four worker processes (on one machine here; point them at the same URL from
several machines and nothing changes) each register themselves, fetch a
shared configuration computed once across all of them (`Cache.get_or_set`),
and claim jobs with an *owned* `insert_new`: a claim vanishes with its
worker.  One worker is SIGKILLed in the middle of a job; the watcher
reports what it held (`on_death`) and another worker redoes the job.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import threading
import time

import shmreg

JOBS = 12


def load_config() -> dict:
    time.sleep(0.3)                      # slow: computed once, whoever asks
    return {"loaded_by": os.getpid()}


def worker(url: str, n: int) -> None:
    jobs = shmreg.Table("example-jobs", url=url, lease_ttl=3)
    reg = shmreg.Registry("example-workers", url=url, lease_ttl=3)
    cache = shmreg.Cache("example-config", url=url, ttl=60)
    reg.register(f"worker:{n}", {"pid": os.getpid()})
    config = cache.get_or_set("config", load_config)
    while n != 0 and "first-claimed" not in jobs:
        time.sleep(0.02)                 # worker 0 goes first (the story needs it)
    stuck = jobs.get("first-claimed")
    while jobs.update_counter("done", 0) < JOBS:
        for job in range(JOBS):
            if job == stuck and "reported" not in jobs:
                # The story: the watcher reports the dead worker's claim
                # before anyone redoes its job (a claim taken over first
                # is no longer the dead worker's to report).
                continue
            if f"result:{job}" in jobs or not jobs.insert_new(f"claim:{job}", n, owned=True):
                continue
            if n == 0:
                jobs["first-claimed"] = job
                time.sleep(600)          # worker 0 hangs holding its claim: it gets SIGKILLed
            time.sleep(0.05)             # the work
            if jobs.insert_new(f"result:{job}", f"by worker {n} (config from {config['loaded_by']})"):
                jobs.update_counter("done")
            jobs.delete(f"claim:{job}")


def main(url: str) -> None:
    for t in (shmreg.Table("example-jobs", url=url), shmreg.Registry("example-workers", url=url).table):
        t.clear()
    shmreg.Cache("example-config", url=url).clear()

    reported = threading.Event()

    def on_death(pid: int, entries: list) -> None:
        print(f"watcher: worker pid {pid} died holding {sorted(k for k, _ in entries)}")
        reported.set()

    # One watcher per table on each host (like local tables): a death on
    # this host is then seen at once, not after the lease (3 s) expires.
    with shmreg.Watcher("example-jobs", url=url, lease_ttl=3, on_death=on_death, interval=0.2), \
            shmreg.Watcher("example-workers", url=url, lease_ttl=3, on_death=None, interval=0.2):
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=worker, args=(url, n)) for n in range(4)]
        for p in procs:
            p.start()
        reg = shmreg.Registry("example-workers", url=url)
        while reg.whereis("worker:0") is None:
            time.sleep(0.05)
        victim = reg.whereis("worker:0")
        jobs = shmreg.Table("example-jobs", url=url)
        while "first-claimed" not in jobs:
            time.sleep(0.05)
        os.kill(victim, signal.SIGKILL)
        if not reported.wait(30):
            raise SystemExit("the watcher did not report the dead worker")
        jobs["reported"] = True
        for p in procs[1:]:
            p.join(60)
        procs[0].join(10)
        print(f"jobs done: {jobs['done']} of {JOBS}")
        print(f"worker:0 registered after its death: {reg.whereis('worker:0')}")
        print(f"config computed by one process: {shmreg.Cache('example-config', url=url)['config']}")
        for job in range(JOBS):
            assert f"result:{job}" in jobs, job


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("SHMREG_URL", "redis://localhost:6379/0"))
