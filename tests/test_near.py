"""The near cache (``Cache(name, url=..., near=True)``) on a real server and
a real 3-master Cluster: hits, fills, invalidations, TTLs, local writes,
the fill race, flushes on doubt, agent takeover, stats.

(Coherence under faults on two simulated hosts: test_near_faults.py.)
"""

from __future__ import annotations

import os
import signal
import time

import pytest

import shmreg
from _helpers import spawn_py, stop_process_tree, unique_name, wait_until
from _near_helpers import filled

redis = pytest.importorskip("redis")   # the test extra installs it: never skipped in CI
from shmreg.backends.redis.near import MAGIC, near_status  # noqa: E402

pytestmark = pytest.mark.timeout(120)   # the first cluster test starts the cluster


@pytest.fixture(params=["server", "cluster"])
def server(request):
    """The single server, then the Cluster."""
    return request.getfixturevalue("redis_server" if request.param == "server" else "redis_cluster")


def node_of(server, cache):
    """A direct client of the node that holds the cache's keys."""
    if hasattr(server, "nodes"):
        for c in server.admin_clients():
            if c.execute_command("CLUSTER", "COUNTKEYSINSLOT",
                                 c.execute_command("CLUSTER", "KEYSLOT", cache.table._p)) > 0:
                return c
        raise AssertionError("no node holds the cache's keys")
    return server.client()


def ready(cache, timeout=10.0, after_epoch=-1):
    """Wait until this host's agent serves the cache (in an epoch after
    ``after_epoch``); return its status."""
    def serving():
        st = cache.table.near_stats()
        return st["near_state"] == "ready" and st["near_epoch"] > after_epoch
    wait_until(serving, timeout, "the near cache to be ready")
    return cache.table.near_stats()


@pytest.fixture
def near(server):
    """A near cache (and a plain one, the "other host", on the same server)."""
    name = unique_name("near")
    c = shmreg.Cache(name, url=server.url, near=True, ttl=60)
    other = shmreg.Cache(name, url=server.url, ttl=60)
    c.table.start()
    ready(c)
    yield c, other
    other.close()
    c.unlink()
    c.close()


def test_hits_come_from_the_near_table_and_writes_elsewhere_invalidate(near):
    c, other = near
    other.set("k", "v1")
    assert c.get("k") == "v1"                # a miss: read from the server ...
    filled(c, "k", "v1")                     # ... and filled
    before = c.stats()["near_hits"]
    assert c.get("k") == "v1" and c["k"] == "v1"
    assert c.stats()["near_hits"] == before + 2
    other.set("k", "v2")                     # another process/host writes
    wait_until(lambda: c.table.near.get("k") is None, 5, "the invalidation")
    assert c.get("k") == "v2"
    other.delete("k")
    wait_until(lambda: c.table.near.get("k") is None, 5, "the invalidation")
    assert c.get("k") is None and "k" not in c
    # (the agent publishes its counters every 0.1 s)
    wait_until(lambda: c.stats()["near_invalidations"] >= 2, 5, "the counted invalidations")


@pytest.mark.parametrize("key", [7, b"raw\x00key", "ünï", -3])
def test_every_key_type_is_invalidated(near, key):
    c, other = near
    other.set(key, 1)
    filled(c, key, 1)
    other.table.update_counter(key, 5)
    wait_until(lambda: c.get(key) == 6, 5, "the new value")


def test_local_writes_drop_the_local_copy_and_never_install(near):
    c, _ = near
    c.set("w", 1)
    assert c.table.near.get("w") is None    # a write never installs its value
    filled(c, "w", 1)
    c.set("w", 2)
    assert c.table.near.get("w") is None and c.get("w") == 2   # read-your-writes at once
    assert c.add("w", 3) is False and c.get("w") == 2
    c.touch("w", 30)
    assert c.table.near.get("w") is None
    filled(c, "w", 2)
    assert c.table.near.ttl("w") <= 30
    c.delete("w")
    assert c.get("w") is None
    c.set("x", 1)
    c.get("x")
    c.clear()
    assert c.get("x") is None and len(c.table.near) == 0


