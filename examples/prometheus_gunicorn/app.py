"""A WSGI app instrumented with plain prometheus_client metrics.

Nothing here knows about shmreg except the scrape endpoint's registry:
``shmreg.prometheus.make_registry()`` where a prometheus_client
multiprocess app would build ``CollectorRegistry()`` +
``MultiProcessCollector(registry)``.

Routes:
  GET /work?i=I&v=V   counts the request, observes V seconds, sets every
                      mode's gauge to I; answers {"pid": ..., "i": I}
  GET /hold?s=S       counts the request, then sleeps S seconds in progress
  GET /metrics        the merged metrics of every worker, dead or alive
"""

import json
import os
import time
from urllib.parse import parse_qs

from prometheus_client import Counter, Gauge, Histogram, Info, make_wsgi_app

import shmreg.prometheus

MODES = ("all", "liveall", "min", "livemin", "max", "livemax", "sum", "livesum",
         "mostrecent", "livemostrecent")

REQUESTS = Counter("app_requests", "Requests served.", ["path"])
LATENCY = Histogram("app_latency_seconds", "Request latency.", buckets=(0.25, 0.5, 1, 2, 4))
IN_PROGRESS = Gauge("app_in_progress", "Requests in progress.", multiprocess_mode="livesum")
LAST = {m: Gauge(f"app_last_{m}", f"Last request index ({m}).", ["app"], multiprocess_mode=m)
        for m in MODES}

BUILD = Info("app_build", "Build of the app.")
BUILD.info({"version": "1.0", "worker_class": "sync"})

metrics_app = make_wsgi_app(shmreg.prometheus.make_registry())


def application(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    if path == "/metrics":
        return metrics_app(environ, start_response)
    if path not in ("/work", "/hold"):
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]
    # Counted before it is in progress: whoever sees it in progress (the
    # test, before it SIGKILLs the worker) knows it was counted.
    REQUESTS.labels(path).inc()
    with IN_PROGRESS.track_inprogress():
        q = parse_qs(environ.get("QUERY_STRING", ""))
        i = int(q.get("i", ["0"])[0])
        v = float(q.get("v", ["0"])[0])
        if path == "/hold":
            time.sleep(float(q.get("s", ["1"])[0]))
            start_response("200 OK", [("Content-Type", "application/json")])
            return [json.dumps({"pid": os.getpid()}).encode()]
        LATENCY.observe(v)
        for g in LAST.values():
            g.labels("example").set(i)
        body = json.dumps({"pid": os.getpid(), "i": i}).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]
