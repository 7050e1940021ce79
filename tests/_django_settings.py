"""One Django configuration for every test module that uses Django (settings
can be configured once per process, whichever module is collected first)."""

from __future__ import annotations

import shmreg
from _helpers import unique_name

DEFAULT_TABLE = unique_name("dj-default")


def configure() -> str:
    """Configure Django (once) with the shmreg cache as ``default`` and
    cache-backed sessions; returns the default cache's table name."""
    import django
    from django.conf import settings

    if not settings.configured:
        settings.configure(
            CACHES={"default": {"BACKEND": "shmreg.django.ShmregCache", "LOCATION": DEFAULT_TABLE,
                                "OPTIONS": {"MAX_ENTRIES": 4096, "memory": 4 << 20}}},
            SESSION_ENGINE="django.contrib.sessions.backends.cache",
            SECRET_KEY="shmreg-tests",
            INSTALLED_APPS=[],
            USE_TZ=True,
        )
        django.setup()
    return DEFAULT_TABLE


def cleanup() -> None:
    for name in (DEFAULT_TABLE, DEFAULT_TABLE + "--flights"):
        try:
            shmreg.unlink(name)
        except shmreg.TableNotFoundError:
            pass