def test_local_copies_follow_the_server_ttl(near):
    c, other = near
    other.set("short", "s", ttl=1.5)
    filled(c, "short", "s")
    server_left = c.table._t.ttl("short")      # read first: the later read can only be less
    assert 0 < c.table.near.ttl("short") <= server_left <= 1.5
    deadline = time.monotonic() + c.table._t.ttl("short")
    time.sleep(max(0.0, deadline - time.monotonic()) + 0.01)
    assert c.table.near.get("short") is None and c.get("short") is None
    other.set("forever", "f", ttl=float("inf"))
    filled(c, "forever", "f")
    assert c.table.near.ttl("forever") is None


def test_get_or_set_and_memoize_through_the_near_cache(near):
    c, _ = near
    calls = []
    assert c.get_or_set("g", lambda: calls.append(1) or 42) == 42
    assert c.get_or_set("g", lambda: calls.append(1) or 43) == 42
    assert calls == [1]

    @c.memoize(ttl=30)
    def square(x):
        calls.append(x)
        return x * x

    assert square(9) == 81 and square(9) == 81 and calls == [1, 9]


def test_owned_entries_and_placeholder_lookalikes_are_never_installed(near):
    c, _ = near
    t = c.table._t
    t.set("mine", "lease-bound", owned=True)
    assert c.get("mine") == "lease-bound"
    assert c.table.near.get("mine") is None
    fake = MAGIC + b"user data"
    t.set("fake", fake)
    assert c.get("fake") == fake and c.get("fake") == fake
    assert c.table.near.get("fake") is None


def test_a_write_that_overtakes_a_fill_is_not_installed(near):
    """The race a naive read-through loses: the value is read from the
    server, a write lands and its invalidation is processed, and only then
    does the filler install.  The placeholder was invalidated, so the swap
    fails and the stale value never enters the near table."""
    c, other = near
    other.set("race", "old")
    real_read = c.table._t._read

    def read_then_overtaken(key):
        r = real_read(key)
        other.set("race", "new")
        wait_until(lambda: c.table.near.get("race", None) is None, 5,
                   "the invalidation to delete the placeholder")
        return r

    c.table._t._read = read_then_overtaken
    try:
        assert c.get("race") == "old"        # what the server said at the read
    finally:
        del c.table._t._read
    assert c.table.near.get("race") is None  # ... but not installed
    assert c.get("race") == "new"


def test_a_dead_fillers_placeholder_does_not_block_the_key(near):
    c, other = near
    other.set("p", 1)
    st = c.table.near_stats()
    owner = c.table.ctl.get("ready") & 0xFFFFFFFF
    import struct
    stale = MAGIC + struct.pack("<Id", 999999, time.time() - 60) + b"12345678"
    assert c.table.near._insert_new_for("p", stale, owner)
    assert c.get("p") == 1                   # served from the server, placeholder cleared
    assert c.table.near.get("p") is None
    filled(c, "p", 1)
    assert st["near_state"] == "ready"


def test_flushall_empties_the_near_table(near, server):
    c, other = near
    for i in range(5):
        other.set(f"f{i}", i)
    for i in range(5):
        filled(c, f"f{i}", i)
    assert len(c.table.near) == 5
    for node in server.admin_clients():
        node.execute_command("FLUSHALL")
    wait_until(lambda: len(c.table.near) == 0, 5, "the flush")
    assert c.get("f1") is None


def test_client_kill_and_pause_flush_then_serve_again(near, server):
    c, other = near
    other.set("a", 1)
    assert c.get("a") == 1
    epoch = ready(c)["near_epoch"]
    flushes = c.stats()["near_flushes"]
    node = node_of(server, other)
    killed = 0
    for cl in node.client_list():
        if cl["name"].startswith("shmreg-near:"):
            node.client_kill_filter(_id=cl["id"])
            killed += 1
    assert killed == 1
    st = ready(c, after_epoch=epoch)
    assert st["near_flushes"] > flushes
    assert "closed the connection" in st["near_last_doubt"]
    filled(c, "a", 1)
    # A pause longer than the heartbeat timeout: the agent cannot prove it
    # sees writes, so it flushes and serves from the server meanwhile.
    epoch = st["near_epoch"]
    node.execute_command("CLIENT", "PAUSE", 3000, "WRITE")   # long enough to look at "down"
    wait_until(lambda: c.table.near_stats()["near_state"] == "down", 5, "the flush")
    assert len(c.table.near) == 0
    assert c.get("a") == 1 and c.table.near.get("a") is None   # no fill while down
    st = ready(c, after_epoch=epoch, timeout=20)
    assert "heartbeat" in st["near_last_doubt"]
    other.set("a", 2)
    wait_until(lambda: c.get("a") == 2, 5, "the new value")


