"""gunicorn configuration of the near-cache example (see app.py).

    SHMREG_EXAMPLE_URL=redis://127.0.0.1:6379/0 gunicorn -c examples/near_cache_app/gunicorn.conf.py

Environment: SHMREG_EXAMPLE_URL (required), SHMREG_EXAMPLE_NEAR (1/0),
SHMREG_EXAMPLE_BIND (default 127.0.0.1:8000), SHMREG_EXAMPLE_WORKERS (default 4).
"""

import os

pythonpath = os.path.dirname(os.path.abspath(__file__))
wsgi_app = "app:application"
bind = os.environ.get("SHMREG_EXAMPLE_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("SHMREG_EXAMPLE_WORKERS", "4"))
worker_class = "sync"
