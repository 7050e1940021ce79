"""gunicorn integration (shmreg.gunicorn) with a real gunicorn: the example app
in examples/gunicorn_app, 4 sync workers on 127.0.0.1, tables named uniquely
through SHMREG_EXAMPLE_PREFIX.

What is proven against the real server: the workers share one cache (a value
is computed once across all workers, with concurrent requests for it) and
exact counters; a SIGKILLed worker's registration and scoreboard row are
reaped by the arbiter's ``child_exit`` (post-mortem logged, process slots
released) and the replacement worker registers itself; a SIGTERM shutdown
reaps every worker and, with ``temporary``, leaves no segment behind.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

import shmreg
import shmreg.gunicorn as sg
from shmreg import _segment
from _helpers import stop_process_tree, unique_name, wait_until

gunicorn = pytest.importorskip("gunicorn", reason="gunicorn is not installed (pip install -e .[test])")
from gunicorn.config import KNOWN_SETTINGS, Config  # noqa: E402

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "examples", "gunicorn_app")
CONF = os.path.join(EXAMPLE, "gunicorn.conf.py")
ROUNDS = 1000          # SHA-256 rounds of /compute
DELAY = 0.3            # extra seconds per computation: concurrent requests overlap it
WORKERS = 4
TABLES = ("counters", "scoreboard", "cache", "cache--flights", "workers")


def expected_value(n: int) -> str:
    h = str(n).encode()
    for _ in range(ROUNDS):
        h = hashlib.sha256(h).digest()
    return h.hex()


class Server:
    """A gunicorn subprocess running the example app; always killed by stop()."""

    def __init__(self, tmp_path, *, workers: int = WORKERS, temporary: bool = True) -> None:
        self.prefix = unique_name("gu") + "-"
        self.names = [self.prefix + t for t in TABLES]
        self.log_path = tmp_path / f"gunicorn-{self.prefix}log"
        self.workers = workers
        env = dict(os.environ)
        env.pop("SHMREG_CRASH_AT", None)
        env.update(SHMREG_EXAMPLE_PREFIX=self.prefix, SHMREG_EXAMPLE_BIND="127.0.0.1:0",
                   SHMREG_EXAMPLE_WORKERS=str(workers), SHMREG_EXAMPLE_MODE="shmreg",
                   SHMREG_EXAMPLE_TEMPORARY="1" if temporary else "0",
                   SHMREG_EXAMPLE_ROUNDS=str(ROUNDS), SHMREG_EXAMPLE_DELAY=str(DELAY))
        cmd = [sys.executable, "-m", "gunicorn", "-c", CONF, "--graceful-timeout", "5"]
        if "control_socket_disable" in {s.name for s in KNOWN_SETTINGS}:
            cmd.append("--no-control-socket")   # gunicorn >= 25.1: no shared ~/.gunicorn socket
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     cwd=str(tmp_path))
        self.port = 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def start(self) -> "Server":
        def listening():
            if self.proc.poll() is not None:
                raise AssertionError(f"gunicorn exited ({self.proc.returncode}):\n{self.log()}")
            m = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", self.log())
            return m and int(m.group(1))

        self.port = wait_until(listening, 20, "gunicorn to listen")
        self.counters = shmreg.Table.open(self.prefix + "counters")
        self.scoreboard = shmreg.Table.open(self.prefix + "scoreboard")
        self.registry = shmreg.Registry(self.prefix + "workers")
        wait_until(lambda: len(self.worker_pids()) == self.workers, 20, f"{self.workers} workers to register")
        return self

    def worker_pids(self) -> set:
        return {reg.pid for key, reg in self.registry.items()}

    def get(self, path: str) -> tuple:
        """One request on a new connection: (status, headers, decoded JSON)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
            return resp.status, dict(resp.getheaders()), json.loads(body)
        finally:
            conn.close()

    def stop(self) -> None:
        """SIGTERM (bounded), then SIGKILL the arbiter and any worker it left; unlink the tables."""
        try:
            workers = self.worker_pids() if hasattr(self, "registry") else set()
            stop_process_tree(self.proc, workers, timeout=10)
        finally:
            self._log.close()
            for attr in ("counters", "scoreboard", "registry"):
                if hasattr(self, attr):
                    getattr(self, attr).close()
            for name in self.names:
                try:
                    shmreg.unlink(name)
                except shmreg.TableNotFoundError:
                    pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("gunicorn"))
    try:
        yield s.start()
    finally:
        s.stop()


