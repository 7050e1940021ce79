"""Running the checks over files: which files, which rules, which findings a
``# noqa`` comment suppresses."""

from __future__ import annotations

import ast
import fnmatch
import io
import os
import re
import tokenize
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

from shmreg.lint.checker import Finding, check_tree
from shmreg.lint.config import Config, ConfigError, find_pyproject, load_config, resolve_codes

__all__ = ["Result", "lint_source", "lint_paths", "is_test_file", "noqa_lines"]

# Directories never walked into (explicit paths are still honoured).
_SKIP_DIRS = {".git", ".hg", ".svn", ".tox", ".nox", ".venv", "venv", "__pycache__",
              "build", "dist", "node_modules", ".mypy_cache", ".pytest_cache", ".eggs"}

_NOQA = re.compile(r"#\s*noqa(?::[\s]?(?P<codes>[A-Z]+[0-9]+(?:[,\s]+[A-Z]+[0-9]+)*))?", re.I)


@dataclass
class Result:
    """What a run found: ``findings`` (sorted by path and position),
    ``errors`` (``(path, message)`` for files that could not be read or
    parsed), ``files`` (how many were checked) and ``codes`` (the rules
    that ran)."""

    findings: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    files: int = 0
    codes: set = field(default_factory=set)


def is_test_file(path: str) -> bool:
    """True for ``test_*.py``, ``*_test.py``, ``conftest.py`` and any file
    under a ``tests``/``test``/``testing`` directory."""
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    base = parts[-1]
    if base.startswith("test_") or base.endswith("_test.py") or base == "conftest.py":
        return True
    return any(p in ("tests", "test", "testing") for p in parts[:-1])


def noqa_lines(source: str) -> dict:
    """``{line: set of codes}`` for each line with a ``# noqa`` comment; an
    empty set means a bare ``# noqa`` (every code).  Only real comments count,
    not ``noqa`` inside a string."""
    out: dict = {}
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, SyntaxError):
        return out
    for tok in tokens:
        if tok.type != tokenize.COMMENT:
            continue
        m = _NOQA.search(tok.string)
        if not m:
            continue
        codes = m.group("codes")
        line = tok.start[0]
        if codes:
            out.setdefault(line, set()).update(c.upper() for c in re.split(r"[,\s]+", codes) if c)
        else:
            out[line] = set()
    return out


def _suppressed(f: Finding, noqa: dict) -> bool:
    codes = noqa.get(f.line)
    if codes is None:
        return False
    return not codes or any(f.code.startswith(c) for c in codes)


def lint_source(source: str, path: str = "<string>", *, codes: Optional[Iterable[str]] = None,
                noqa: bool = True) -> list:
    """The findings of the rules in ``codes`` (default: the default rules) in
    ``source``, minus those a ``# noqa`` on their line suppresses.

    :raises SyntaxError: ``source`` is not valid Python.

    >>> [f.code for f in lint_source("seen = set()\\ndef f(x):\\n    seen.add(x)\\n")]
    ['SHM101']
    """
    from shmreg.lint.rules import DEFAULT_CODES

    wanted = set(DEFAULT_CODES if codes is None else codes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SyntaxWarning for odd escapes in linted code
        tree = ast.parse(source, filename=path)
    found = [f for f in check_tree(tree, path) if f.code in wanted]
    if noqa:
        marks = noqa_lines(source)
        found = [f for f in found if not _suppressed(f, marks)]
    return found


def _excluded(path: str, patterns: list, roots: list) -> bool:
    if not patterns:
        return False
    full = os.path.abspath(path)
    candidates = {os.path.basename(full), full.replace(os.sep, "/")}
    for root in roots:
        if root:
            rel = os.path.relpath(full, root)
            if not rel.startswith(".."):
                candidates.add(rel.replace(os.sep, "/"))
                # a pattern naming a directory excludes what is under it
                parts = rel.replace(os.sep, "/").split("/")
                candidates.update("/".join(parts[:i]) for i in range(1, len(parts)))
                candidates.update(parts)  # a bare name matches any directory level
    return any(fnmatch.fnmatch(c, p.rstrip("/")) for c in candidates for p in patterns)


def _iter_files(paths: Iterable[str]) -> Iterator[str]:
    for p in paths:
        if os.path.isdir(p):
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS
                                     and not d.endswith(".egg-info"))
                for name in sorted(filenames):
                    if name.endswith(".py"):
                        yield os.path.join(dirpath, name)
        else:
            yield p


def lint_paths(paths: Iterable[str], *, select: Optional[list] = None,
               extend_select: Optional[list] = None, ignore: Optional[list] = None,
               exclude: Optional[list] = None, include_tests: Optional[bool] = None,
               config: Optional[str] = None, use_config: bool = True) -> Result:
    """Lint files and directories (``.py`` files found recursively).

    The configuration is ``[tool.shmreg.lint]`` of ``config`` (a
    pyproject.toml) or of the nearest pyproject.toml above the first path;
    ``select`` replaces its selection, the other arguments add to it.
    Test files are skipped unless ``include_tests`` (or ``include-tests``
    in the configuration) is true, also when named explicitly, so a
    pre-commit hook passing file names behaves like a directory run.

    :raises FileNotFoundError: a path that does not exist.
    :raises ConfigError: a bad configuration or an unknown rule code.
    """
    paths = list(paths)
    for p in paths:
        if not os.path.exists(p):
            raise FileNotFoundError(2, "No such file or directory", p)
    if not use_config:
        cfg = Config()
    else:
        where = config or find_pyproject(paths[0] if paths else os.getcwd())
        if config is not None and not os.path.isfile(config):
            raise ConfigError(f"no such config file: {config}")
        cfg = load_config(where)
    codes = resolve_codes(cfg, select=select, extend_select=extend_select, ignore=ignore)
    patterns = list(cfg.exclude) + list(exclude or [])
    roots = [cfg.root, os.getcwd()]
    tests = cfg.include_tests if include_tests is None else include_tests
    result = Result(codes=codes)
    for path in _iter_files(paths):
        if _excluded(path, patterns, roots) or (not tests and is_test_file(path)):
            continue
        try:
            with open(path, "rb") as fh:
                raw = fh.read()
            source = raw.decode(tokenize.detect_encoding(io.BytesIO(raw).readline)[0])
        except (OSError, SyntaxError, UnicodeDecodeError, LookupError) as e:
            result.errors.append((path, f"cannot read: {e}"))
            continue
        result.files += 1
        try:
            result.findings.extend(lint_source(source, path, codes=codes))
        except (SyntaxError, ValueError) as e:
            line = getattr(e, "lineno", None)
            result.errors.append((path, f"cannot parse{f' (line {line})' if line else ''}: "
                                        f"{getattr(e, 'msg', e)}"))
    return result
