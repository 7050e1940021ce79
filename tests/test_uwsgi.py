"""shmreg.uwsgi with a real uWSGI: a master and 3 workers on 127.0.0.1.

Proven against the real server: the tables are created in the master before
the fork, every worker registers itself (postfork) and owns a scoreboard
row; a worker killed with SIGKILL - the one whose watcher is active, so the
lease must fail over - is reaped by the surviving workers' watchers (its
process slots released, a post-mortem in the uWSGI log), and its
replacement registers; a graceful shutdown is not reported as deaths; a
configuration that cannot be satisfied stops uWSGI (--need-app).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

import shmreg
import shmreg.uwsgi
from _helpers import unique_name, wait_until

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(sys.platform == "win32", reason="uWSGI is POSIX-only")]

UWSGI = shutil.which("uwsgi", path=os.path.dirname(sys.executable)) or shutil.which("uwsgi")
if UWSGI is None:
    pytest.skip("uWSGI is not installed (pip install -e '.[test]' builds it)", allow_module_level=True)

WORKERS = 3

APP = '''
import json, os
import shmreg.uwsgi
from shmreg.uwsgi import TableSpec
import uwsgidecorators

P = os.environ["T_PREFIX"]
shmreg.uwsgi.setup(tables={P + "board": TableSpec(capacity=1000, memory=int(os.environ["T_MEMORY"]))},
                   registry=P + "workers", watch_interval=0.2)

@uwsgidecorators.postfork
def publish():
    shmreg.uwsgi.table(P + "board").set(os.getpid(), "idle", owned=True)

def application(environ, start_response):
    body = json.dumps({"pid": os.getpid(),
                       "workers": sorted(r.pid for _, r in shmreg.uwsgi.registry().items())}).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]
'''


def _free_port() -> int:
    # Below the ephemeral range: a port from bind(0) is in it, and any
    # client socket can take it before the server binds (seen with Redis).
    from _redis_servers import free_port

    return free_port()


class Uwsgi:
    def __init__(self, tmp_path, memory: int = 1 << 20) -> None:
        self.prefix = unique_name("uw") + "-"
        (tmp_path / "app.py").write_text(textwrap.dedent(APP))
        self.port = _free_port()
        self.stats_port = _free_port()
        while self.stats_port == self.port:
            self.stats_port = _free_port()
        self.log_path = tmp_path / "uwsgi.log"
        self._log = open(self.log_path, "wb")
        env = dict(os.environ, T_PREFIX=self.prefix, T_MEMORY=str(memory))
        env.pop("SHMREG_CRASH_AT", None)
        self.proc = subprocess.Popen(
            [UWSGI, "--master", "--processes", str(WORKERS), "--need-app", "--die-on-term",
             "--stats", f"127.0.0.1:{self.stats_port}",
             "--http-socket", f"127.0.0.1:{self.port}", "--wsgi-file", str(tmp_path / "app.py"),
             "--chdir", str(tmp_path), "--pythonpath", os.pathsep.join(p for p in sys.path if p)],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def start(self) -> "Uwsgi":
        def registered():
            if self.proc.poll() is not None:
                raise AssertionError(f"uwsgi exited ({self.proc.returncode}):\n{self.log()}")
            if not hasattr(self, "registry"):
                try:   # open, never create: the master must have made both
                    shmreg.Table.open(self.prefix + "workers").close()
                    self.board = shmreg.Table.open(self.prefix + "board")
                except shmreg.TableNotFoundError:
                    return False
                self.registry = shmreg.Registry(self.prefix + "workers")
            return len(self.registry.items()) == WORKERS

        wait_until(registered, 30, f"{WORKERS} uWSGI workers to register")
        return self

    def accepting(self) -> set:
        """Pids of the workers uWSGI's stats server reports as accepting
        requests: past their start-up (a signal sent to a worker still in
        it is handled by the master's handler it inherited, and lost)."""
        with socket.create_connection(("127.0.0.1", self.stats_port), timeout=10) as s:
            data = b"".join(iter(lambda: s.recv(65536), b""))
        return {w["pid"] for w in json.loads(data)["workers"] if w.get("accepting")}

    def pids(self) -> set:
        return {reg.pid for _, reg in self.registry.items()}

    def get(self) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        try:
            conn.request("GET", "/")
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def stop(self) -> int:
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            return self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=10)
            self._log.close()
            for attr in ("registry", "board"):
                if hasattr(self, attr):
                    getattr(self, attr).close()
            for name in ("workers", "board"):
                try:
                    shmreg.unlink(self.prefix + name)
                except shmreg.TableNotFoundError:
                    pass


