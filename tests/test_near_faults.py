"""Coherence of the near cache under faults, on two simulated hosts.

Each host (its own ``SHMREG_DIR`` and ``SHMREG_HOST_ID``, so its own near
table and agent) runs an idle process that becomes its agent, a writer and
a reader, all with ``near=True``.  Host A's writer owns the even keys, host
B's the odd ones; every value is the key's version, and a writer records
the time each write was acknowledged.  Meanwhile the test cuts the agents'
connections (``CLIENT KILL``, once, then four times at random moments),
pauses the server (``CLIENT PAUSE``),
SIGKILLs host A's agent, and restarts the server (the node of the table's
slot, in the Cluster).

The checker: a read that started at ``t`` must return at least the
version last acknowledged before ``t - BOUND``, and after every fault each
host's near cache serves again (its reader's near hits grow).
"""

from __future__ import annotations

import bisect
import json
import os
import random
import shutil
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
from shmreg.backends.redis.near import near_names, near_status_of  # noqa: E402

pytestmark = pytest.mark.timeout(150)

#: Invalidation bound the checker allows: the heartbeat timeout (0.5 s) plus
#: room for a loaded 2-core machine.  What was seen is printed.
BOUND = 2.0
NKEYS = 40

CHILD = """
    import json, os, random, select, sys, time, shmreg
    role, name, url, part = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    nkeys = int(sys.argv[5])
    c = shmreg.Cache(name, url=url, near=True, ttl=600)
    c.table.start()
    print("started", flush=True)

    def stopped():
        return bool(select.select([sys.stdin], [], [], 0)[0])

    if role == "idle":
        sys.stdin.read()
        sys.exit(0)
    out = {"errors": 0}
    if role == "writer":
        keys = [k for k in range(nkeys) if k % 2 == part]
        ver = dict.fromkeys(keys, 0)
        acks = []
        while not stopped():
            for _ in range(10):
                k = random.choice(keys)
                ver[k] += 1          # a failed write's version is never reused
                try:
                    c.set(k, ver[k])
                    acks.append((k, ver[k], time.monotonic()))
                except shmreg.BackendUnavailableError:   # an outage
                    out["errors"] += 1
                    time.sleep(0.01)
                time.sleep(0.0005)
        out["acks"] = acks
    else:
        last, hits = {}, []
        while not stopped():
            for _ in range(100):
                k = random.randrange(nkeys)
                t0 = time.monotonic()
                try:
                    v = c.get(k)
                except shmreg.BackendUnavailableError:   # an outage
                    out["errors"] += 1
                    time.sleep(0.01)
                    continue
                last[(k, v)] = t0     # the latest read of each (key, version) is the one to check
            hits.append((time.monotonic(), c.table.near_hits))
            time.sleep(0.002)
        out["last"] = [[k, v, t] for (k, v), t in last.items()]
        out["hits"] = hits
    print(json.dumps(out), flush=True)
    """


class Host:
    """One simulated host: its directory, identity and processes."""

    def __init__(self, tag: str, name: str, url: str) -> None:
        self.tag = tag
        self.dir = tempfile.mkdtemp(prefix=f"shmreg-near-host{tag}-")
        self.env = {**os.environ, "SHMREG_DIR": self.dir, "SHMREG_HOST_ID": f"near-host-{tag}"}
        self.name, self.url = name, url
        self.procs: dict[str, subprocess.Popen] = {}
        self._ctl = None

    def start(self, role: str, part: int = 0) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(CHILD), role, self.name,
                              self.url, str(part), str(NKEYS)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=self.env)
        line = p.stdout.readline().strip()
        if line != "started":
            p.kill()
            raise AssertionError(f"{role} on host {self.tag}: {line!r} {p.communicate(timeout=10)}")
        self.procs[role] = p
        return p

    def status(self) -> dict:
        if self._ctl is None:
            old = os.environ["SHMREG_DIR"]
            os.environ["SHMREG_DIR"] = self.dir
            try:
                self._ctl = shmreg.Table.open(near_names(self.name, self.url)[1])
            finally:
                os.environ["SHMREG_DIR"] = old
        return near_status_of(self._ctl)

    def wait_ready(self, after_epoch: int = -1, timeout: float = 30.0) -> dict:
        def serving():
            st = self.status()
            return st["near_state"] == "ready" and st["near_epoch"] > after_epoch
        try:
            wait_until(serving, timeout, f"host {self.tag}'s near cache to serve", interval=0.02)
        except Exception as e:
            raise AssertionError(f"host {self.tag}: {self.status()}") from e
        return self.status()

    def finish(self, role: str) -> dict:
        p = self.procs.pop(role)
        out, err = p.communicate(input="", timeout=60)
        assert p.returncode == 0, f"{role} on host {self.tag} failed: {err[-3000:]}"
        return json.loads(out.strip().splitlines()[-1])

    def cleanup(self) -> None:
        for p in self.procs.values():
            stop_process_tree(p, timeout=5)
            p.communicate(timeout=10)
        if self._ctl is not None:
            self._ctl.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def near_clients(client) -> list:
    return [c for c in client.client_list() if c["name"].startswith("shmreg-near:")]


