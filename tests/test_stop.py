"""A lock holder that is stopped (SIGSTOP) is alive: its lock is never stolen,
and a thread waiting for it lets the rest of its process run (GIL released)."""

from __future__ import annotations

import os
import signal
import threading
import time

import shmreg
from _helpers import spawn_py


def _wait_stopped(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        if state == "T":
            return
        time.sleep(0.01)
    raise AssertionError(f"pid {pid} never stopped")


def test_stopped_lock_holder_is_not_robbed(table_name):
    t = shmreg.Table.create(table_name, capacity=100, memory=1 << 16, shards=1)
    t["k"] = "old"
    t["other"] = 1
    holder = spawn_py("""
        import shmreg, sys
        t = shmreg.Table.open(sys.argv[1])
        t["k"] = "new"      # freezes after publishing, lock held, seq odd
        print("done", flush=True)
    """, table_name, env={"SHMREG_CRASH_AT": "set:published", "SHMREG_CRASH_SIGNAL": "STOP"})
    writer = None
    try:
        _wait_stopped(holder.pid)

        # A reader of the frozen shard retries, falls back to the lock, waits.
        got = []
        reader = threading.Thread(target=lambda: got.append(t.get("other")), daemon=True)
        reader.start()
        # ... while this thread keeps running Python code: the GIL was released.
        spins = 0
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            spins += 1
        assert spins > 1000
        assert reader.is_alive() and got == []

        # A writer in another process is not allowed to steal the lock either.
        writer = spawn_py("""
            import shmreg, sys
            shmreg.Table.open(sys.argv[1])["w"] = "written"
            print("wrote", flush=True)
        """, table_name)
        time.sleep(0.5)
        assert writer.poll() is None, "writer got past a live, stopped lock holder"

        os.kill(holder.pid, signal.SIGCONT)
        out, err = holder.communicate(timeout=30)
        assert holder.returncode == 0, err
        assert out.strip() == "done"
        out, err = writer.communicate(timeout=30)
        assert writer.returncode == 0 and out.strip() == "wrote", err
        reader.join(30)
        assert got == [1]
        assert t["k"] == "new" and t["w"] == "written"
        assert t.stats()["repairs"] == 0  # nobody mistook the stopped holder for dead
        t.check()
    finally:
        for p in (holder, writer):
            if p is not None and p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
                p.communicate(timeout=30)
        t.close()


def test_killed_while_stopped_is_repaired(table_name):
    t = shmreg.Table.create(table_name, capacity=100, memory=1 << 16, shards=1)
    t["k"] = "old"
    holder = spawn_py("""
        import shmreg, sys
        shmreg.Table.open(sys.argv[1])["k"] = "new"
    """, table_name, env={"SHMREG_CRASH_AT": "set:written", "SHMREG_CRASH_SIGNAL": "STOP"})
    try:
        _wait_stopped(holder.pid)
    finally:
        os.kill(holder.pid, signal.SIGKILL)     # (also when the wait failed: never left stopped)
    holder.communicate(timeout=30)
    assert holder.returncode == -signal.SIGKILL
    # The write had not been published: the old value stays, the block is freed.
    assert t["k"] == "old"
    t["k2"] = "after"
    assert t.stats()["repairs"] == 1
    t.check()
    t.close()
