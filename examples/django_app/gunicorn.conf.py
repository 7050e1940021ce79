"""gunicorn configuration of the shmreg Django example (see README.md).

    cd examples/django_app && gunicorn -c gunicorn.conf.py

Environment (all optional): SHMREG_DJANGO_PREFIX (table names, default
"djexample-"), SHMREG_DJANGO_CACHE (shmreg | locmem), SHMREG_DJANGO_BIND
(default 127.0.0.1:8000), SHMREG_DJANGO_WORKERS (default 4),
SHMREG_DJANGO_TEMPORARY (1, default: unlink the tables when gunicorn exits).
"""

import os

from shmreg.gunicorn import *  # noqa: F401,F403  (on_starting, post_fork, child_exit, on_exit)
from shmreg.gunicorn import CacheSpec, TableSpec, configure

_here = os.path.dirname(os.path.abspath(__file__))
_prefix = os.environ.get("SHMREG_DJANGO_PREFIX", "djexample-")

bind = os.environ.get("SHMREG_DJANGO_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("SHMREG_DJANGO_WORKERS", "4"))
worker_class = "sync"
pythonpath = _here
wsgi_app = "djapp.wsgi:application"
raw_env = ["DJANGO_SETTINGS_MODULE=djapp.settings"]

tables = {_prefix + "counters": TableSpec(capacity=1_024, memory=1 << 20)}
if os.environ.get("SHMREG_DJANGO_CACHE", "shmreg") != "locmem":
    # The same geometry as CACHES["default"]["OPTIONS"] in djapp/settings.py:
    # created once by the arbiter, before any worker starts.
    tables[_prefix + "cache"] = CacheSpec(ttl=300, capacity=16_384, memory=16 << 20)

configure(
    tables=tables,
    registry=_prefix + "workers",
    temporary=os.environ.get("SHMREG_DJANGO_TEMPORARY", "1") == "1",
)