AGENT = """
    import sys, time, shmreg
    c = shmreg.Cache(sys.argv[1], url=sys.argv[2], near=True)
    c.table.start()
    print("started", flush=True)
    time.sleep(600)
    """


def test_agent_death_disables_at_once_and_another_takes_over(server):
    name = unique_name("near")
    child = spawn_py(AGENT, name, server.url)
    try:
        assert child.stdout.readline().strip() == "started"
        wait_until(lambda: (near_status(name, server.url) or {}).get("near_state") == "ready",
                   10, "the child to be the agent")
        assert near_status(name, server.url)["near_agent_pid"] == child.pid
        c = shmreg.Cache(name, url=server.url, near=True, ttl=60)
        c.set("x", "X")
        filled(c, "x", "X")                 # owned by the child's agent
        epoch = c.table.ctl.get("ready") >> 32
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
        # Its entries vanish with it, before any other process notices, and
        # its "ready" with them (unless this process's candidate already
        # took over: then in a later epoch).
        assert c.table.near.get("x") is None
        r = c.table.ctl.get("ready")
        assert r is None or r >> 32 > epoch
        st = ready(c)                       # this process's candidate takes over
        assert st["near_agent_pid"] == os.getpid()
        filled(c, "x", "X")
        c.unlink()
        c.close()
    finally:
        stop_process_tree(child)
        child.communicate(timeout=10)


def test_closing_the_agent_hands_over(server):
    name = unique_name("near")
    a = shmreg.Cache(name, url=server.url, near=True)
    a.table.start()
    ready(a)
    child = spawn_py(AGENT, name, server.url)
    try:
        assert child.stdout.readline().strip() == "started"
        a.set("k", 1)
        assert a.get("k") == 1
        a.close()                             # gives the role up
        wait_until(lambda: (near_status(name, server.url) or {}).get("near_agent_pid")
                   == child.pid, 10, "the child to take over")
    finally:
        stop_process_tree(child)
        child.communicate(timeout=10)
        shmreg.Cache(name, url=server.url).unlink()
        for n in (a.table.near_name, a.table.ctl_name):
            try:
                shmreg.unlink(n)
            except shmreg.TableNotFoundError:
                pass


def test_near_needs_a_server_url_and_a_valid_option(redis_server):
    with pytest.raises(ValueError, match="url"):
        shmreg.Cache(unique_name("near"), near=True)
    with pytest.raises(ValueError, match="capacity"):
        shmreg.Cache(unique_name("near"), url=redis_server.url, near={"size": 1})


def test_a_full_near_table_serves_from_the_server(redis_server):
    name = unique_name("near")
    c = shmreg.Cache(name, url=redis_server.url, near={"capacity": 64, "memory": 1 << 16})
    try:
        c.table.start()
        ready(c)
        for i in range(400):
            c.set(i, "x" * 200)
        assert [c.get(i) for i in range(400)] == ["x" * 200] * 400
        st = c.stats()
        assert st["near_full"] > 0 and st["near_entries"] <= 400
    finally:
        c.unlink()
        c.close()


def test_shmreg_stat_shows_the_hosts_near_cache(near, server):
    c, _ = near
    import json
    import subprocess
    import sys
    run = [sys.executable, "-m", "shmreg", "stat", c.name, "--url", server.url]
    out = subprocess.run(run + ["--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    st = json.loads(out.stdout)
    assert st["near_state"] == "ready" and st["near_agent_pid"] == os.getpid()
    # (What `shmreg stat --prometheus` appends to a Redis table's metrics.)
    from shmreg.backends.redis.near import near_prometheus_text
    prom = near_prometheus_text(c.table._t)
    assert f'shmreg_near_ready{{table="{c.name}"}} 1' in prom
    assert "# TYPE shmreg_near_flushes_total counter" in prom


def _move_slot(nodes, slot, src, dst):
    """Migrate ``slot`` (and its keys) from node ``src`` to node ``dst``."""
    ids = {n: n.client().execute_command("CLUSTER", "MYID") for n in nodes}
    ids = {n: (i.decode() if isinstance(i, bytes) else i) for n, i in ids.items()}
    s, d = src.client(), dst.client()
    d.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[src])
    s.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[dst])
    while True:
        keys = s.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 500)
        if not keys:
            break
        s.execute_command("MIGRATE", "127.0.0.1", dst.port, "", 0, 5000, "KEYS", *keys)
    for n in [dst, src] + [n for n in nodes if n not in (src, dst)]:
        n.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[dst])


