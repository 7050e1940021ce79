"""gunicorn configuration of the shmreg Flask example (see README.md).

    cd examples/flask_app && gunicorn -c gunicorn.conf.py

Environment (all optional): SHMREG_FLASK_PREFIX (table names, default
"flaskexample-"), SHMREG_FLASK_BIND (default 127.0.0.1:8000),
SHMREG_FLASK_WORKERS (default 4), SHMREG_FLASK_TEMPORARY (1, default: unlink
the tables when gunicorn exits).
"""

import os

from shmreg.gunicorn import *  # noqa: F401,F403  (on_starting, post_fork, child_exit, on_exit)
from shmreg.gunicorn import CacheSpec, TableSpec, configure

_here = os.path.dirname(os.path.abspath(__file__))
_prefix = os.environ.get("SHMREG_FLASK_PREFIX", "flaskexample-")

bind = os.environ.get("SHMREG_FLASK_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("SHMREG_FLASK_WORKERS", "4"))
worker_class = "sync"
pythonpath = _here
wsgi_app = "app:app"

configure(
    tables={
        # The geometry of CACHE_OPTIONS in app.py: created once, before any worker.
        _prefix + "cache": CacheSpec(ttl=300, capacity=16_384, memory=16 << 20),
        _prefix + "counters": TableSpec(capacity=1_024, memory=1 << 20),
    },
    registry=_prefix + "workers",
    temporary=os.environ.get("SHMREG_FLASK_TEMPORARY", "1") == "1",
)
