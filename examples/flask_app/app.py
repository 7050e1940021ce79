"""A Flask app whose gunicorn workers share one Flask-Caching cache through shmreg.

  GET /               this worker's pid
  GET /page           a view cached 60 s with @cache.cached
  GET /square/<n>     a function memoized with @cache.memoize
  GET /hits           a counter every worker increments (cache.inc, atomic)
  GET /stats          how often each view body really ran (shared counters)

Every response carries ``X-Served-By: <pid>`` (a cached body carries the pid
of the worker that rendered it).

Environment: SHMREG_FLASK_PREFIX (table names, default "flaskexample-").
"""

from __future__ import annotations

import os
import time

from flask import Flask, jsonify
from flask_caching import Cache

import shmreg

PREFIX = os.environ.get("SHMREG_FLASK_PREFIX", "flaskexample-")

app = Flask(__name__)
app.config.update(
    CACHE_TYPE="shmreg.cachelib.ShmregCache",
    CACHE_DEFAULT_TIMEOUT=300,
    CACHE_OPTIONS={"name": PREFIX + "cache", "key_prefix": "flask:",
                   "capacity": 16_384, "memory": 16 << 20},
)
cache = Cache(app)

_counters: shmreg.Table | None = None


def counters() -> shmreg.Table:
    """Shared counts of view-body runs (created by the gunicorn hooks, or
    here when the app runs without them)."""
    global _counters
    if _counters is None:
        _counters = shmreg.Table(PREFIX + "counters", capacity=1_024, memory=1 << 20)
    return _counters


@app.after_request
def served_by(response):
    response.headers["X-Served-By"] = str(os.getpid())
    return response


@app.route("/")
def index():
    return jsonify(pid=os.getpid())


@app.route("/page")
@cache.cached(timeout=60)
def page():
    return jsonify(pid=os.getpid(), rendered=counters().update_counter("page"))


@cache.memoize(timeout=60)
def square(n: int) -> int:
    counters().update_counter("square")
    time.sleep(0.05)
    return n * n


@app.route("/square/<int:n>")
def square_view(n: int):
    return jsonify(pid=os.getpid(), n=n, square=square(n))


@app.route("/hits")
def hits():
    return jsonify(pid=os.getpid(), hits=cache.cache.inc("hits"))


@app.route("/stats")
def stats():
    return jsonify({str(k): v for k, v in counters().items()})
