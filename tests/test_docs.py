"""The documentation is executable and current.

* Every ``docs/*.md`` with ``>>>`` examples (the tutorial, the guarantees'
  crash demo, the Redis mapping in the migration guide) runs as a doctest
  with zero failures, in a private segment directory, and leaves no table
  behind.
* ``docs/api.md`` is exactly what ``docs/gen_api.py`` generates from the
  docstrings now (whitespace aside): a changed docstring fails here until
  the file is regenerated.
"""

from __future__ import annotations

import difflib
import doctest
import importlib.util
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

import shmreg

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
API_MD = DOCS / "api.md"
GEN_API = DOCS / "gen_api.py"
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _doctest_files() -> list:
    # api.md is excluded: its examples are docstring excerpts that assume a
    # context (an open table ``t`` ...); they document, the tutorial runs.
    parser = doctest.DocTestParser()
    return sorted(p.name for p in DOCS.glob("*.md")
                  if p.name != API_MD.name and parser.get_examples(p.read_text(encoding="utf-8")))


def _normalize(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture
def private_segment_dir(monkeypatch):
    """Run the examples against a segment directory of their own (on tmpfs
    when there is one), so fixed names like ``tutorial-basics`` cannot
    collide with a concurrent run; children inherit it through the
    environment."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    d = tempfile.mkdtemp(prefix="shmreg-docs-", dir=base)
    monkeypatch.setenv("SHMREG_DIR", d)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_docs_with_examples_are_found():
    names = _doctest_files()
    assert {"tutorial.md", "guarantees.md", "migration.md"} <= set(names), names


# Run in a child interpreter, so the examples' owned entries, watcher
# threads and mappings stay out of the pytest process.  Every warning is an
# error there too; one raised where it cannot propagate (a ResourceWarning
# from an unclosed pipe in a destructor) shows on stderr, which must stay
# empty.
_RUNNER = """
import doctest, sys, warnings
warnings.simplefilter("error")
path, name = sys.argv[1], sys.argv[2]
with open(path, encoding="utf-8") as f:
    text = f.read()
test = doctest.DocTestParser().get_doctest(text, {"__name__": "docs_" + name}, name, path, 0)
runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
failed, attempted = runner.run(test, out=sys.stdout.write, clear_globs=True)
print(f"RESULT failed={failed} attempted={attempted} examples={len(test.examples)}")
"""


@pytest.mark.parametrize("name", _doctest_files())
def test_doc_examples_run(name, private_segment_dir):
    path = DOCS / name
    proc = subprocess.run([sys.executable, "-c", _RUNNER, str(path), path.stem],
                          capture_output=True, text=True, timeout=240)
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report
    last = proc.stdout.strip().splitlines()[-1]
    fields = dict(kv.split("=") for kv in last.split()[1:])
    assert int(fields["examples"]) > 0, f"{name}: no examples parsed"
    assert fields["attempted"] == fields["examples"], report
    assert fields["failed"] == "0", f"{name}: examples failed\n{report}"
    assert proc.stderr == "", f"{name}: the examples wrote to stderr\n{proc.stderr}"

    left = [t for t in shmreg.list_tables() if t.startswith("tutorial-")]
    assert left == [], f"{name} left tables behind: {left}"
    # Nothing else either (no other names, no half-created segments).
    assert os.listdir(private_segment_dir) == [], os.listdir(private_segment_dir)


@pytest.fixture(scope="module")
def generated_api() -> str:
    proc = subprocess.run([sys.executable, str(GEN_API), "--stdout"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_api_md_is_up_to_date(generated_api):
    current = API_MD.read_text(encoding="utf-8") if API_MD.exists() else ""
    if _normalize(current) != _normalize(generated_api):
        diff = "".join(list(difflib.unified_diff(
            current.splitlines(True), generated_api.splitlines(True),
            "docs/api.md", "python docs/gen_api.py --stdout"))[:80])
        pytest.fail("docs/api.md is out of date: run `python docs/gen_api.py`\n" + diff)


def test_api_md_covers_the_public_api(generated_api):
    for name in shmreg.__all__:
        assert f"`shmreg.{name}" in generated_api or f"| `{name}` |" in generated_api, name
    for cls in (shmreg.Table, shmreg.Registry, shmreg.Watcher, shmreg.Cache):
        inherited = {n for base in cls.__mro__ if not base.__module__.startswith("shmreg")
                     for n in vars(base)}
        for attr in dir(cls):
            if attr.startswith("_") or attr in inherited:
                continue  # (MutableMapping's methods are listed in one line)
            assert f"`{cls.__name__}.{attr}" in generated_api, f"{cls.__name__}.{attr} undocumented"
    assert "## Command line `shmreg`" in generated_api
    leaked = re.findall(r"0x[0-9a-fA-F]{6,}", generated_api)
    assert not leaked, f"memory addresses leaked into api.md (not deterministic): {leaked}"


def _load_generator():
    spec = importlib.util.spec_from_file_location("_shmreg_gen_api", GEN_API)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_changed_docstring_makes_api_md_stale(monkeypatch):
    gen = _load_generator()
    before = gen.generate()
    assert _normalize(before) == _normalize(API_MD.read_text(encoding="utf-8"))
    monkeypatch.setattr(shmreg.Table.stats, "__doc__", "A docstring the file has never seen.")
    after = gen.generate()
    assert "A docstring the file has never seen." in after
    assert _normalize(after) != _normalize(API_MD.read_text(encoding="utf-8"))


def test_docstring_conversion():
    gen = _load_generator()
    md = gen.doc_to_markdown(
        "Do ``x``, see :meth:`~shmreg.Table.get`.\n\n"
        ":param key: the key,\n    continued.\n"
        ":raises KeyError: absent.\n\n"
        ">>> 1 + 1\n2\n\n"
        "Config::\n\n    a = 1\n")
    assert "Do `x`, see `get()`." in md
    assert "- `key`: the key, continued." in md
    assert "- Raises `KeyError`: absent." in md
    assert "```pycon\n>>> 1 + 1\n2\n```" in md
    assert "Config:\n\n```python\na = 1\n```" in md
    sig, rest = gen.split_embedded("CoreTable.get(self, key, default=None)\n\nReturn it.", "get")
    assert (sig, rest) == ("(key, default=None)", "Return it.")