def test_workers_register_and_a_killed_worker_is_reaped_by_the_survivors(tmp_path):
    u = Uwsgi(tmp_path)
    try:
        u.start()
        workers = u.pids()
        assert u.get()["workers"] == sorted(workers)
        wait_until(lambda: set(dict(u.board.items())) == workers, 10, "every worker's board row")
        assert all(u.board.owner(pid) == pid for pid in workers)
        # Kill the worker whose watcher reaps the board: the lease must move.
        victim = wait_until(lambda: u.board.stats()["watcher_pid"], 10, "an active watcher")
        assert victim in workers
        os.kill(victim, signal.SIGKILL)

        def reaped():
            return all(victim not in {p["pid"] for p in t._proc_table()} for t in (u.board, u.registry.table))

        wait_until(reaped, 15, "the survivors' watchers to reap the killed worker")
        assert u.registry.whereis(shmreg.uwsgi.worker_key(victim)) is None
        assert victim not in dict(u.board.items())
        log = u.log()
        assert re.search(rf"shmreg: worker {victim} died owning 1 entry in '{u.prefix}board': "
                         rf"{victim}='idle'", log), log
        assert re.search(rf"shmreg: worker {victim} died owning 1 entry in '{u.prefix}workers': "
                         rf"'worker:{victim}'=", log), log
        assert u.board.stats()["watcher_pid"] in u.pids() | {0}
        # uWSGI respawns the worker; it registers and publishes.
        wait_until(lambda: len(u.pids()) == WORKERS and victim not in u.pids(), 20, "the respawned worker")
        (fresh,) = u.pids() - workers
        wait_until(lambda: fresh in dict(u.board.items()), 10, "the new worker's board row")
        assert u.board.owner(fresh) == fresh
        wait_until(lambda: u.accepting() == u.pids(), 20, "every worker to accept requests")
        # A graceful shutdown: every worker deletes what it owns; no death reported.
        before = u.log().count("died owning")
        u.proc.send_signal(signal.SIGTERM)
        rc = u.proc.wait(timeout=30)
        after = u.log()
        assert rc == 0, (rc, after)
        assert after.count("died owning") == before, after
        # Deleted by each worker's atexit, not merely invisible because it died.
        for t in (u.registry.table, u.board):
            assert t.stats()["owned"] == 0 and len(t) == 0
    finally:
        u.stop()


def test_tables_that_cannot_be_created_stop_uwsgi(tmp_path, monkeypatch):
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs Linux and root (CI runs as root)")
    shm = tmp_path / "shm"
    shm.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(shm)], check=True, timeout=30)
    monkeypatch.setenv("SHMREG_DIR", str(shm))
    try:
        _does_not_fit(tmp_path)
        assert not [f for f in os.listdir(shm) if f.startswith("shmreg.")]   # nothing half-made
    finally:
        subprocess.run(["umount", "-l", str(shm)], check=False, timeout=30)


def _does_not_fit(tmp_path) -> None:
    # A 16 MiB table on an 8 MiB /dev/shm: refused before anything is created.
    u = Uwsgi(tmp_path, memory=16 << 20)
    try:
        assert u.proc.wait(timeout=60) != 0
    finally:
        u.stop()
    log = u.log()
    assert "shmreg: the configured tables need" in log and "--shm-size" in log, log
    assert not {u.prefix + "board", u.prefix + "workers"} & set(shmreg.list_tables())
