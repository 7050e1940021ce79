"""shmreg.uvicorn with a real ``uvicorn --workers 3``: every worker registers
through the ASGI lifespan, a SIGKILLed worker is reaped by the surviving
workers' watchers (post-mortem on stderr), and at SIGTERM the workers delete
what they own and the last one unlinks the temporary tables."""

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

pytest.importorskip("uvicorn", reason="uvicorn is not installed (pip install -e '.[test]')")
pytestmark = pytest.mark.timeout(120)

WORKERS = 3

APP = '''
import json, os
import shmreg.uvicorn
from shmreg.uvicorn import TableSpec

P = os.environ["T_PREFIX"]
shmreg.uvicorn.configure(tables={P + "board": TableSpec(capacity=1000, memory=1 << 20)},
                         registry=P + "workers", temporary=True, watch_interval=0.2)

async def _app(scope, receive, send):
    board = shmreg.uvicorn.table(P + "board")
    board.set(os.getpid(), "busy", owned=True)        # this worker's row, gone when it dies
    body = json.dumps({"pid": os.getpid(),
                       "workers": sorted(r.pid for _, r in shmreg.uvicorn.registry().items())}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})

app = shmreg.uvicorn.wrap(_app)
'''


def _free_port() -> int:
    # Below the ephemeral range: a port from bind(0) is in it, and any
    # client socket can take it before the server binds (seen with Redis).
    from _redis_servers import free_port

    return free_port()


def test_uvicorn_workers_register_are_reaped_and_clean_up(tmp_path):
    prefix = unique_name("uv") + "-"
    (tmp_path / "app.py").write_text(textwrap.dedent(APP))
    port = _free_port()
    log_path = tmp_path / "uvicorn.log"
    env = dict(os.environ, T_PREFIX=prefix)
    env.pop("SHMREG_CRASH_AT", None)
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "app:app", "--workers", str(WORKERS),
                                 "--host", "127.0.0.1", "--port", str(port), "--app-dir", str(tmp_path)],
                                stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    reg = board = None

    def log() -> str:
        return log_path.read_text(errors="replace")

    def get() -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
        try:
            conn.request("GET", "/")
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    try:
        def registered():
            nonlocal reg
            if proc.poll() is not None:
                raise AssertionError(f"uvicorn exited ({proc.returncode}):\n{log()}")
            if reg is None:
                try:
                    shmreg.Table.open(prefix + "workers").close()
                except shmreg.TableNotFoundError:
                    return False
                reg = shmreg.Registry(prefix + "workers")
            return len(reg.items()) == WORKERS

        wait_until(registered, 60, f"{WORKERS} uvicorn workers to register")
        workers = {r.pid for _, r in reg.items()}
        assert os.getpid() not in workers and proc.pid not in workers   # the workers, not the supervisor
        board = shmreg.Table.open(prefix + "board")
        answered = get()
        assert answered["pid"] in workers and set(answered["workers"]) == workers
        victim = answered["pid"]                      # owns its board row and its registration
        assert board.owner(victim) == victim
        os.kill(victim, signal.SIGKILL)

        def reaped():
            return all(victim not in {p["pid"] for p in t._proc_table()} for t in (board, reg.table))

        wait_until(reaped, 20, "the surviving workers to reap the killed one")
        assert reg.whereis(f"worker:{victim}") is None and victim not in dict(board.items())
        out = log()
        assert re.search(rf"shmreg: worker {victim} died owning 1 entry in '{prefix}board': "
                         rf"{victim}='busy'", out), out
        assert re.search(rf"shmreg: worker {victim} died owning 1 entry in '{prefix}workers'", out), out

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log()
        out = log()
        assert out.count("died owning") == 2, out       # the shutdown reported no deaths
        assert not {prefix + "board", prefix + "workers"} & set(shmreg.list_tables()), out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        for obj in (reg, board):
            if obj is not None:
                obj.close()
        for name in ("board", "workers"):
            try:
                shmreg.unlink(prefix + name)
            except shmreg.TableNotFoundError:
                pass
