#!/usr/bin/env python
"""Run Django's own cache test-suite against ``shmreg.django.ShmregCache``.

Nothing of Django's is copied into this repository: the script downloads the
Django source distribution matching the installed Django (``pip download``),
unpacks it in a temporary directory, adds one test module there that runs
Django's ``BaseCacheTests`` (and the cache middleware / ``cache_page`` /
i18n / ``django.utils.cache`` test classes) with ``CACHES`` pointing at this
backend, and runs them through Django's own ``runtests.py``.

    python tests/django_upstream/run_upstream_cache_tests.py [-v 2] [--keep]

Exclusions, as Django makes them for its Redis and memcached backends: the
``cull``/``zero_cull`` caches (Django's ``CULL_FREQUENCY`` culling; shmreg
evicts by CLOCK instead).  The tests that read LocMemCache internals
(``_expire_info``, ``_cache``) are not run: LocMemCacheTests is not a
parent here.  Exit status: Django's test runner's.

Not part of ``pytest`` (it needs the network to fetch the sdist and takes
~1-2 minutes; Django's suite has ~10 s of sleeps).  tests/test_django.py
checks the same contract with our own tests in CI.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile

TEST_MODULE = '''
"""shmreg.django.ShmregCache under Django's own cache tests (generated)."""
import os

from django.test import SimpleTestCase, TestCase, override_settings

from cache import tests as upstream

NAME = "djsuite-%d" % os.getpid()
SHMREG = "shmreg.django.ShmregCache"


@override_settings(CACHES=upstream.caches_setting_for_tests(
    BACKEND=SHMREG, LOCATION=NAME, exclude=upstream.redis_excluded_caches))
class ShmregCacheTests(upstream.BaseCacheTests, TestCase):
    available_apps = ["cache"]

    def test_incr_decr_timeout(self):
        # LocMemCacheTests' check, without LocMem internals: incr/decr keep
        # the expiry.
        from django.core.cache import cache
        cache.set("value", 1, timeout=cache.default_timeout * 10)
        key = cache.make_key("value")
        before = cache._table.ttl(key)
        self.assertEqual(cache.incr("value"), 2)
        self.assertEqual(cache.decr("value"), 1)
        after = cache._table.ttl(key)
        self.assertLessEqual(after, before)
        self.assertGreater(after, before - 5)


_both = {
    "default": {"BACKEND": SHMREG, "LOCATION": NAME + "-d"},
    "other": {"BACKEND": SHMREG, "LOCATION": NAME + "-o", "TIMEOUT": "1"},
}


@override_settings(CACHES={"default": {"BACKEND": SHMREG, "LOCATION": NAME + "-u"}})
class ShmregCacheUtils(upstream.CacheUtils):
    pass


@override_settings(CACHES={"default": {"BACKEND": SHMREG, "LOCATION": NAME + "-u"}})
class ShmregPrefixedCacheUtils(upstream.PrefixedCacheUtils):
    pass


@override_settings(CACHES={"default": {"BACKEND": SHMREG, "LOCATION": NAME + "-h"}})
class ShmregCacheHEADTest(upstream.CacheHEADTest):
    pass


@override_settings(CACHES={"default": {"BACKEND": SHMREG, "LOCATION": NAME + "-i"}})
class ShmregCacheI18nTest(upstream.CacheI18nTest):
    pass


@override_settings(CACHES={"default": {"BACKEND": SHMREG, "LOCATION": NAME + "-i"}})
class ShmregPrefixedCacheI18nTest(upstream.PrefixedCacheI18nTest):
    pass


@override_settings(CACHES=_both)
class ShmregCacheMiddlewareTest(upstream.CacheMiddlewareTest):
    pass


@override_settings(CACHES={"default": {"BACKEND": SHMREG, "LOCATION": NAME + "-t"}})
class ShmregTestWithTemplateResponse(upstream.TestWithTemplateResponse):
    pass


def tearDownModule():
    import shmreg
    for name in shmreg.list_tables():
        if name.startswith(NAME):
            shmreg.unlink(name)
'''


def fetch_sdist(version: str, where: str) -> str:
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                    "--no-binary", ":all:", f"django=={version}", "-d", where], check=True)
    (archive,) = [f for f in os.listdir(where) if f.endswith(".tar.gz")]
    with tarfile.open(os.path.join(where, archive)) as tar:
        tar.extractall(where, filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(where)
    return os.path.join(where, f"django-{version}", "tests")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbosity", default="1")
    parser.add_argument("--keep", action="store_true", help="keep the unpacked sdist")
    parser.add_argument("--sdist-dir", help="use this unpacked django-X.Y.Z/tests directory")
    args = parser.parse_args()

    import django

    tmp = tempfile.mkdtemp(prefix="shmreg-djsuite-")
    tests_dir = args.sdist_dir or fetch_sdist(django.__version__, tmp)
    pkg = os.path.join(tests_dir, "shmreg_cache")
    os.makedirs(pkg, exist_ok=True)
    open(os.path.join(pkg, "__init__.py"), "w").close()
    with open(os.path.join(pkg, "tests.py"), "w") as f:
        f.write(TEST_MODULE)
    try:
        return subprocess.run([sys.executable, "runtests.py", "--parallel", "1",
                               "-v", args.verbosity, "shmreg_cache", "cache.tests.DummyCacheTests"],
                              cwd=tests_dir).returncode
    finally:
        if not args.keep and not args.sdist_dir:
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
