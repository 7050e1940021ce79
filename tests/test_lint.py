"""``shmreg lint``: the rules on their fixtures, suppression, configuration,
the command line (exit codes, JSON schema) and the flake8 plugin, each run
as a real subprocess where a user would run it."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

from shmreg.lint import RULES, lint_paths, lint_source
from shmreg.lint.config import ConfigError, _mini_section, load_config, resolve_codes

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = pathlib.Path(__file__).resolve().parent / "lint_fixtures"
ALL = set(RULES)
EXPECT = re.compile(r"#\s*expect:\s*(?P<codes>SHM\d+(?:\s*,\s*SHM\d+)*)")

pytestmark = pytest.mark.timeout(120)


def expected(path: pathlib.Path) -> set:
    out = set()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        m = EXPECT.search(line)
        if m:
            out |= {(n, c.strip()) for c in m.group("codes").split(",")}
    return out


def found(path: pathlib.Path) -> set:
    return {(f.line, f.code) for f in lint_source(path.read_text(), str(path), codes=ALL)}


def shmreg_lint(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shmreg", "lint", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


# -- the rules -------------------------------------------------------------------


FIXTURE_FILES = sorted(p.name for p in FIXTURES.glob("*.py"))


@pytest.mark.parametrize("name", FIXTURE_FILES)
def test_fixture_findings_are_exactly_the_expected_ones(name):
    path = FIXTURES / name
    exp = expected(path)
    got = found(path)
    missing, extra = sorted(exp - got), sorted(got - exp)
    assert not missing and not extra, f"{name}: missing {missing}, unexpected {extra}"


def test_every_rule_has_a_fixture_with_flagged_and_unflagged_cases():
    for code in RULES:
        files = [p for p in FIXTURES.glob(f"{code.lower()}_*.py")]
        assert len(files) == 1, f"{code}: one fixture expected, found {files}"
        text = files[0].read_text()
        flagged = {n for n, c in expected(files[0]) if c == code}
        assert flagged, f"{code}: no flagged case"
        # Unflagged cases: more function bodies than flagged lines.
        assert text.count("def ") + text.count("lambda") > 1, code


def test_messages_say_why_and_what_to_use():
    for path in FIXTURES.glob("shm*.py"):
        for f in lint_source(path.read_text(), str(path), codes=ALL):
            rule = RULES[f.code]
            assert rule.why in f.message, f
            assert "; use " in f.message and "shmreg" in f.message.split("; use ")[1], f
            assert f.symbol and f.symbol.split(".")[-1] in f.message, f


def test_replacement_hint_follows_the_container():
    src = textwrap.dedent("""
        from collections import Counter
        hits = Counter()
        seen_ids = set()
        feature_flags = {}
        def f(x):
            hits[x] += 1
            seen_ids.add(x)
            feature_flags[x] = True
    """)
    msgs = {f.symbol: f.message for f in lint_source(src)}
    assert "shmreg.recipes.Counters" in msgs["hits"]
    assert "shmreg.recipes.Deduper" in msgs["seen_ids"]
    assert "shmreg.recipes.Flags" in msgs["feature_flags"]


def test_default_rules_are_the_ones_marked_default():
    src = (FIXTURES / "shm103_functools_cache.py").read_text()
    assert lint_source(src) == []                      # SHM103 is off by default
    assert lint_source(src, codes={"SHM103"})          # and runs when selected
    defaults = {c for c, r in RULES.items() if r.default}
    assert resolve_codes(load_config(None)) == defaults


def test_decorator_wrappers_run_at_call_time_registries_at_import():
    src = textwrap.dedent("""
        import functools
        CALLS = {}
        REGISTRY = {}
        def counted(f):
            REGISTRY[f.__name__] = f
            @functools.wraps(f)
            def wrapper(*a):
                CALLS[f.__name__] = CALLS.get(f.__name__, 0) + 1
                return f(*a)
            return wrapper
        def load_plugins():
            REGISTRY["x"] = 1
        load_plugins()
        @counted
        def view():
            pass
    """)
    assert [(f.line, f.symbol) for f in lint_source(src)] == [(9, "CALLS")]


def test_syntax_error_is_an_error_not_a_crash(tmp_path):
    (tmp_path / "bad.py").write_text("def f(:\n")
    (tmp_path / "good.py").write_text("x = {}\ndef f():\n    x[1] = 2\n")
    result = lint_paths([str(tmp_path)], use_config=False)
    assert [os.path.basename(p) for p, _ in result.errors] == ["bad.py"]
    assert [f.code for f in result.findings] == ["SHM101"]


# -- noqa --------------------------------------------------------------------------


def test_noqa_suppresses_named_codes_and_bare_noqa_everything():
    path = FIXTURES / "noqa_cases.py"
    assert found(path) == expected(path)
    src = path.read_text()
    assert len(lint_source(src, codes=ALL, noqa=False)) == 5


# -- test files, exclusion and configuration -----------------------------------------


def _project(tmp_path: pathlib.Path, config: str = "") -> pathlib.Path:
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n" + config)
    pkg = tmp_path / "app"
    (pkg / "sub").mkdir(parents=True)
    (tmp_path / "tests").mkdir()
    (pkg / "views.py").write_text("hits = {}\ndef f(k):\n    hits[k] = 1\n")
    (pkg / "sub" / "ids.py").write_text("import itertools\nc = itertools.count()\n"
                                        "def f():\n    return next(c)\n")
    (pkg / "cached.py").write_text("import functools\n@functools.cache\ndef f():\n    return 1\n")
    (tmp_path / "tests" / "test_views.py").write_text("seen = set()\ndef test_x():\n    seen.add(1)\n")
    (pkg / "test_inline.py").write_text("seen = set()\ndef test_y():\n    seen.add(1)\n")
    return tmp_path


def _codes(result) -> list:
    return sorted((os.path.relpath(f.path).replace(os.sep, "/"), f.code) for f in result.findings)


def test_test_files_are_skipped_unless_included(tmp_path, monkeypatch):
    root = _project(tmp_path)
    monkeypatch.chdir(root)
    assert _codes(lint_paths(["."])) == [("app/sub/ids.py", "SHM106"), ("app/views.py", "SHM101")]
    with_tests = _codes(lint_paths(["."], include_tests=True))
    assert ("tests/test_views.py", "SHM101") in with_tests
    assert ("app/test_inline.py", "SHM101") in with_tests
    # Named explicitly (as pre-commit does), a test file is still skipped.
    assert lint_paths(["tests/test_views.py"]).files == 0


def test_config_select_ignore_exclude_found_walking_up(tmp_path, monkeypatch):
    root = _project(tmp_path, textwrap.dedent("""
        [tool.shmreg.lint]
        select = ["SHM1"]          # every rule
        ignore = ["SHM106"]
        exclude = ["app/views.py"]
    """))
    monkeypatch.chdir(root / "app" / "sub")
    # Linting a subdirectory finds the pyproject.toml two levels up.
    assert lint_paths(["."]).findings == []                   # SHM106 ignored
    monkeypatch.chdir(root)
    assert _codes(lint_paths(["app"])) == [("app/cached.py", "SHM103")]
    # The command line's --select replaces the config's, --ignore adds to it.
    assert _codes(lint_paths(["app"], select=["SHM106"])) == []
    assert _codes(lint_paths(["app"], select=["SHM103"], ignore=["SHM103"])) == []
    assert _codes(lint_paths(["app"], use_config=False)) == [("app/sub/ids.py", "SHM106"),
                                                             ("app/views.py", "SHM101")]


def test_config_errors(tmp_path):
    bad = tmp_path / "pyproject.toml"
    bad.write_text("[tool.shmreg.lint]\nselect = ['SHM999']\n")
    with pytest.raises(ConfigError, match="SHM999"):
        load_config(str(bad))
    bad.write_text("[tool.shmreg.lint]\nselct = ['SHM1']\n")
    with pytest.raises(ConfigError, match="selct"):
        load_config(str(bad))
    bad.write_text("[tool.shmreg.lint]\ninclude-tests = 'yes'\n")
    with pytest.raises(ConfigError, match="include-tests"):
        load_config(str(bad))
    bad.write_text("[tool.shmreg.lint\n")
    with pytest.raises(ConfigError, match="TOML"):
        load_config(str(bad))


def test_minimal_toml_reader_matches_tomllib():
    """The reader used on Python 3.9/3.10 without tomli gives what tomllib gives."""
    text = textwrap.dedent("""
        [project]
        name = "x"   # select = ["nope"]

        [tool.shmreg.lint]
        select = [
            "SHM101",  # containers
            'SHM105',
        ]
        ignore = ["SHM106"]
        exclude = ["build/*", "a#b.py"]
        include-tests = true

        [tool.other]
        select = ["E"]
    """)
    mini = _mini_section(text)
    assert mini == {"select": ["SHM101", "SHM105"], "ignore": ["SHM106"],
                    "exclude": ["build/*", "a#b.py"], "include-tests": True}
    try:
        import tomllib
    except ImportError:  # pragma: no cover - Python < 3.11
        return
    assert tomllib.loads(text)["tool"]["shmreg"]["lint"] == mini


# -- the command line ------------------------------------------------------------------


def test_cli_exit_codes(tmp_path):
    clean = tmp_path / "clean.py"
    clean.write_text("X = {}\ndef f():\n    return X.get(1)\n")
    dirty = tmp_path / "dirty.py"
    dirty.write_text("X = {}\ndef f():\n    X[1] = 2\n")
    r = shmreg_lint(str(clean), "--no-config")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 findings in 1 file" in r.stdout
    r = shmreg_lint(str(dirty), "--no-config")
    assert r.returncode == 1
    assert f"{dirty}:3:5: SHM101 module-level dict `X` mutated" in r.stdout
    r = shmreg_lint(str(dirty), "--no-config", "--ignore", "SHM101")
    assert r.returncode == 0
    for bad in (["--select", "SHM999"], [str(tmp_path / "missing.py")], ["--bogus"],
                ["--config", str(tmp_path / "nope.toml")]):
        r = shmreg_lint(str(dirty), "--no-config", *bad) if bad[0] != "--config" \
            else shmreg_lint(str(dirty), *bad)
        assert r.returncode == 2, (bad, r.stdout, r.stderr)
        assert r.stderr.strip(), bad
    (tmp_path / "broken.py").write_text("def f(:\n")
    r = shmreg_lint(str(tmp_path / "broken.py"), "--no-config")
    assert r.returncode == 1 and "cannot parse" in r.stdout


def test_cli_json_schema(tmp_path):
    (tmp_path / "a.py").write_text("import itertools\nseen = set()\nids = itertools.count()\n"
                                   "def f(x):\n    seen.add(x)\n    return next(ids)\n")
    (tmp_path / "b.py").write_text("def f(:\n")
    r = shmreg_lint(str(tmp_path), "--no-config", "--json")
    assert r.returncode == 1, r.stderr
    data = json.loads(r.stdout)
    assert set(data) == {"version", "findings", "errors", "summary"}
    assert data["version"] == 1
    assert set(data["summary"]) == {"files", "findings", "errors", "by_code", "rules"}
    assert data["summary"]["files"] == 2
    assert data["summary"]["findings"] == 2 and data["summary"]["errors"] == 1
    assert data["summary"]["by_code"] == {"SHM101": 1, "SHM106": 1}
    assert data["summary"]["rules"] == sorted(c for c, r in RULES.items() if r.default)
    for f in data["findings"]:
        assert set(f) == {"path", "line", "col", "code", "rule", "symbol", "message"}
        assert isinstance(f["line"], int) and isinstance(f["col"], int) and f["col"] >= 1
        assert f["rule"] == RULES[f["code"]].name
    assert [(f["line"], f["code"], f["symbol"]) for f in data["findings"]] == \
        [(5, "SHM101", "seen"), (6, "SHM106", "ids")]
    assert data["errors"][0]["path"].endswith("b.py")


def test_cli_select_exclude_include_tests(tmp_path):
    root = _project(tmp_path)
    r = shmreg_lint("app", "--select", "SHM103,SHM106", "--exclude", "sub", "--json", cwd=root)
    codes = [(f["path"], f["code"]) for f in json.loads(r.stdout)["findings"]]
    assert codes == [(os.path.join("app", "cached.py"), "SHM103")]
    r = shmreg_lint(".", "--include-tests", "--extend-select", "SHM103", "--json", cwd=root)
    paths = {f["path"] for f in json.loads(r.stdout)["findings"]}
    assert os.path.join(".", "tests", "test_views.py") in paths
    assert os.path.join(".", "app", "cached.py") in paths
    r = shmreg_lint("--list-rules")
    assert r.returncode == 0 and all(code in r.stdout for code in RULES)


def test_project_code_and_examples_are_clean():
    """The CI step: shmreg's own sources and examples pass ``shmreg lint``
    (what they keep per process on purpose says so in a noqa with a reason)."""
    r = shmreg_lint("src", "examples", cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    for path in [*ROOT.joinpath("src").rglob("*.py"), *ROOT.joinpath("examples").rglob("*.py")]:
        for line in path.read_text().splitlines():
            if re.search(r"#\s*noqa:\s*SHM", line):
                assert re.search(r"noqa:\s*SHM\d+\s+-\s+\S", line), f"{path}: noqa without a reason: {line}"


# -- flake8 ---------------------------------------------------------------------------


def flake8(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flake8", "--no-show-source", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_flake8_plugin(tmp_path):
    root = _project(tmp_path)
    (root / "app" / "views.py").write_text(
        "hits = {}\nseen = set()\ndef f(k):\n    hits[k] = 1\n    seen.add(k)  # noqa: SHM101\n")
    r = flake8("--select", "SHM", "app", "tests", cwd=root)
    lines = sorted(r.stdout.splitlines())
    assert r.returncode == 1, r.stderr
    # --select SHM names every SHM code: the off-by-default SHM103 runs too;
    # the noqa line and the test file are left out.
    assert [ln.split(" ", 2)[:2] for ln in lines] == [
        ["app/cached.py:2:2:", "SHM103"],
        ["app/sub/ids.py:4:12:", "SHM106"],
        ["app/views.py:4:5:", "SHM101"],
    ], r.stdout
    # Without an explicit selection only the default rules run.
    r = flake8("--select", "E999,SHM101,SHM106", "app", cwd=root)
    assert sorted(ln.split(" ", 2)[1] for ln in r.stdout.splitlines()) == ["SHM101", "SHM106"]
    r = flake8("app", cwd=root)
    assert "SHM103" not in r.stdout and "SHM101" in r.stdout
    (root / "pyproject.toml").write_text("[tool.shmreg.lint]\nextend-select = ['SHM103']\n"
                                         "ignore = ['SHM101']\n")
    r = flake8("--select", "SHM", "app", cwd=root)
    assert sorted(ln.split(" ", 2)[1] for ln in r.stdout.splitlines()) == ["SHM103", "SHM106"]


def test_pre_commit_hook_definition():
    text = (ROOT / ".pre-commit-hooks.yaml").read_text()
    assert "id: shmreg-lint" in text
    assert "entry: shmreg lint" in text
    assert "types: [python]" in text


# -- documentation ----------------------------------------------------------------------


def test_docs_rule_table_matches_the_rules():
    doc = (ROOT / "docs" / "lint.md").read_text()
    for code, rule in RULES.items():
        row = next((ln for ln in doc.splitlines() if ln.startswith(f"| {code} ")), None)
        assert row is not None, f"{code} missing from docs/lint.md"
        assert ("| on |" if rule.default else "| off |") in row, row


def test_defaults_follow_the_measured_precision():
    """A rule is on by default only if at least 80% of its judged findings on
    real code bases are real per-process state (benchmarks/lint_precision.csv)."""
    import csv

    with open(ROOT / "benchmarks" / "lint_precision.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows
    for code, rule in RULES.items():
        judged = [r for r in rows if r["code"] == code]
        if not judged:
            continue
        assert all(r["diverges"] in ("yes", "no") for r in judged), code
        precision = sum(r["diverges"] == "yes" for r in judged) / len(judged)
        assert rule.default == (precision >= 0.8), (code, precision)
