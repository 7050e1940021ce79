"""A WSGI app whose gunicorn workers share a Redis/Valkey-backed cache, read
through this host's near cache (``docs/near-cache.md``).

Routes:
  GET /item?k=K        the value of item K: ``get_or_set`` (computed once
                       across every worker of every host); X-Near: hit | miss
  GET /set?k=K&v=V     store V for item K on the server (every worker, on
                       every host, reads V next)
  GET /status          JSON: this worker's pid and the cache's near stats

Environment:
  SHMREG_EXAMPLE_URL   the server (required), e.g. redis://127.0.0.1:6379/0
  SHMREG_EXAMPLE_NEAR  1 (default): near cache on; 0: every read goes to the server
  SHMREG_EXAMPLE_NAME  the cache's name (default "near-example")
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, Iterable, List, Optional, Tuple
from urllib.parse import parse_qs

import shmreg

URL = os.environ.get("SHMREG_EXAMPLE_URL", "")
NEAR = os.environ.get("SHMREG_EXAMPLE_NEAR", "1") == "1"
NAME = os.environ.get("SHMREG_EXAMPLE_NAME", "near-example")
TTL = 300.0

StartResponse = Callable[[str, List[Tuple[str, str]]], Any]

_cache: Optional[shmreg.Cache] = None
_cache_pid = 0


def cache() -> shmreg.Cache:
    """This worker's handle on the cache (one per process: opened after the fork)."""
    global _cache, _cache_pid
    if _cache is None or _cache_pid != os.getpid():
        if not URL:
            raise RuntimeError("set SHMREG_EXAMPLE_URL to a Redis/Valkey URL")
        _cache = shmreg.Cache(NAME, url=URL, ttl=TTL, near=NEAR)
        _cache_pid = os.getpid()
    return _cache


def compute(k: str) -> str:
    """The "expensive" value of item ``k``."""
    return hashlib.sha256(k.encode()).hexdigest()


def _reply(start_response: StartResponse, body: Any, headers: Iterable = ()) -> List[bytes]:
    data = json.dumps(body).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(data))), *headers])
    return [data]


def application(environ: dict, start_response: StartResponse) -> List[bytes]:
    """The WSGI entry point."""
    q = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    path = environ.get("PATH_INFO", "/")
    c = cache()
    if path == "/item" and "k" in q:
        key = "item:" + q["k"]
        before = c.table.near_hits if NEAR else 0
        value = c.get_or_set(key, lambda: compute(q["k"]))
        hit = NEAR and c.table.near_hits > before
        return _reply(start_response, {"k": q["k"], "v": value, "pid": os.getpid()},
                      [("X-Near", "hit" if hit else "miss")])
    if path == "/set" and "k" in q and "v" in q:
        c.set("item:" + q["k"], q["v"])
        return _reply(start_response, {"ok": True})
    if path == "/status":
        st = c.table.near_stats() if NEAR else {}
        return _reply(start_response, {"pid": os.getpid(), "near": NEAR, **st})
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"not found\n"]
