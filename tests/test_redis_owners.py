"""Ownership across hosts on a real server: leases, watchers, on_death, fencing,
and surviving a server restart and CLIENT KILL.

Two hosts are simulated on this machine: each has its own segment directory
(``SHMREG_DIR``) and host identity (``SHMREG_HOST_ID``), and its own watcher
process; a watcher only watches pids of its own host (pidfd) and learns of
another host's deaths from expired leases.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

import shmreg
from _helpers import stop_process_tree, unique_name, wait_until
from _redis_servers import Server

pytest.importorskip("redis")   # the test extra installs it: never skipped in CI

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=["server", "cluster"])
def server(request):
    """The single server, then the Cluster (``.url``)."""
    return request.getfixturevalue("redis_server" if request.param == "server" else "redis_cluster")


@pytest.fixture(scope="module")
def hosts():
    """Environment of host A and of host B."""
    dirs = [tempfile.mkdtemp(prefix=f"shmreg-host{h}-") for h in "AB"]
    yield {h: {"SHMREG_HOST_ID": f"host-{h}", "SHMREG_DIR": d} for h, d in zip("AB", dirs)}
    for d in dirs:
        os.rmdir(d) if not os.listdir(d) else None


def start(code: str, *args: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **env})


def expect_line(p: subprocess.Popen, want: str) -> None:
    line = p.stdout.readline().strip()
    if line != want:
        p.kill()
        raise AssertionError(f"child said {line!r}, not {want!r}: {p.communicate(timeout=10)[1]}")


def stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.stdin is not None:
            p.stdin.close()
            p.stdin = None
        stop_process_tree(p, timeout=5)
        p.communicate(timeout=10)


OWNER = """
    import sys, time, shmreg
    name, url, lease = sys.argv[1], sys.argv[2], float(sys.argv[3])
    t = shmreg.Table(name, url=url, lease_ttl=lease)
    reg = shmreg.Registry(name + "-reg", url=url, lease_ttl=lease)
    t.set("job:1", "running", owned=True)
    t.set("job:2", {"step": 3}, owned=True)
    t["plain"] = "stays"
    reg.register("leader", "me")
    print("ok", flush=True)
    time.sleep(600)
    """

WATCHER = """
    import sys, shmreg
    name, url, lease = sys.argv[1], sys.argv[2], float(sys.argv[3])
    deaths = shmreg.Table(name + "-deaths", url=url)
    def on_death(pid, entries):
        deaths.update_counter(f"calls:{pid}")
        deaths[f"entries:{pid}"] = sorted(k for k, _ in entries)
    w = shmreg.Watcher(name, url=url, lease_ttl=lease, on_death=on_death, interval=0.2)
    # One watcher per table, as for local tables: the registry's too.
    wr = shmreg.Watcher(name + "-reg", url=url, lease_ttl=lease, on_death=None, interval=0.2)
    for x in (w, wr):
        x.start()
        x.wait_active(30)
    print("active", flush=True)
    sys.stdin.read()
    w.stop()
    wr.stop()
    """


def open_all(name: str, url: str):
    return (shmreg.Table(name, url=url), shmreg.Registry(name + "-reg", url=url),
            shmreg.Table(name + "-deaths", url=url))


def unlink_all(*tables) -> None:
    for t in tables:
        t = getattr(t, "table", t)
        t.unlink()
        t.close()


@pytest.mark.parametrize("watcher_on", ["A", "B"])
def test_sigkilled_owner_on_host_a_vanishes_for_host_b(server, hosts, watcher_on):
    """With A's watcher, a death on A is seen at once (its pidfd fires and the
    lease is deleted: lease_ttl is 60 s here, and the wait is 10 s); with
    only B's watcher, when A's lease expires (lease_ttl 3 s: shorter, and an
    owner starved of CPU on a loaded machine could lose it while alive).  Either way
    the watcher runs on_death with what the process owned."""
    name = unique_name("kill")
    lease = "60" if watcher_on == "A" else "3"
    t, reg, deaths = open_all(name, server.url)
    w = start(WATCHER, name, server.url, lease, env=hosts[watcher_on])
    owner = start(OWNER, name, server.url, lease, env=hosts["A"])
    try:
        expect_line(w, "active")
        expect_line(owner, "ok")
        assert t["job:1"] == "running" and reg.whereis("leader") == owner.pid
        assert len(t) == 3
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(timeout=10)
        wait_until(lambda: "job:1" not in t and reg.whereis("leader") is None, 10,
                   "the dead owner's entries to vanish on host B")
        assert t.get("job:2") is None and t["plain"] == "stays" and len(t) == 1
        wait_until(lambda: deaths.get(f"entries:{owner.pid}") is not None, 10, "on_death")
        assert deaths[f"entries:{owner.pid}"] == ["job:1", "job:2"]
        assert deaths[f"calls:{owner.pid}"] == 1
        wait_until(lambda: not [p for p in t._proc_table() if p["pid"] == owner.pid], 10,
                   "the watcher to reap and release the dead owner")
        reg.register("leader", "host B")     # the name is free again
    finally:
        stop(w, owner)
        unlink_all(t, reg, deaths)


def test_on_death_runs_again_when_its_watcher_dies(server, hosts):
    """At least once: the first watcher dies inside on_death; the second one
    (its claim on the dead owner expired) runs on_death again and reaps."""
    name = unique_name("twice")
    t, reg, deaths = open_all(name, server.url)
    slow = WATCHER.replace("deaths.update_counter(f\"calls:{pid}\")",
                           "deaths.update_counter(f\"calls:{pid}\"); import time; time.sleep(600)")
    first = start(slow, name, server.url, "1.5", env=hosts["B"])
    owner = start(OWNER, name, server.url, "1.5", env=hosts["A"])
    second = None
    try:
        expect_line(first, "active")
        expect_line(owner, "ok")
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(timeout=10)
        wait_until(lambda: deaths.get(f"calls:{owner.pid}") == 1, 30, "first on_death")
        os.kill(first.pid, signal.SIGKILL)          # dies inside on_death
        first.wait(timeout=10)
        assert "job:1" not in t                     # invisible (dead owner) though not reaped
        assert t._reap(0, True, False)[0] == 0      # (the first watcher's claim still holds)
        second = start(WATCHER, name, server.url, "1.5", env=hosts["B"])
        expect_line(second, "active")
        wait_until(lambda: deaths.get(f"entries:{owner.pid}") is not None, 40, "second on_death")
        assert deaths[f"calls:{owner.pid}"] == 2
        assert deaths[f"entries:{owner.pid}"] == ["job:1", "job:2"]
    finally:
        if second is not None:
            stop(second)
        stop(first, owner)
        unlink_all(t, reg, deaths)


def test_register_from_both_hosts_has_one_winner(server, hosts):
    name = unique_name("reg2")
    code = """
        import sys, shmreg
        reg = shmreg.Registry(sys.argv[1], url=sys.argv[2])
        sys.stdin.readline()
        try:
            reg.register("leader", sys.argv[3])
            print("won", flush=True)
        except shmreg.AlreadyRegisteredError as e:
            print("lost", e.pid, flush=True)
        sys.stdin.read()
        """
    procs = [start(code, name, server.url, str(i), env=hosts["AB"[i % 2]]) for i in range(6)]
    try:
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        answers = [p.stdout.readline().split() for p in procs]
        winners = [p.pid for p, a in zip(procs, answers) if a == ["won"]]
        assert len(winners) == 1
        assert all(a == ["lost", str(winners[0])] for a in answers if a != ["won"])
        with shmreg.Registry(name, url=server.url) as reg:
            assert reg.whereis("leader") == winners[0]
            reg.table.unlink()
    finally:
        stop(*procs)


def test_fencing_after_sigstop_longer_than_the_lease(server, hosts):
    """A process stopped longer than its lease loses its entries; when it
    resumes, its owned write carrying the old lease fails; the one after
    takes a new lease."""
    name = unique_name("fence")
    code = """
        import sys, shmreg
        t = shmreg.Table(sys.argv[1], url=sys.argv[2], lease_ttl=2.0)
        t.set("mine", "before", owned=True)
        print("ok", flush=True)
        sys.stdin.readline()
        try:
            t.set("mine", "after", owned=True)
            print("written", flush=True)
        except shmreg.LeaseLostError:
            print("fenced", flush=True)
        t["unowned"] = "fine"
        t.set("mine", "new lease", owned=True)
        print("again", flush=True)
        sys.stdin.read()
        """
    p = start(code, name, server.url, env=hosts["A"])
    t = shmreg.Table(name, url=server.url)
    try:
        expect_line(p, "ok")
        assert t["mine"] == "before"
        os.kill(p.pid, signal.SIGSTOP)
        wait_until(lambda: "mine" not in t, 15, "the stopped process's lease to expire")
        time.sleep(0.5)   # (stopped a while longer: its heartbeat cannot have run)
        os.kill(p.pid, signal.SIGCONT)
        p.stdin.write("go\n")
        p.stdin.flush()
        expect_line(p, "fenced")
        expect_line(p, "again")
        assert t["unowned"] == "fine" and t["mine"] == "new lease"
        assert t.owner("mine") == p.pid
    finally:
        os.kill(p.pid, signal.SIGCONT)
        stop(p)
        t.unlink()
        t.close()


# -- outages -----------------------------------------------------------------------------

def test_client_kill_of_every_connection_is_survived(server):
    t = shmreg.Table(unique_name("ck"), url=server.url, lease_ttl=5)
    try:
        t.set("owned", 1, owned=True)
        t["n"] = 0
        admins = server.admin_clients()
        for _ in range(3):
            killed = sum(a.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
                         for a in admins)
            assert killed >= 1
            assert t.update_counter("n") >= 1        # the pool reconnects
        for a in admins:
            a.close()
        time.sleep(5.5)      # longer than the lease: the heartbeat reconnected too
        assert t["owned"] == 1 and t["n"] == 3
    finally:
        t.unlink()
        t.close()


@pytest.mark.parametrize("how", ["restart", "crash"])
def test_server_restart_loses_no_acknowledged_write(how):
    """Clear errors while the server is down; every write acknowledged before
    a restart (or a SIGKILL of the server: appendfsync always) is there after."""
    s = Server().start()
    try:
        t = shmreg.Table(unique_name("rs"), url=s.url)
        acked = 0
        for _ in range(200):
            t.update_counter("n")
            acked += 1
        t["obj"] = {"a": 1}
        s.kill() if how == "crash" else s.stop()
        with pytest.raises(shmreg.BackendUnavailableError):
            t.update_counter("n")
        with pytest.raises(ConnectionError):        # the builtin a user would catch
            t["obj"]
        s.start()
        assert t["n"] == acked and t["obj"] == {"a": 1}
        assert t.update_counter("n") == acked + 1
        t.unlink()
        t.close()
    finally:
        s.cleanup()
