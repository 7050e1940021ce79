"""Settings of the shmreg Django example: one cache and the sessions shared by
every gunicorn worker (see ../README.md).

Environment (all optional):
  SHMREG_DJANGO_PREFIX  prefix of the table names (default "djexample-")
  SHMREG_DJANGO_CACHE   shmreg (default) or locmem (Django's per-process cache, for comparison)
"""

import os

PREFIX = os.environ.get("SHMREG_DJANGO_PREFIX", "djexample-")
CACHE_KIND = os.environ.get("SHMREG_DJANGO_CACHE", "shmreg")

SECRET_KEY = "shmreg-example-not-a-secret"   # an example: never reuse in production
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]"]
ROOT_URLCONF = "djapp.views"
WSGI_APPLICATION = "djapp.wsgi.application"
INSTALLED_APPS: list = []
DATABASES: dict = {}          # no database: sessions live in the cache
USE_TZ = True

MIDDLEWARE = [
    "djapp.views.served_by",          # X-Served-By: the worker's pid, even on cached pages
    "django.contrib.sessions.middleware.SessionMiddleware",
]

if CACHE_KIND == "locmem":
    # The same entry limit as the shmreg table (Django's default is 300).
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache",
                          "OPTIONS": {"MAX_ENTRIES": 16_384}}}
else:
    CACHES = {
        "default": {
            "BACKEND": "shmreg.django.ShmregCache",
            "LOCATION": PREFIX + "cache",    # the table; gunicorn.conf.py creates it at start
            "TIMEOUT": 300,
            "OPTIONS": {"MAX_ENTRIES": 16_384, "memory": 16 << 20},
        }
    }

# Sessions in the cache: every worker reads the session another one wrote.
SESSION_ENGINE = "django.contrib.sessions.backends.cache"

# Counts how often each view body really ran (a plain shmreg table).
COUNTERS_TABLE = PREFIX + "counters"
