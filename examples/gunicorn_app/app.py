"""A plain WSGI app whose gunicorn workers share state through shmreg.

Routes:
  GET /             this worker's pid and the mode
  GET /compute?n=N  an expensive computation (iterated SHA-256 of N), cached in
                    a shared Cache: computed once across all workers
                    (get_or_set single flight); header X-Cache: hit | miss
  GET /status       JSON: every live worker (registry + scoreboard) and the counters

Every request bumps shared counters (``requests`` and ``path:<route>``) and
publishes what this worker is doing in a scoreboard row keyed by its pid
(an entry owned by the worker: it disappears when the worker dies, and the
gunicorn ``child_exit`` hook frees it).

``SHMREG_EXAMPLE_MODE=local`` runs the same app on per-worker dicts (no
sharing: each worker computes each value itself, ``/status`` sees only the
answering worker), for comparison.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union
from urllib.parse import parse_qs

MODE = os.environ.get("SHMREG_EXAMPLE_MODE", "shmreg")
PREFIX = os.environ.get("SHMREG_EXAMPLE_PREFIX", "example-")
ROUNDS = int(os.environ.get("SHMREG_EXAMPLE_ROUNDS", "20000"))   # ~10 ms of SHA-256
DELAY = float(os.environ.get("SHMREG_EXAMPLE_DELAY", "0"))       # extra seconds per computation
TTL = 300.0

Row = Dict[str, Any]
Environ = Dict[str, Any]
StartResponse = Callable[..., Any]


def expensive(n: int) -> str:
    h = str(n).encode()
    for _ in range(ROUNDS):
        h = hashlib.sha256(h).digest()
    if DELAY:
        time.sleep(DELAY)
    return h.hex()


class Shared:
    """State in shmreg tables, shared by every worker (set up by the gunicorn hooks)."""

    def __init__(self) -> None:
        import shmreg.gunicorn as g

        self.g = g
        self.counters_name = PREFIX + "counters"
        self.scoreboard_name = PREFIX + "scoreboard"
        self.cache_name = PREFIX + "cache"

    def count(self, key: str, incr: int = 1) -> int:
        return self.g.table(self.counters_name).update_counter(key, incr)

    def cached(self, key: str, factory: Callable[[], str]) -> Tuple[str, bool]:
        computed: List[bool] = []

        def compute() -> str:
            computed.append(True)
            return factory()

        value: str = self.g.cache(self.cache_name).get_or_set(key, compute, ttl=TTL)
        return value, bool(computed)

    def publish(self, row: Row) -> None:
        # Owned by this worker: gone the moment it dies, however it dies.
        self.g.table(self.scoreboard_name).set(os.getpid(), row, owned=True)

    def workers(self) -> List[Row]:
        rows = dict(self.g.table(self.scoreboard_name).items())
        out = []
        for key, reg in self.g.registry().items():
            info = dict(reg.value) if isinstance(reg.value, dict) else {}
            info.update(key=key, pid=reg.pid, scoreboard=rows.get(reg.pid))
            out.append(info)
        return sorted(out, key=lambda w: w["pid"])

    def counters(self) -> Row:
        return dict(sorted(self.g.table(self.counters_name).items()))


class Local:
    """The same state in per-worker dicts: nothing is shared."""

    def __init__(self) -> None:
        self._counters: Dict[str, int] = {}
        self._cache: Dict[str, Tuple[float, str]] = {}
        self._row: Optional[Row] = None
        self._booted = time.time()

    def count(self, key: str, incr: int = 1) -> int:
        v = self._counters[key] = self._counters.get(key, 0) + incr
        return v

    def cached(self, key: str, factory: Callable[[], str]) -> Tuple[str, bool]:
        hit = self._cache.get(key)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1], False
        value = factory()
        self._cache[key] = (time.monotonic() + TTL, value)
        return value, True

    def publish(self, row: Row) -> None:
        self._row = row

    def workers(self) -> List[Row]:
        return [{"key": f"worker:{os.getpid()}", "pid": os.getpid(), "booted_at": self._booted,
                 "scoreboard": self._row}]

    def counters(self) -> Row:
        return dict(sorted(self._counters.items()))


_state: Union[Shared, Local, None] = None
_state_pid = 0
_handled = 0


def state() -> Union[Shared, Local]:
    global _state, _state_pid, _handled
    if _state is None or _state_pid != os.getpid():   # one per worker (also with --preload)
        _state = Local() if MODE == "local" else Shared()
        _state_pid = os.getpid()
        _handled = 0
    return _state


def _json(start_response: StartResponse, body: Row, status: str = "200 OK",
          headers: Iterable[Tuple[str, str]] = ()) -> List[bytes]:
    data = json.dumps(body).encode()
    start_response(status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(data))), *headers])
    return [data]


def compute(st: Union[Shared, Local], environ: Environ, start_response: StartResponse) -> List[bytes]:
    try:
        n = int(parse_qs(environ.get("QUERY_STRING", "")).get("n", ["0"])[0])
    except ValueError:
        return _json(start_response, {"error": "n must be an integer"}, "400 Bad Request")

    def factory() -> str:
        st.count("computations")
        return expensive(n)

    value, computed = st.cached(f"sha:{n}", factory)
    return _json(start_response, {"n": n, "value": value, "pid": os.getpid(), "computed": computed},
                 headers=[("X-Cache", "miss" if computed else "hit")])


def status(st: Union[Shared, Local], environ: Environ, start_response: StartResponse) -> List[bytes]:
    return _json(start_response, {"mode": MODE, "pid": os.getpid(), "workers": st.workers(),
                                  "counters": st.counters()})


def index(st: Union[Shared, Local], environ: Environ, start_response: StartResponse) -> List[bytes]:
    return _json(start_response, {"mode": MODE, "pid": os.getpid()})


HANDLERS: Dict[str, Callable[[Union[Shared, Local], Environ, StartResponse], List[bytes]]] = {"/": index, "/compute": compute, "/status": status}


def application(environ: Environ, start_response: StartResponse) -> List[bytes]:
    global _handled
    st = state()
    path = environ.get("PATH_INFO", "/")
    route = path if path in HANDLERS else "other"
    st.count("requests")
    st.count(f"path:{route}")
    st.publish({"state": "busy", "path": path, "since": time.time(), "handled": _handled})
    try:
        handler = HANDLERS.get(path)
        if handler is None:
            return _json(start_response, {"error": "not found"}, "404 Not Found")
        return handler(st, environ, start_response)
    finally:
        _handled += 1  # noqa: SHM106 - per worker on purpose: shown in this worker's scoreboard row
        st.publish({"state": "idle", "path": path, "since": time.time(), "handled": _handled})