def test_a_moved_slot_flushes_and_tracking_follows_it(redis_cluster):
    """The table's slot migrates to another master: the agent's heartbeat
    gets MOVED, it flushes, and re-establishes tracking on the new master
    (whose writes it then sees)."""
    name = unique_name("near")
    c = shmreg.Cache(name, url=redis_cluster.url, near=True, ttl=60)
    other = shmreg.Cache(name, url=redis_cluster.url, ttl=60)
    nodes = redis_cluster.nodes
    slot = nodes[0].client().execute_command("CLUSTER", "KEYSLOT", c.table._p)
    ranges = [(0, 5460), (5461, 10922), (10923, 16383)]
    home = next(n for n, (lo, hi) in zip(nodes, ranges) if lo <= slot <= hi)
    away = next(n for n in nodes if n is not home)
    moved = False
    try:
        epoch = ready(c)["near_epoch"]
        other.set("m", 1)
        filled(c, "m", 1)
        _move_slot(nodes, slot, home, away)
        moved = True
        st = ready(c, after_epoch=epoch)
        assert "MOVED" in st["near_last_doubt"]
        assert c.get("m") == 1
        filled(c, "m", 1)
        other.set("m", 2)                  # written on the new master
        wait_until(lambda: c.table.near.get("m") is None, 5, "the invalidation from the new master")
        assert c.get("m") == 2
    finally:
        if moved:
            _move_slot(nodes, slot, away, home)
        other.close()
        c.unlink()
        c.close()


def _proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_a_paused_agent_is_withdrawn_by_a_candidate(redis_server):
    """The agent's process is SIGSTOPped: it lives (its entries stay
    visible) but reads no invalidations.  This process's candidate sees its
    heartbeats stop, withdraws it and empties the table; after SIGCONT the
    agent starts over."""
    name = unique_name("near")
    url = redis_server.url
    child = spawn_py(AGENT, name, url)
    try:
        assert child.stdout.readline().strip() == "started"
        wait_until(lambda: (near_status(name, url) or {}).get("near_state") == "ready",
                   10, "the child to be the agent")
        c = shmreg.Cache(name, url=url, near=True, ttl=60)
        other = shmreg.Cache(name, url=url, ttl=60)
        other.set("s", 1)
        filled(c, "s", 1)
        for _ in range(5):
            # Stop the agent while it serves (on a loaded machine it may be
            # re-establishing tracking after a doubt: then let it finish).
            epoch = ready(c)["near_epoch"]
            os.kill(child.pid, signal.SIGSTOP)
            wait_until(lambda: _proc_state(child.pid) == "T", 10, "the agent to stop")
            st = c.table.near_stats()
            if st["near_state"] == "ready" and st["near_epoch"] == epoch:
                break
            os.kill(child.pid, signal.SIGCONT)
        else:
            pytest.fail("never stopped the agent while it was serving")
        other.set("s", 2)                 # nobody reads this invalidation
        wait_until(lambda: c.table.near_stats()["near_state"] == "down", 10,
                   "the stalled agent's withdrawal")
        assert "stalled" in c.table.near_stats()["near_last_doubt"]
        assert c.table.near.get("s") is None
        assert c.get("s") == 2                             # served from the server
        os.kill(child.pid, signal.SIGCONT)
        st = ready(c, after_epoch=epoch)
        assert st["near_agent_pid"] == child.pid
        filled(c, "s", 2)
        other.close()
        c.unlink()
        c.close()
    finally:
        os.kill(child.pid, signal.SIGCONT)
        stop_process_tree(child)
        child.communicate(timeout=10)
