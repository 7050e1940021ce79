"""shmreg.gunicorn at start and stop, with a real gunicorn on a small tmpfs
mounted by the test as its ``/dev/shm`` (``SHMREG_DIR``):

- tables that do not fit stop gunicorn at start (exit 1, the ``--shm-size``
  hint, nothing left behind), or, with ``required=False``, gunicorn serves and
  the app gets ``UnavailableError`` for the missing table; the shutdown
  cleanup removes what exists and creates nothing;
- an existing table with another geometry is a warning naming both values,
  or stops gunicorn with ``strict=True``;
- two apps on one host get two default registries.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest

import shmreg
from _helpers import unique_name, wait_until

pytest.importorskip("gunicorn", reason="gunicorn is not installed (pip install -e .[test])")
from gunicorn.config import KNOWN_SETTINGS  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="tmpfs mounts are Linux-only"),
    pytest.mark.timeout(120),
]

APP = '''
import json, os
import shmreg.gunicorn as g

def application(environ, start_response):
    path = environ["PATH_INFO"]
    prefix = os.environ["T_PREFIX"]
    status = "200 OK"
    try:
        if path == "/slow":
            import time
            g.table(prefix + "small").set("busy", os.getpid(), owned=True)
            time.sleep(60)
            body = {}
        elif path == "/small":
            body = {"hits": g.table(prefix + "small").update_counter("hits")}
        elif path == "/big":
            body = {"entries": len(g.cache(prefix + "big"))}
        else:
            body = {"registry": g.registry_name(), "me": os.getpid(),
                    "pids": sorted(r.pid for _, r in g.registry().items())}
    except g.UnavailableError as e:
        status, body = "503 Service Unavailable", {"error": str(e)}
    data = json.dumps(body).encode()
    start_response(status, [("Content-Type", "application/json")])
    return [data]
'''

CONF = '''
import json, os
from shmreg.gunicorn import *
from shmreg.gunicorn import CacheSpec, TableSpec, configure

bind = "127.0.0.1:0"
workers = 2
wsgi_app = "app:application"
pythonpath = os.path.dirname(os.path.abspath(__file__))
_p = os.environ["T_PREFIX"]
_o = json.loads(os.environ["T_OPTIONS"])
_tables = {_p + "small": TableSpec(capacity=_o.pop("small_capacity", 1000), memory=1 << 20)}
if _o.pop("big", True):
    _tables[_p + "big"] = CacheSpec(ttl=60, capacity=50_000, memory=16 << 20)
configure(tables=_tables, temporary=True, **_o)
'''


@pytest.fixture
def small_shm(tmp_path, monkeypatch):
    """An 8 MiB tmpfs playing a container's /dev/shm, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    d = tmp_path / "shm"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(d)], check=True, timeout=30)
    monkeypatch.setenv("SHMREG_DIR", str(d))
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False, timeout=30)


class Gunicorn:
    def __init__(self, where, prefix: str, graceful_timeout: int = 5, **options) -> None:
        where.mkdir(exist_ok=True)
        (where / "app.py").write_text(textwrap.dedent(APP))
        (where / "conf.py").write_text(textwrap.dedent(CONF))
        self.log_path = where / "gunicorn.log"
        env = dict(os.environ, T_PREFIX=prefix, T_OPTIONS=json.dumps(options))
        cmd = [sys.executable, "-m", "gunicorn", "-c", str(where / "conf.py"), "--log-level", "debug",
               "--graceful-timeout", str(graceful_timeout)]
        if "control_socket_disable" in {s.name for s in KNOWN_SETTINGS}:
            cmd.append("--no-control-socket")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=where)
        self.port = 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_listening(self) -> "Gunicorn":
        def listening():
            if self.proc.poll() is not None:
                raise AssertionError(f"gunicorn exited ({self.proc.returncode}):\n{self.log()}")
            m = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", self.log())
            return m and int(m.group(1))

        self.port = wait_until(listening, 30, "gunicorn to listen")
        return self

    def get(self, path: str) -> tuple:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()

    def stop(self) -> int:
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            return self.proc.wait(timeout=20)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=10)
            self._log.close()


def _segments(d) -> list:
    return sorted(f for f in os.listdir(d) if f.startswith("shmreg."))


def test_tables_that_do_not_fit_stop_gunicorn_at_start(small_shm, tmp_path):
    g = Gunicorn(tmp_path / "app", unique_name("gs") + "-")
    try:
        assert g.proc.wait(timeout=60) == 1, g.log()
    finally:
        g.stop()
    log = g.log()
    assert "Listening at" not in log
    assert re.search(r"Error: shmreg: the configured tables need \d+\.\d MiB in .* but only "
                     r"\d+\.\d MiB is free", log), log
    assert "--shm-size" in log and "overcommit=True" in log
    assert _segments(small_shm) == []       # nothing half-created left behind


