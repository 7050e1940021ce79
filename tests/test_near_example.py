"""examples/near_cache_app under a real gunicorn (4 workers) on a real
server: values computed once, served from the host's near cache by every
worker, and a write through one worker read back by all of them."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys

import pytest

from _helpers import stop_process_tree, unique_name, wait_until
from _redis_servers import free_port

pytest.importorskip("redis")      # the test extra installs both: never skipped in CI
pytest.importorskip("gunicorn")

pytestmark = pytest.mark.timeout(90)

APP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   "examples", "near_cache_app")


def get(port: int, path: str) -> tuple[dict, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        assert r.status == 200, (path, r.status, r.read())
        return json.loads(r.read()), dict(r.getheaders())
    finally:
        conn.close()


def test_gunicorn_workers_share_one_near_cache(redis_server, tmp_path):
    port = free_port()
    name = unique_name("near-app")
    env = {**os.environ, "SHMREG_EXAMPLE_URL": redis_server.url, "SHMREG_EXAMPLE_NAME": name,
           "SHMREG_EXAMPLE_BIND": f"127.0.0.1:{port}", "SHMREG_EXAMPLE_WORKERS": "4",
           "SHMREG_DIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c",
                             os.path.join(APP, "gunicorn.conf.py")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def up():
            try:
                return get(port, "/status")[0]["near_state"] == "ready"
            except (OSError, AssertionError, KeyError):
                return False
        wait_until(up, 30, "gunicorn and its near cache", interval=0.1)
        import hashlib
        want = hashlib.sha256(b"7").hexdigest()
        from concurrent.futures import ThreadPoolExecutor
        near_hits, hit_pids = 0, set()
        with ThreadPoolExecutor(8) as pool:
            # Concurrent requests, so that several workers answer; each
            # worker's hits come from the one table the first fill filled.
            for _ in range(10):
                for body, headers in pool.map(lambda _: get(port, "/item?k=7"), range(40)):
                    assert body["v"] == want
                    if headers["X-Near"] == "hit":
                        near_hits += 1
                        hit_pids.add(body["pid"])
                if len(hit_pids) > 1 and near_hits > 30:
                    break
        assert near_hits > 30
        assert len(hit_pids) > 1       # workers that never filled it hit it
        get(port, "/set?k=7&v=new")    # one worker writes: the host's copy is dropped
        for _ in range(20):
            assert get(port, "/item?k=7")[0]["v"] == "new"
    finally:
        stop_process_tree(proc)
        out = proc.communicate(timeout=10)[0]
        import shmreg
        shmreg.Cache(name, url=redis_server.url).unlink()
    assert "Traceback" not in out, out[-3000:]
