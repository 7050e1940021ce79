"""The typed examples pass ``mypy --strict`` against shmreg's annotations
(py.typed + _core.pyi): what a user's type checker sees.  Errors inside
shmreg itself are not this test's concern (``--follow-imports=silent``)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("mypy", reason="mypy is not installed (pip install -e '.[test]')")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Examples written to pass mypy --strict; add new typed examples here.
TYPED_EXAMPLES = [
    "examples/gunicorn_app/app.py",
    "examples/pool_jobs.py",
    "examples/uwsgi_app/app.py",
    "examples/uvicorn_app/app.py",
]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("example", TYPED_EXAMPLES)
def test_example_passes_mypy_strict(example, tmp_path):
    # One file per run: several examples are called app.py.
    r = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent",
                        "--cache-dir", str(tmp_path / "mypy-cache"), example],
                       cwd=ROOT, capture_output=True, text=True, timeout=170)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("Success: no issues found in 1 source file"), r.stdout