def check(acks: dict, reads: list) -> tuple[int, float, list]:
    """``(reads checked, worst staleness seen, violations)``."""
    times = {k: [t for t, _ in sorted(a)] for k, a in acks.items()}
    vers = {k: [v for _, v in sorted(a)] for k, a in acks.items()}
    worst, bad = 0.0, []
    for k, v, t0 in reads:
        ts, vs = times[k], vers[k]
        got = -1 if v is None else v
        i = bisect.bisect_right(ts, t0) - 1          # last ack before the read started
        if i >= 0 and vs[i] > got:
            j = next(j for j in range(len(vs)) if vs[j] > got)
            stale_for = t0 - ts[j]                   # how long a newer version had been acked
            worst = max(worst, stale_for)
            if stale_for > BOUND:
                bad.append((k, v, round(stale_for, 3)))
    return len(reads), worst, bad


def run_scenario(name: str, url: str, admin, restart) -> None:
    hosts = {h: Host(h, name, url) for h in "AB"}
    try:
        seed = shmreg.Cache(name, url=url, ttl=600)
        t_seed = time.monotonic()
        for k in range(NKEYS):
            seed.set(k, 0)
        for h in hosts.values():
            h.start("idle")
        for h in hosts.values():
            st = h.wait_ready()
            assert st["near_agent_pid"] == h.procs["idle"].pid
        for i, h in enumerate(hosts.values()):
            h.start("writer", part=i)
            h.start("reader")
        recovered = []

        def settle(what: str, epochs: dict) -> None:
            for h in hosts.values():
                h.wait_ready(after_epoch=epochs.get(h.tag, -1))
            recovered.append((what, time.monotonic()))
            time.sleep(1.0)                 # readers hit again, writers keep writing

        def epochs() -> dict:
            return {h.tag: h.status()["near_epoch"] for h in hosts.values()}

        time.sleep(1.0)
        # 1. CLIENT KILL of every agent's tracking connection.
        e = epochs()
        killed = 0
        for c in admin():
            for cl in near_clients(c):
                c.client_kill_filter(_id=cl["id"])
                killed += 1
        assert killed >= 2
        settle("client kill", e)
        # 1b. Kills at random moments, the next before the agents recovered.
        e = epochs()
        rng = random.Random()
        for _ in range(4):
            time.sleep(rng.uniform(0.02, 0.4))
            for c in admin():
                for cl in near_clients(c):
                    c.client_kill_filter(_id=cl["id"])
        settle("random client kills", e)
        # 2. CLIENT PAUSE of every node, longer than the heartbeat timeout.
        e = epochs()
        for c in admin():
            c.execute_command("CLIENT", "PAUSE", 1200, "ALL")
        settle("client pause", e)
        # 3. Host A's agent SIGKILLed: another of A's processes takes over.
        e = {"A": epochs()["A"]}            # (host B is not affected)
        victim = hosts["A"].procs.pop("idle")
        victim.send_signal(signal.SIGKILL)
        victim.communicate(timeout=10)
        settle("agent sigkill", e)
        assert hosts["A"].status()["near_agent_pid"] != victim.pid
        # 4. The server (the node of the table's slot) restarted.
        e = epochs()
        restart()
        settle("server restart", e)

        acks = {k: [(t_seed, 0)] for k in range(NKEYS)}
        reads, hit_logs, errors = [], {}, 0
        for h in hosts.values():
            w = h.finish("writer")
            r = h.finish("reader")
            errors += w["errors"] + r["errors"]
            for k, v, t in w["acks"]:
                acks[k].append((t, v))
            reads += r["last"]
            hit_logs[h.tag] = r["hits"]
        n, worst, bad = check(acks, reads)
        print(f"\nnear coherence: {n} (key, version) reads checked, "
              f"{sum(len(a) for a in acks.values())} acknowledged writes, "
              f"worst staleness {worst * 1000:.1f} ms, {errors} outage errors, "
              f"recoveries {[w for w, _ in recovered]}")
        assert not bad, f"stale reads beyond {BOUND} s: {bad[:10]}"
        # After every fault the near cache served again on both hosts.
        for what, t in recovered:
            for tag, log in hit_logs.items():
                at = [h for ts, h in log if ts >= t]
                assert at and at[-1] > at[0], f"host {tag}: no near hits after {what}"
        seed.unlink()
        seed.close()
    finally:
        for h in hosts.values():
            h.cleanup()


def test_coherent_through_faults_single_server():
    server = Server().start()
    try:
        def restart():
            server.stop()
            server.start()

        run_scenario(unique_name("nearf"), server.url, lambda: [server.client()], restart)
    finally:
        server.cleanup()


def test_coherent_through_faults_cluster(redis_cluster):
    name = unique_name("nearf")
    probe = shmreg.Table(name, url=redis_cluster.url)
    slot = redis_cluster.nodes[0].client().execute_command("CLUSTER", "KEYSLOT", probe._p)
    probe.close()
    ranges = [(0, 5460), (5461, 10922), (10923, 16383)]
    node = next(n for n, (lo, hi) in zip(redis_cluster.nodes, ranges) if lo <= slot <= hi)

    def restart():
        node.stop()
        node.start()
        # The cluster forms again (the node keeps its slots in nodes.conf).
        wait_until(lambda: all(b"cluster_state:ok" in c.execute_command("CLUSTER", "INFO")
                               for c in redis_cluster.admin_clients()), 30, "the cluster")

    run_scenario(name, redis_cluster.url, lambda: [node.client()], restart)
