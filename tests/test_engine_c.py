"""The engine's own C tests, built with ``cc`` under ASan + UBSan.

Builds tests/engine/ once per session (tests/engine/build.py: every engine
header compiled on its own, the unit tests, and each fuzz target linked with
a plain main() that replays its seed corpus and regression inputs), then
runs them; any failing check, crash or sanitizer report fails the test.
The coverage-guided fuzzing itself (clang + libFuzzer) is
tests/engine/fuzz.sh; see docs/fuzzing.md.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ENGINE_TESTS = Path(__file__).resolve().parent / "engine"

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"),
    reason="the engine's C tests use Linux robust mutexes and thread ids",
)


def _load_build():
    spec = importlib.util.spec_from_file_location("engine_build", ENGINE_TESTS / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


build = _load_build()


@pytest.fixture(scope="module")
def binaries(tmp_path_factory):
    """Build everything once (about 10-20 s of compiling on two cores)."""
    if shutil.which("cc") is None:
        pytest.fail("a C compiler (cc) is needed to build the engine's C tests")
    return build.build(tmp_path_factory.mktemp("engine-tests"), cc="cc")


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


@pytest.mark.timeout(240)
def test_engine_unit_tests(binaries):
    proc = _run([str(binaries["unit"])], timeout=120)
    m = re.search(r"^(\d+) passed, (\d+) failed$", proc.stdout, re.M)
    assert m, proc.stdout
    assert int(m.group(1)) >= 25 and m.group(2) == "0"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("target", build.FUZZ_TARGETS)
def test_fuzz_corpus_replays_clean(binaries, target):
    dirs = build.corpus_dirs(target)
    proc = _run([str(binaries[f"replay_{target}"]), *map(str, dirs)], timeout=120)
    m = re.search(r"replayed (\d+) inputs", proc.stdout)
    assert m, proc.stdout
    # Every file of the seed corpus and of the regression directory ran.
    expected = sum(1 for d in dirs if d.is_dir() for f in d.iterdir() if not f.name.startswith("."))
    assert int(m.group(1)) == expected > 0