def test_overcommit_skips_the_sum_but_a_table_that_cannot_be_created_still_stops(small_shm, tmp_path):
    g = Gunicorn(tmp_path / "app", unique_name("gs") + "-", overcommit=True)
    try:
        assert g.proc.wait(timeout=60) == 1, g.log()
    finally:
        g.stop()
    log = g.log()
    assert "the configured tables need" not in log
    assert re.search(r"Error: shmreg: cannot open or create table '[^']*big': no room", log), log
    assert "--shm-size" in log
    assert _segments(small_shm) == []       # the small table it had created is removed again


def test_not_required_serves_without_the_missing_table_and_cleanup_creates_nothing(small_shm, tmp_path):
    prefix = unique_name("gs") + "-"
    g = Gunicorn(tmp_path / "app", prefix, required=False)
    try:
        g.wait_listening()
        assert g.get("/small") == (200, {"hits": 1})
        status, body = g.get("/big")
        assert status == 503 and f"{prefix}big" in body["error"] and "no room" in body["error"]
        present = _segments(small_shm)
        assert f"shmreg.{prefix}small" in present and not any("big" in f for f in present)
        assert g.stop() == 0
    finally:
        g.stop()
    log = g.log()
    assert "required=False: serving without it" in log
    assert _segments(small_shm) == [], log   # temporary: removed what existed, created nothing


@pytest.mark.parametrize("strict", [False, True], ids=["warn", "strict"])
def test_existing_table_with_other_geometry_is_reported(small_shm, tmp_path, strict):
    prefix = unique_name("gs") + "-"
    with shmreg.Table.create(prefix + "small", capacity=100, memory=1 << 20) as old:
        old["left"] = "over"
    g = Gunicorn(tmp_path / "app", prefix, big=False, small_capacity=1000, strict=strict)
    try:
        if strict:
            assert g.proc.wait(timeout=60) == 1, g.log()
        else:
            g.wait_listening()
            assert g.stop() == 0
    finally:
        g.stop()
    log = g.log()
    assert re.search(rf"already exists with capacity 100 \(asked for 1,000\).*shmreg destroy "
                     rf"{re.escape(prefix)}small", log), log
    if not strict:
        assert log.count("already exists with capacity 100") == 1, log   # said once, not per worker
    if strict:
        assert "Error: shmreg: cannot open or create table" in log and "Listening at" not in log
        assert f"shmreg.{prefix}small" in _segments(small_shm)   # not ours: kept
        shmreg.unlink(prefix + "small")
    assert _segments(small_shm) == []


def test_two_apps_on_one_host_get_their_own_default_registry(small_shm, tmp_path):
    prefixes = [unique_name("gs") + "-", unique_name("gs") + "-"]
    apps = [Gunicorn(tmp_path / f"app{i}", p, big=False) for i, p in enumerate(prefixes)]
    try:
        for a in apps:
            a.wait_listening()
        seen = []
        for a in apps:
            def registered(a=a):
                _, body = a.get("/registry")
                return body if len(body["pids"]) == 2 else None
            body = wait_until(registered, 20, "both workers to register")
            assert body["me"] in body["pids"]
            assert re.fullmatch(r"gunicorn-[\w.-]+-[0-9a-f]{8}-workers", body["registry"])
            assert f"worker registry {body['registry']!r}" in a.log()
            seen.append(body)
        assert seen[0]["registry"] != seen[1]["registry"]
        assert not set(seen[0]["pids"]) & set(seen[1]["pids"])
        for a in apps:
            assert a.stop() == 0
    finally:
        for a in apps:
            a.stop()
    assert _segments(small_shm) == []


def test_worker_killed_at_the_graceful_timeout_does_not_keep_the_tables(small_shm, tmp_path):
    import threading

    g = Gunicorn(tmp_path / "app", unique_name("gs") + "-", big=False, graceful_timeout=1)
    try:
        g.wait_listening()
        slow = threading.Thread(target=lambda: _ignore_errors(g.get, "/slow"), daemon=True)
        slow.start()
        wait_until(lambda: any(f.endswith("small") for f in _segments(small_shm)) and
                   _busy(small_shm), 20, "the slow request to start")
        # The busy worker outlives the 1 s graceful timeout: gunicorn SIGKILLs
        # it right before on_exit, which must still remove every table.
        assert g.stop() == 0
    finally:
        g.stop()
    assert _segments(small_shm) == [], g.log()
    assert "not unlinking" not in g.log()


def _ignore_errors(fn, *args):
    try:
        fn(*args)
    except Exception:
        pass


def _busy(d) -> bool:
    name = next(f for f in _segments(d) if f.endswith("small"))[len("shmreg."):]
    with shmreg.Table.open(name) as t:
        return t.get("busy") is not None
