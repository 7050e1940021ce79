"""A real gunicorn subprocess serving one of the examples, for the framework
tests (Django, Flask, uvicorn workers): bound to 127.0.0.1 on a free port,
tables named under a unique prefix, always stopped and cleaned up."""

from __future__ import annotations

import http.client
import http.cookies
import json
import os
import re
import subprocess
import sys

import shmreg
from _helpers import stop_process_tree, unlink_tables, wait_until


class GunicornServer:
    """``gunicorn -c CONF`` in ``cwd`` with ``env``; ``start()`` waits until it
    listens and ``workers`` workers are in the registry ``registry``."""

    def __init__(self, conf: str, *, cwd: str, env: dict, prefix: str, registry: str,
                 workers: int, log_path, args: tuple = ()) -> None:
        from gunicorn.config import KNOWN_SETTINGS

        self.prefix = prefix
        self.workers = workers
        self.registry_name = registry
        self.log_path = log_path
        full_env = dict(os.environ)
        full_env.pop("SHMREG_CRASH_AT", None)
        full_env.update(env)
        cmd = [sys.executable, "-m", "gunicorn", "-c", conf, "--graceful-timeout", "5", *args]
        if "control_socket_disable" in {s.name for s in KNOWN_SETTINGS}:
            cmd.append("--no-control-socket")   # gunicorn >= 25.1: no shared ~/.gunicorn socket
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=full_env, cwd=cwd)
        self.port = 0
        self.registry: shmreg.Registry | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def start(self) -> "GunicornServer":
        def listening():
            if self.proc.poll() is not None:
                raise AssertionError(f"gunicorn exited ({self.proc.returncode}):\n{self.log()}")
            m = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", self.log())
            return m and int(m.group(1))

        self.port = wait_until(listening, 30, "gunicorn to listen")
        wait_until(lambda: self.registry_name in shmreg.list_tables(), 30, "the worker registry")
        self.registry = shmreg.Registry(self.registry_name)
        wait_until(lambda: len(self.worker_pids()) == self.workers, 30,
                   f"{self.workers} workers to register")
        return self

    def worker_pids(self) -> set:
        return {reg.pid for _key, reg in self.registry.items()} if self.registry else set()

    def request(self, path: str, cookies: http.cookies.SimpleCookie | None = None,
                method: str = "GET") -> tuple:
        """One request on a new connection: ``(headers, decoded JSON body)``;
        ``cookies`` (a SimpleCookie) is sent and updated from Set-Cookie."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            headers = {}
            if cookies:
                headers["Cookie"] = "; ".join(f"{k}={m.value}" for k, m in cookies.items())
            conn.request(method, path, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            if cookies is not None:
                for value in resp.headers.get_all("Set-Cookie") or ():
                    cookies.load(value)
            if resp.status != 200:
                raise AssertionError(f"{path}: HTTP {resp.status}: {body[:2000]!r}\n{self.log()[-4000:]}")
            return dict(resp.getheaders()), json.loads(body)
        finally:
            conn.close()

    def stop(self) -> None:
        """SIGTERM (bounded), then SIGKILL the arbiter and any worker it left;
        unlink every table under the prefix."""
        try:
            workers = self.worker_pids()
            stop_process_tree(self.proc, workers, timeout=15)
        finally:
            self._log.close()
            if self.registry is not None:
                self.registry.close()
            unlink_tables(self.prefix)
