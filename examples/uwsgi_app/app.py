"""A WSGI app whose uWSGI workers share a cache, exact counters and a worker
registry through shmreg (see README.md next to this file).

    uwsgi --ini examples/uwsgi_app/uwsgi.ini

Routes: ``/`` counts the request and answers with this worker's pid;
``/status`` lists the live workers and the host-wide counters and cache
hits/misses.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable

import shmreg.uwsgi
from shmreg.uwsgi import CacheSpec, TableSpec

PREFIX = os.environ.get("SHMREG_EXAMPLE_PREFIX", "uwsgi-example-")
COUNTERS, PAGES = PREFIX + "counters", PREFIX + "pages"

shmreg.uwsgi.setup(
    tables={COUNTERS: TableSpec(capacity=4_096, memory=1 << 20),
            PAGES: CacheSpec(ttl=300, capacity=16_384, memory=16 << 20)},
    registry=PREFIX + "workers",
)

StartResponse = Callable[[str, "list[tuple[str, str]]"], object]


def _json(start_response: StartResponse, body: object) -> Iterable[bytes]:
    data = json.dumps(body).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]


def render_home() -> str:
    return "<h1>hello from every worker</h1>"


def application(environ: "dict[str, Any]", start_response: StartResponse) -> Iterable[bytes]:
    counters = shmreg.uwsgi.table(COUNTERS)
    counters.update_counter("requests")
    if environ.get("PATH_INFO") == "/status":
        stats = shmreg.uwsgi.cache(PAGES).stats()
        workers = sorted(reg.pid for _, reg in shmreg.uwsgi.registry().items())
        return _json(start_response, {"workers": workers, "counters": dict(counters.items()),
                                      "cache_hits_host": stats["host_hits"],
                                      "cache_misses_host": stats["host_misses"]})
    page = shmreg.uwsgi.cache(PAGES).get_or_set("home", render_home)
    return _json(start_response, {"pid": os.getpid(), "page": page})
