"""gunicorn configuration of the shmreg example app (see README.md).

    gunicorn -c examples/gunicorn_app/gunicorn.conf.py

Environment (all optional):
  SHMREG_EXAMPLE_MODE       shmreg (default) or local (per-worker dicts, no shared tables)
  SHMREG_EXAMPLE_PREFIX     prefix of the table names (default "example-")
  SHMREG_EXAMPLE_TEMPORARY  1 (default): unlink the tables when gunicorn exits; 0: keep them
  SHMREG_EXAMPLE_BIND       default 127.0.0.1:8000
  SHMREG_EXAMPLE_WORKERS    default 4
"""

import os

from shmreg.gunicorn import *  # noqa: F401,F403  (on_starting, post_fork, child_exit, on_exit)
from shmreg.gunicorn import CacheSpec, TableSpec, configure

_here = os.path.dirname(os.path.abspath(__file__))
_prefix = os.environ.get("SHMREG_EXAMPLE_PREFIX", "example-")

bind = os.environ.get("SHMREG_EXAMPLE_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("SHMREG_EXAMPLE_WORKERS", "4"))
worker_class = "sync"
pythonpath = _here
wsgi_app = "app:application"

if os.environ.get("SHMREG_EXAMPLE_MODE", "shmreg") == "local":
    configure(tables={}, registry=None)          # the hooks do nothing
else:
    configure(
        tables={
            _prefix + "counters": TableSpec(capacity=4_096, memory=1 << 20),
            _prefix + "scoreboard": TableSpec(capacity=1_024, memory=1 << 20),
            _prefix + "cache": CacheSpec(ttl=300, capacity=16_384, memory=16 << 20),
        },
        registry=_prefix + "workers",
        temporary=os.environ.get("SHMREG_EXAMPLE_TEMPORARY", "1") == "1",
    )
