"""gunicorn with uvicorn workers for the shmreg asyncio example (see README.md).

    cd examples/asgi_app && gunicorn -c gunicorn.conf.py

Environment (all optional): SHMREG_ASGI_PREFIX (table names, default
"asgiexample-"), SHMREG_ASGI_BIND (default 127.0.0.1:8000),
SHMREG_ASGI_WORKERS (default 4), SHMREG_ASGI_TEMPORARY (1, default: unlink
the tables when gunicorn exits).
"""

import os

from shmreg.gunicorn import *  # noqa: F401,F403  (on_starting, post_fork, child_exit, on_exit)
from shmreg.gunicorn import CacheSpec, TableSpec, configure

_here = os.path.dirname(os.path.abspath(__file__))
_prefix = os.environ.get("SHMREG_ASGI_PREFIX", "asgiexample-")

bind = os.environ.get("SHMREG_ASGI_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("SHMREG_ASGI_WORKERS", "4"))
worker_class = "uvicorn_worker.UvicornWorker"     # pip install uvicorn-worker
pythonpath = _here
wsgi_app = "app:app"

configure(
    tables={
        _prefix + "cache": CacheSpec(ttl=300, capacity=16_384, memory=16 << 20),
        _prefix + "counters": TableSpec(capacity=1_024, memory=1 << 20),
    },
    registry=_prefix + "workers",
    temporary=os.environ.get("SHMREG_ASGI_TEMPORARY", "1") == "1",
)