def test_hooks_are_what_a_star_import_installs():
    ns: dict = {}
    exec("from shmreg.gunicorn import *", ns)
    ns.pop("__builtins__")
    assert set(ns) == {"on_starting", "post_fork", "worker_exit", "child_exit", "on_exit"}
    cfg = Config()
    for name, hook in ns.items():
        cfg.set(name, hook)                 # gunicorn's own arity validation
        assert cfg.settings[name].get() is hook


def test_configure_rejects_bad_names_and_specs(monkeypatch):
    monkeypatch.setattr(sg, "_configured", None)
    with pytest.raises(ValueError):
        sg.configure(tables={"a/b": None})
    with pytest.raises(TypeError):
        sg.configure(tables={"ok": 42})
    with pytest.raises(ValueError):
        sg.configure(tables=["same"], registry="same")
    s = sg.configure(tables=["plain"], registry=None, temporary=True)
    assert s.tables == {"plain": sg.TableSpec()} and s.registry is None and s.temporary


def test_environment_is_the_fallback(monkeypatch):
    monkeypatch.setattr(sg, "_configured", None)
    monkeypatch.setattr(sg, "_from_env", None)
    monkeypatch.setenv("SHMREG_GUNICORN_TABLES", "c1, p1:cache:ttl=60:capacity=1000, t1:table:memory=0x100000")
    monkeypatch.setenv("SHMREG_GUNICORN_REGISTRY", "")
    monkeypatch.setenv("SHMREG_GUNICORN_TEMPORARY", "yes")
    s = sg.settings()
    assert s.tables == {"c1": sg.TableSpec(), "p1": sg.CacheSpec(ttl=60.0, capacity=1000),
                        "t1": sg.TableSpec(memory=1 << 20)}
    assert s.registry is None and s.temporary
    monkeypatch.setattr(sg, "_from_env", None)


class FakeLog:
    def __init__(self):
        self.lines = []

    def __getattr__(self, level):
        return lambda msg, *args, **kw: self.lines.append((level, msg % args if args else msg))


class FakeServer:
    def __init__(self):
        self.log = FakeLog()
        self.reexec_pid = 0


def test_unusable_table_stops_the_start_unless_not_required(monkeypatch, tmp_path):
    # A segment that is not a table: opening it fails (IncompatibleTableError).
    bad = unique_name("gubad")
    path = _segment.path_of(bad)
    with open(path, "wb") as f:
        f.write(b"\0" * 8192)
    monkeypatch.setattr(sg, "_configured", None)
    monkeypatch.setattr(sg, "_unavailable", {})
    try:
        sg.configure(tables=[bad], registry=None, temporary=True)
        with pytest.raises(sg.StartupError, match=bad):
            sg.on_starting(FakeServer())
        # Degraded (opt-in): the hooks log, the app gets UnavailableError on use.
        sg.configure(tables=[bad], registry=None, temporary=True, required=False)
        server = FakeServer()
        sg.on_starting(server)
        sg.post_fork(server, type("W", (), {"pid": os.getpid(), "age": 1, "ppid": 1})())
        with pytest.raises(sg.UnavailableError, match=bad):
            sg.table(bad)
        sg.child_exit(server, type("W", (), {"pid": 2**22 + 12345})())
        sg.on_exit(server)
        errors = [line for lvl, line in server.log.lines if lvl in ("error", "exception")]
        assert len(errors) == 1 and bad in errors[0], server.log.lines
        # on_exit removed nothing it could not open and created nothing.
        assert os.path.exists(path)
    finally:
        os.unlink(path)


