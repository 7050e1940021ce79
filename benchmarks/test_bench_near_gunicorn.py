"""Requests/s of examples/near_cache_app under gunicorn (4 sync workers)
against a Redis server, with and without this host's near cache.

    python -m pytest benchmarks/test_bench_near_gunicorn.py -q -s

One private ``redis-server`` (unix socket), two gunicorn servers on
loopback (``SHMREG_EXAMPLE_NEAR=1`` and ``=0``), loaded in turn by ``wrk``
(``apt-get install -y wrk``; skipped without it): ``GET /item?k=K`` over 16
hot keys (one URL per wrk run, the key changing each round), warmed first.
Rounds alternate between the two servers, 3 s each, the order flipping
every pair; the median of the per-pair ratios is the headline.  Asserted:
correctness only (every response 200, near hits on the near server);
throughput is reported.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import pytest

import _bench_common as bc

pytest.importorskip("redis")
pytest.importorskip("gunicorn")

APP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   "examples", "near_cache_app")
ROUNDS = 6
SECONDS = 3


def _get(port: int, path: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        assert r.status == 200
        return json.loads(r.read())
    finally:
        conn.close()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gunicorn_requests_per_second_with_and_without_near():
    wrk = shutil.which("wrk")
    if wrk is None:
        pytest.skip("wrk is not installed (apt-get install -y wrk)")
    d = tempfile.mkdtemp(prefix="shmreg-bench-near-app-")
    server = bc.RedisServer(d, os.environ.get("SHMREG_REDIS_SERVER")).start()
    url = f"unix://{server.socket}?db=0"
    procs, ports = {}, {}
    try:
        for near in ("1", "0"):
            port = ports[near] = _free_port()
            env = {**os.environ, "SHMREG_EXAMPLE_URL": url, "SHMREG_EXAMPLE_NEAR": near,
                   "SHMREG_EXAMPLE_BIND": f"127.0.0.1:{port}", "SHMREG_EXAMPLE_WORKERS": "4",
                   "SHMREG_EXAMPLE_NAME": "bench-near-app", "SHMREG_DIR": d}
            procs[near] = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-c", os.path.join(APP, "gunicorn.conf.py")],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                if _get(ports["1"], "/status")["near_state"] == "ready" and _get(ports["0"], "/status"):
                    break
            except (OSError, KeyError, AssertionError):
                pass
            assert time.monotonic() < deadline, "the servers did not come up"
            time.sleep(0.1)
        for k in range(16):                                   # warm: fill the cache
            for _ in range(8):
                _get(ports["1"], f"/item?k={k}")
        rates: dict = {"1": [], "0": []}
        for i in range(ROUNDS):
            order = ("1", "0") if i % 2 == 0 else ("0", "1")
            for near in order:
                out = subprocess.run([wrk, "-t2", "-c16", f"-d{SECONDS}s",
                                      f"http://127.0.0.1:{ports[near]}/item?k={i % 16}"],
                                     capture_output=True, text=True, timeout=SECONDS + 30).stdout
                assert "Non-2xx" not in out and "Socket errors" not in out, out
                rates[near].append(float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)))
        st = _get(ports["1"], "/status")
        assert st["near_state"] == "ready"
        ratios = [a / b for a, b in zip(rates["1"], rates["0"])]
        lines = ["", "gunicorn example app, 4 sync workers, GET /item (hot keys), wrk -t2 -c16:",
                 f"  near cache:    {statistics.median(rates['1']):8.0f} req/s (median of {ROUNDS})",
                 f"  Redis only:    {statistics.median(rates['0']):8.0f} req/s",
                 f"  ratio (near / Redis only): median of per-round ratios {statistics.median(ratios):.2f}x"]
        print("\n".join(lines))
        bc.NOTES.extend(lines)
    finally:
        for p in procs.values():
            p.terminate()
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        server.stop()
        shutil.rmtree(d, ignore_errors=True)
