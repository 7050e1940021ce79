"""gunicorn configuration: prometheus_client metrics of every worker in one
shmreg table (see README.md).

    gunicorn -c examples/prometheus_gunicorn/gunicorn.conf.py

Environment (all optional):
  PROM_EXAMPLE_TABLE         the metrics table (default "example-metrics")
  PROM_EXAMPLE_BIND          default 127.0.0.1:8000
  PROM_EXAMPLE_WORKERS       default 4
  PROM_EXAMPLE_MAX_REQUESTS  default 0 (never recycle workers)
  PROM_EXAMPLE_TEMPORARY     1 (default): unlink the table when gunicorn exits
"""

import os

import shmreg.prometheus
from shmreg.gunicorn import *  # noqa: F401,F403  (on_starting, post_fork, child_exit, on_exit)
from shmreg.gunicorn import TableSpec, configure

# Optional: shmreg.gunicorn's child_exit, then fold the dead worker's
# min/max/mostrecent gauges at once instead of at the next scrape.
from shmreg.prometheus import child_exit  # noqa: F401,E402

_here = os.path.dirname(os.path.abspath(__file__))
TABLE = os.environ.get("PROM_EXAMPLE_TABLE", "example-metrics")

bind = os.environ.get("PROM_EXAMPLE_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("PROM_EXAMPLE_WORKERS", "4"))
max_requests = int(os.environ.get("PROM_EXAMPLE_MAX_REQUESTS", "0"))
worker_class = "sync"
pythonpath = _here
wsgi_app = "app:application"

# The table: created by the arbiter before any worker, reaped when a worker
# exits, unlinked when gunicorn exits (temporary).
configure(tables={TABLE: TableSpec(capacity=20_000, memory=8 << 20)}, registry=None,
          temporary=os.environ.get("PROM_EXAMPLE_TEMPORARY", "1") == "1")

# The switch: every metric the workers create keeps its values in TABLE.
# (This file runs in the arbiter before it forks the workers.)
shmreg.prometheus.enable(table=TABLE, capacity=20_000, memory=8 << 20)
