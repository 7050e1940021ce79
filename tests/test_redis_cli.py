"""The ``shmreg`` command line and the recipes against a Redis/Valkey URL
(a real server started by the fixture), as they work on local tables."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

import shmreg
from _helpers import unique_name
from shmreg.backends.redis import list_tables
from shmreg.recipes import Counters, Flags, emit_once

pytest.importorskip("redis")   # the test extra installs it: never skipped in CI

pytestmark = pytest.mark.timeout(120)


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shmreg", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})


def test_cli_commands_against_a_url(redis_server):
    url, name = redis_server.url, unique_name("cli")
    r = cli("stat", name, "--url", url)
    assert r.returncode == 1 and r.stderr.strip() == f"shmreg: no table named {name!r} on {url}"
    t = shmreg.Table(name, url=url)
    try:
        assert cli("set", name, "greeting", "hello", "--url", url).returncode == 0
        assert cli("set", name, "n", "41", "--int", "--url", url).returncode == 0
        assert t["greeting"] == "hello" and t["n"] == 41
        t.set("owned", [1, 2], owned=True)
        r = cli("get", name, "greeting", "--url", url)
        assert r.returncode == 0 and r.stdout == "hello\n"
        r = cli("get", name, "owned", "--json", env={"SHMREG_URL": url})   # URL from the env
        assert json.loads(r.stdout) == {"key": "owned", "value": [1, 2], "ttl": None,
                                        "owner": os.getpid()}
        r = cli("dump", name, "--json", "--url", url)
        assert [e["key"] for e in json.loads(r.stdout)["entries"]] == ["greeting", "n", "owned"]
        r = cli("stat", name, "--json", "--url", url)
        st = json.loads(r.stdout)
        assert st["entries"] == 3 and st["owner_processes"] == 1 and st["backend"] == "redis"
        r = cli("stat", name, "--prometheus", "--url", url)      # what a Redis table tracks
        assert r.returncode == 0, r.stderr
        assert f'shmreg_entries{{table="{name}"}} 3' in r.stdout
        assert "shmreg_segment_bytes" not in r.stdout              # no segment on a server
        r = cli("ls", "--url", url)
        assert r.returncode == 0 and name in r.stdout and "ENTRIES" in r.stdout
        r = cli("check", name, "--url", url)
        assert r.returncode == 0 and "ok" in r.stdout
        r = cli("del", name, "n", "--url", url)
        assert r.returncode == 0 and "n" not in t
        r = cli("del", name, "n", "--url", url)
        assert r.returncode == 1 and "no key 'n'" in r.stderr
        r = cli("destroy", name, "--url", url)
        assert r.returncode == 4 and "in use" in r.stderr    # this process owns an entry
        r = cli("destroy", name, "--url", url, "--force")
        assert r.returncode == 0 and len(t) == 0
        assert name not in list_tables(url)
    finally:
        t.unlink()
        t.close()


def test_cli_watch_against_a_url_reaps_and_stops_on_sigterm(redis_server):
    url, name = redis_server.url, unique_name("cliw")
    t = shmreg.Table(name, url=url)
    child = subprocess.Popen([sys.executable, "-c", """if 1:
        import sys, time, shmreg
        t = shmreg.Table(sys.argv[1], url=sys.argv[2], lease_ttl=60)
        t.set("job", "busy", owned=True)
        print("ok", flush=True)
        time.sleep(600)
        """, name, url], stdout=subprocess.PIPE, text=True)
    watch = subprocess.Popen([sys.executable, "-m", "shmreg", "watch", name, "--url", url,
                              "--interval", "0.2"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ok"
        assert watch.stdout.readline().startswith("watching")
        assert watch.stdout.readline().startswith("active")
        child.kill()
        child.wait(timeout=10)
        assert watch.stdout.readline().strip() == f"pid {child.pid} died owning 1 entries"
        assert watch.stdout.readline().strip() == "'job': 'busy'"
        assert "job" not in t
        watch.send_signal(signal.SIGTERM)
        out, err = watch.communicate(timeout=20)
        assert watch.returncode == 0, err
        assert "reaped 1 entries of 1 dead processes" in out
    finally:
        for p in (child, watch):
            if p.poll() is None:
                p.kill()
            p.communicate(timeout=10)
        t.unlink()
        t.close()


def test_recipes_on_a_redis_table(redis_server):
    t = shmreg.Table(unique_name("rec"), url=redis_server.url)
    try:
        assert emit_once(t, "disk-full", window=60) is True
        assert emit_once(t, "disk-full", window=60) is False
        counters = Counters(t)
        counters.incr("requests", 3)
        counters.incr("requests")
        assert counters.pending() == {"requests": 4}
        assert counters.flush() == {"requests": 4} and counters.pending() == {}
        flags = Flags(t)
        flags.set("new-ui", True)
        assert flags.enabled("new-ui") and not flags.enabled("other")
        assert shmreg.recipes.flags_command(t.name, url=redis_server.url) == {"new-ui": True}
    finally:
        t.unlink()
        t.close()


def test_example_redis_jobs_runs(redis_server):
    """examples/redis_jobs.py: every job done although a worker was killed
    holding one; its claim reported by on_death; the config computed once."""
    example = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "redis_jobs.py")
    r = subprocess.run([sys.executable, example, redis_server.url], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert any(line.startswith("watcher: worker pid ") and "claim:" in line for line in lines)
    assert "jobs done: 12 of 12" in lines
    assert "worker:0 registered after its death: None" in lines
    for name in ("example-jobs", "example-workers", "example-config", "example-config--flights"):
        if name in list_tables(redis_server.url):
            with shmreg.Table(name, url=redis_server.url) as t:
                t.unlink()
