#!/usr/bin/env python
"""Run cachelib's own backend test classes against ``shmreg.cachelib.ShmregCache``.

Nothing of cachelib's is copied into this repository: the script downloads
the cachelib source distribution matching the installed cachelib (``pip
download``), unpacks it in a temporary directory, adds one test module there
that runs cachelib's ``CommonTests``, ``ClearTests``, ``HasTests`` and
``DeleteManyWithPrefixTests`` (the classes its Redis backend runs) with this
backend as the ``cache_factory``, and runs them with pytest.

    python tests/cachelib_upstream/run_upstream_cachelib_tests.py [-v]

cachelib's ``conftest.py`` imports ``xprocess`` (pytest-xprocess) for its
Redis/memcached server fixtures, which are not used here; a stub module
stands in when it is not installed.  Not part of ``pytest tests/`` (it needs
the network for the sdist); tests/test_flask.py checks the same contract
in CI.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

TEST_MODULE = '''
"""shmreg.cachelib.ShmregCache under cachelib's own backend tests (generated)."""
import os

import pytest
from clear import ClearTests
from common import CommonTests
from delete_many_with_prefix import DeleteManyWithPrefixTests
from has import HasTests

import shmreg
from shmreg.cachelib import ShmregCache

NAME = "clsuite-%d" % os.getpid()


@pytest.fixture(autouse=True)
def cache_factory(request):
    def _factory(self, *args, **kwargs):
        cache = ShmregCache(NAME, *args, **kwargs)
        cache._table.clear()
        return cache

    request.cls.cache_factory = _factory
    yield
    for name in (NAME, NAME + "--flights"):
        try:
            shmreg.unlink(name)
        except shmreg.TableNotFoundError:
            pass


class TestShmregCache(CommonTests, ClearTests, HasTests, DeleteManyWithPrefixTests):
    pass
'''

XPROCESS_STUB = '''
"""Stand-in for pytest-xprocess: cachelib's conftest imports it for server
fixtures that the shmreg run does not use."""
class ProcessStarter:
    pass
'''


def fetch_sdist(version: str, where: str) -> str:
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                    "--no-binary", ":all:", f"cachelib=={version}", "-d", where], check=True)
    (archive,) = [f for f in os.listdir(where) if f.endswith(".tar.gz")]
    with tarfile.open(os.path.join(where, archive)) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(where, filter="data")
        else:
            tar.extractall(where)
    return os.path.join(where, f"cachelib-{version}", "tests")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--sdist-dir", help="use this unpacked cachelib-X.Y.Z/tests directory")
    args = parser.parse_args()

    from importlib.metadata import version

    tmp = tempfile.mkdtemp(prefix="shmreg-clsuite-")
    try:
        tests_dir = args.sdist_dir or fetch_sdist(version("cachelib"), tmp)
        with open(os.path.join(tests_dir, "test_shmreg_cache.py"), "w") as f:
            f.write(TEST_MODULE)
        env = dict(os.environ)
        try:
            import xprocess  # noqa: F401
        except ImportError:
            stub = os.path.join(tmp, "stub")
            os.makedirs(stub, exist_ok=True)
            with open(os.path.join(stub, "xprocess.py"), "w") as f:
                f.write(XPROCESS_STUB)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [stub, env.get("PYTHONPATH")]))
        # -c /dev/null: cachelib's own pytest settings (its markers) are not needed.
        cmd = [sys.executable, "-m", "pytest", "-c", os.devnull, "--rootdir", tests_dir,
               "-p", "no:cacheprovider", "-q" if not args.verbose else "-v",
               "test_shmreg_cache.py"]
        return subprocess.run(cmd, cwd=tests_dir, env=env).returncode
    finally:
        if not args.sdist_dir:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
