"""The near cache's agent: one per host and cache, keeping the near table
coherent with the server.

Every process that uses a near cache runs a candidate thread.  The one
whose ``insert_new("agent", owned=True)`` on the control table succeeds is
the agent; when its process dies the entry vanishes, so does every near
entry (they are owned by the agent process), and another candidate takes
over within :data:`ELECTION_POLL`.

The agent's loop (each step is why the near cache may serve):

1. Delete ``ready`` and empty the near table (from now on nothing is
   served from it or filled into it).
2. Open a RESP3 connection to the master of the table's hash slot and turn
   on ``CLIENT TRACKING ON BCAST PREFIX {shmreg:NAME}:k:``.
3. One heartbeat round trip on that connection: ``SET`` of this agent's
   heartbeat key (tracked too), whose reply *and* invalidation must both arrive within
   :data:`HEARTBEAT_TIMEOUT` (proves invalidations flow from the node that
   owns the slot).
4. Empty the near table again (placeholders inserted before tracking was on
   go), bump ``epoch``, set ``ready = epoch << 32 | agent owner id`` (owned).
5. Delete every invalidated key; a ``null`` invalidation (FLUSHALL) empties
   the table; a heartbeat every :data:`HEARTBEAT_INTERVAL`.

Any doubt - the connection lost or killed, a heartbeat reply or
invalidation late (``CLIENT PAUSE``, a failover), an error reply such as
``MOVED`` - goes back to step 1 (a *flush*) and retries with backoff.

The candidates watch the agent: if its heartbeat count stops moving for
:data:`STALL_TIMEOUT` while it is ready (its process SIGSTOPped, or its
thread starved of the GIL), one of them withdraws ``ready`` and empties the
table; the agent, when it runs again, finds ``ready`` gone and starts over.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from shmreg.backends.redis import codec, leases
from shmreg.backends.redis.resp3 import Push, RespConnection, RespError, endpoint_of_url

__all__ = ["Agent"]

ELECTION_POLL = 0.05
HEARTBEAT_INTERVAL = 0.1
HEARTBEAT_TIMEOUT = 0.5
#: A live agent whose heartbeat count has not moved for this long (its
#: process SIGSTOPped, or its thread starved) is taken off by a candidate.
STALL_TIMEOUT = 1.0
_COUNTERS_EVERY = 0.1
_BACKOFF_MAX = 1.0


class Doubt(Exception):
    """The agent can no longer be sure it sees every invalidation."""


class Agent:
    """The candidate (and, once elected, agent) thread of one process for one
    :class:`~shmreg.backends.redis.near.NearTable`."""

    def __init__(self, nt: Any) -> None:
        self.nt = nt
        self.near = nt.near
        self.ctl = nt.ctl
        self.table = nt._t
        self.prefix = self.table._kp                        # b"{shmreg:NAME}:k:"
        # Outside the entries' prefix, tracked by a prefix of its own: no
        # host receives another host's heartbeats.
        self.hb_key = self.table._pb + f":nhb:{leases.host_id()}:{os.getpid()}".encode()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._moved_to: tuple[str, int] | None = None
        self.conn: RespConnection | None = None
        self.is_agent = False
        self._pending = {"invalidations": 0, "flushes": 0}
        self._next_counters = 0.0
        self._hb_seq = 0
        self._hb_seen = False
        self._seen: tuple | None = None      # (heartbeats, ready, since) as a candidate saw them

    def start(self) -> None:
        """Start the candidate thread (a daemon)."""
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"shmreg-near:{self.table.name}")
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread; an agent gives the role up (its entries go)."""
        self._stop.set()
        conn = self.conn
        if conn is not None:
            conn.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # -- election ------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.ctl.insert_new("agent", os.getpid(), owned=True):
                    self.is_agent = True
                    try:
                        self._serve()
                    finally:
                        self.is_agent = False
                        self._down()
                        self.ctl._delete_owned("agent", self.ctl._self_owner_id)
                else:
                    self._watch_agent()
            except ValueError:
                return        # a table closed under us: this process stops using the cache
            except Exception:  # noqa: BLE001 - a candidate must never die of one bad moment
                pass
            self._stop.wait(ELECTION_POLL)

    def _watch_agent(self) -> None:
        """A candidate's watch on the live agent: if its heartbeats stop
        while it is ``ready`` (a paused process cannot read invalidations,
        and its entries stay visible while it lives), withdraw ``ready`` and
        empty the table.  The agent sees ``ready`` gone when it runs again
        and re-establishes tracking."""
        r = self.ctl.get("ready")
        now = time.monotonic()
        if r is None:
            self._seen = None
            return
        hb = self.ctl.get("heartbeats", 0)
        if self._seen is None or self._seen[:2] != (hb, r):
            self._seen = (hb, r, now)
            return
        if now - self._seen[2] > STALL_TIMEOUT:
            if self.ctl.get("ready") == r:
                self.ctl.delete("ready")
                self.near.clear()
                self.ctl["last_doubt"] = (f"agent stalled: no heartbeat for {STALL_TIMEOUT} s "
                                          "(withdrawn by a candidate)")
                self.ctl.update_counter("flushes", 1)
            self._seen = None

    # -- the agent ---------------------------------------------------------------------

    def _down(self) -> None:
        """Stop serving and filling (``ready`` first), then empty the table."""
        self.ctl.delete("ready")
        self.near.clear()

    def _count(self, what: str, n: int = 1, force: bool = False) -> None:
        self._pending[what] += n
        now = time.monotonic()
        if force or now >= self._next_counters:
            self._next_counters = now + _COUNTERS_EVERY
            for k, v in self._pending.items():
                if v:
                    self.ctl.update_counter(k, v)
                    self._pending[k] = 0

    def _serve(self) -> None:
        owner = self.near._self_owner()
        backoff = 0.05
        while not self._stop.is_set():
            self._down()
            try:
                self.conn = self._connect()
                self._track(owner)
            except (OSError, ConnectionError, RespError, Doubt) as e:
                if self._stop.is_set():
                    return
                self._down()
                self.ctl["last_doubt"] = f"{type(e).__name__}: {e}"[:200]
                self._count("flushes", force=True)
            finally:
                if self.conn is not None:
                    self.conn.close()
                    self.conn = None
            self._stop.wait(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)

    def _endpoint(self) -> dict:
        """Where the master of the table's slot is, and how to log in."""
        client = self.table._client
        pool = getattr(client, "connection_pool", None)
        if pool is not None and hasattr(pool, "get_master_address"):   # Sentinel
            # (Not from the URL: it names the Sentinels, often several.)
            kw = pool.connection_kwargs
            host, port = pool.get_master_address()
            return {"host": host, "port": int(port), "username": kw.get("username"),
                    "password": kw.get("password"), "tls": None}
        ep = endpoint_of_url(self.table.url)
        if hasattr(client, "get_node_from_key"):          # a Cluster
            if self._moved_to is not None:
                ep["host"], ep["port"] = self._moved_to
            else:
                node = client.get_node_from_key(self.hb_key)
                ep["host"], ep["port"] = node.host, int(node.port)
        return ep

    def _connect(self) -> RespConnection:
        ep = self._endpoint()
        name = f"shmreg-near:{leases.host_id()}:{os.getpid()}".replace(" ", "_")
        return RespConnection(name=name, **ep)

    def _request(self, *args: Any) -> Any:
        """Send a command and wait for its reply, handling pushes meanwhile."""
        conn = self.conn
        assert conn is not None
        conn.send(*args)
        deadline = time.monotonic() + HEARTBEAT_TIMEOUT
        while True:
            m = conn.read(max(0.0, deadline - time.monotonic()))
            if m is None:
                raise Doubt(f"no reply to {args[0]} within {HEARTBEAT_TIMEOUT} s")
            if isinstance(m, Push):
                self._on_push(m)
                continue
            if isinstance(m, RespError):
                self._note_moved(str(m))
                raise m
            return m

    def _note_moved(self, msg: str) -> None:
        if msg.startswith("MOVED"):
            try:
                host, _, port = msg.split()[2].rpartition(":")
                self._moved_to = (host, int(port))
            except (IndexError, ValueError):
                self._moved_to = None

    def _track(self, owner: int) -> None:
        conn = self.conn
        assert conn is not None
        self._request("CLIENT", "TRACKING", "ON", "BCAST", "PREFIX", self.prefix,
                      "PREFIX", self.hb_key)
        self._hb_seq = 0
        self._heartbeat_roundtrip()
        self._moved_to = None
        # Tracking is on and proven: anything filled before now goes.
        self.near.clear()
        epoch = self.ctl.update_counter("epoch", 1)
        ready = (epoch << 32) | owner
        self.ctl.set("ready", ready, owned=True)
        next_hb = time.monotonic() + HEARTBEAT_INTERVAL
        while not self._stop.is_set():
            m = conn.read(max(0.0, next_hb - time.monotonic()))
            if m is not None:
                if isinstance(m, Push):
                    self._on_push(m)
                    continue
                raise Doubt(f"unexpected reply on the tracking connection: {m!r:.80}")
            if self._pending["invalidations"]:
                self._count("invalidations", 0, force=True)
            self._heartbeat_roundtrip()
            if self.ctl.get("ready") != ready:
                raise Doubt("ready was withdrawn (this agent had stalled)")
            next_hb = time.monotonic() + HEARTBEAT_INTERVAL

    def _heartbeat_roundtrip(self) -> None:
        """``SET`` the heartbeat key; its reply and its invalidation must both
        arrive within HEARTBEAT_TIMEOUT (pushes are handled meanwhile)."""
        conn = self.conn
        assert conn is not None
        self._hb_seq += 1
        self._hb_seen = False
        conn.send("SET", self.hb_key, self._hb_seq, "PX", 10_000)
        replied = False
        deadline = time.monotonic() + HEARTBEAT_TIMEOUT
        while not (replied and self._hb_seen):
            m = conn.read(max(0.0, deadline - time.monotonic()))
            if m is None:
                raise Doubt(f"missed heartbeat ({'no invalidation' if replied else 'no reply'} "
                            f"within {HEARTBEAT_TIMEOUT} s)")
            if isinstance(m, Push):
                self._on_push(m)
            elif isinstance(m, RespError):
                self._note_moved(str(m))
                raise Doubt(f"heartbeat refused: {m}")
            else:
                replied = True
        # (Published for status pages, and for tests: a round trip that began
        # after a write ends after that write's invalidation was handled.)
        self.ctl.update_counter("heartbeats", 1)

    def _on_push(self, m: Push) -> None:
        if len(m) < 2 or m[0] != b"invalidate":
            return             # other push kinds (a pub/sub message) are not ours
        keys = m[1]
        if keys is None:      # FLUSHDB/FLUSHALL, or the server dropped its tracking table
            self.near.clear()
            self._count("flushes", force=True)
            return
        n = 0
        plen = len(self.prefix)
        delete = self.near.delete
        for ek in keys:
            if ek == self.hb_key:
                self._hb_seen = True
                continue
            try:
                key = codec.decode_key_suffix(ek[plen:])
            except Exception:  # noqa: BLE001 - not an entry's key: nothing to evict
                continue
            delete(key)
            n += 1
        if n:
            self._count("invalidations", n)