def test_workers_share_the_cache_and_exact_counters(server):
    before = dict(server.counters.items())
    keys = [1000 + i for i in range(3)]
    per_key = 8
    paths = [f"/compute?n={k}" for k in keys for _ in range(per_key)]
    with ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(server.get, paths))
    # Now that the values are cached, hits from more connections.
    more = [f"/compute?n={k}" for k in keys for _ in range(4)] + ["/"] * 6
    with ThreadPoolExecutor(max_workers=8) as pool:
        results += list(pool.map(server.get, more))
    sent = len(paths) + len(more)

    assert all(status == 200 for status, _, _ in results)
    compute = [(h, body) for status, h, body in results if "n" in body]
    for k in keys:
        answers = [(h, b) for h, b in compute if b["n"] == k]
        assert {b["value"] for _, b in answers} == {expected_value(k)}
        # Single flight across processes: exactly one request computed it.
        assert sum(b["computed"] for _, b in answers) == 1
        assert sum(h["X-Cache"] == "miss" for h, _ in answers) == 1
    pids = {b["pid"] for _, _, b in results}
    assert len(pids) >= 2, f"only {pids} answered: requests were not spread over workers"
    assert pids <= server.worker_pids()
    # A per-worker cache would need one computation per (key, worker) pair.
    pairs = {(b["n"], b["pid"]) for _, b in compute}
    assert len(pairs) > len(keys)

    after = dict(server.counters.items())
    assert after["computations"] - before.get("computations", 0) == len(keys)
    assert after["requests"] - before.get("requests", 0) == sent
    assert after["path:/compute"] - before.get("path:/compute", 0) == len(compute)
    assert after["path:/"] - before.get("path:/", 0) == 6

    # /status: every live worker, with its registration and its scoreboard row.
    status, _, st = server.get("/status")
    assert status == 200 and st["mode"] == "shmreg"
    assert {w["pid"] for w in st["workers"]} == server.worker_pids()
    assert all(w["key"] == f"worker:{w['pid']}" for w in st["workers"])
    for w in st["workers"]:
        if w["pid"] in pids:
            assert w["scoreboard"]["state"] in ("idle", "busy")
    me = next(w for w in st["workers"] if w["pid"] == st["pid"])
    assert me["scoreboard"] == {"state": "busy", "path": "/status", "since": me["scoreboard"]["since"],
                                "handled": me["scoreboard"]["handled"]}
    assert st["counters"]["requests"] == after["requests"] + 1


def test_killed_worker_is_reaped_and_replaced(server):
    # Make every worker that answers publish a scoreboard row.
    with ThreadPoolExecutor(max_workers=8) as pool:
        answered = {b["pid"] for _, _, b in pool.map(server.get, ["/"] * 16)}
    before = server.worker_pids()
    victim = sorted(answered)[0]
    key = sg.worker_key(victim)
    assert server.registry.whereis(key) == victim
    assert server.scoreboard.owner(victim) == victim
    arbiter = server.proc.pid

    os.kill(victim, signal.SIGKILL)

    line = wait_until(lambda: re.search(rf"shmreg: worker {victim} exited owning (\d+) entr.*",
                                        server.log()), 10, "child_exit's post-mortem")
    # The post-mortem names the registration and the scoreboard row.
    assert int(line.group(1)) == 2, line.group(0)
    assert repr(key) in line.group(0) and f"{victim}={{'state': " in line.group(0)
    # Reaped: gone from every read, and its process slots released (not just invisible).
    assert server.registry.whereis(key) is None
    assert victim not in dict(server.scoreboard.items())
    for t in (server.registry.table, server.scoreboard):
        assert victim not in {p["pid"] for p in t._proc_table()}
    # gunicorn respawns a worker, which registers itself.
    wait_until(lambda: len(server.worker_pids()) == WORKERS and victim not in server.worker_pids(),
               15, "the replacement worker to register")
    new = server.worker_pids() - before
    assert len(new) == 1
    (fresh,) = new
    reg = server.registry.lookup(sg.worker_key(fresh))
    assert reg.pid == fresh and reg.value["ppid"] == arbiter and reg.value["age"] > WORKERS
    assert server.registry.count() == WORKERS
    # Deleted, not only invisible: the tables hold no owned entry of a dead process.
    assert server.registry.table.stats()["owned"] == WORKERS
    assert server.scoreboard.stats()["owned"] == len(server.scoreboard)
    # /status agrees (whichever worker answers).
    for _ in range(4):
        _, _, st = server.get("/status")
        assert {w["pid"] for w in st["workers"]} == server.worker_pids()


@pytest.mark.parametrize("temporary", [True, False], ids=["temporary", "kept"])
def test_sigterm_reaps_every_worker_and_cleans_up(tmp_path, temporary):
    s = Server(tmp_path, workers=2, temporary=temporary)
    try:
        s.start()
        with ThreadPoolExecutor(max_workers=4) as pool:
            assert all(st == 200 for st, _, _ in pool.map(s.get, ["/compute?n=7"] * 4 + ["/"] * 4))
        workers = s.worker_pids()
        assert len(workers) == 2
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(timeout=20) == 0
        log = s.log()
        # A graceful exit is no death: worker_exit deleted what the worker
        # owned, child_exit has nothing to report (DEBUG only).
        assert "exited owning" not in log, log
        left = set(shmreg.list_tables()) & set(s.names)
        if temporary:
            assert left == set(), log
        else:
            assert left == set(s.names)
            # Every worker was reaped by child_exit: no registration, no slot, no owned row.
            assert s.registry.count() == 0
            for t in (s.registry.table, s.scoreboard):
                assert t._proc_table() == [] and t.stats()["owned"] == 0
            assert s.counters["requests"] == 8
    finally:
        s.stop()
