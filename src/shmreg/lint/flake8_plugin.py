"""The flake8 plugin of ``shmreg lint`` (codes ``SHM1xx``).

Registered in pyproject.toml under ``[project.entry-points."flake8.extension"]``
as ``SHM = "shmreg.lint.flake8_plugin:Plugin"``.  flake8 applies its own
``# noqa``, ``--select`` and ``--ignore``; this plugin adds the rules'
defaults and the project's ``[tool.shmreg.lint]`` table:

* the rules that are on by default run, plus those that
  ``[tool.shmreg.lint]`` selects, plus those named explicitly in flake8's
  ``--select``/``--extend-select`` (``--extend-select SHM103``);
* ``[tool.shmreg.lint]`` ``ignore`` and ``exclude`` apply, and test files
  are skipped unless ``include-tests = true``.
"""

from __future__ import annotations

import ast
import functools
import os
from typing import Iterator

from shmreg.lint.checker import check_tree
from shmreg.lint.config import ConfigError, _expand, find_pyproject, load_config, resolve_codes
from shmreg.lint.runner import _excluded, is_test_file

__all__ = ["Plugin"]


@functools.lru_cache(maxsize=64)
def _project(directory: str) -> tuple:
    """(config, codes) for files in ``directory``: each pyproject.toml is
    read once per flake8 process."""
    cfg = load_config(find_pyproject(directory))
    return cfg, frozenset(resolve_codes(cfg))


class Plugin:
    """flake8 entry point: ``Plugin(tree, filename).run()`` yields
    ``(line, col, "SHM1xx message", type)`` tuples."""

    name = "shmreg-lint"
    version = "1"
    _explicit: frozenset = frozenset()

    def __init__(self, tree: ast.AST, filename: str = "<stdin>") -> None:
        self.tree = tree
        self.filename = filename

    @classmethod
    def parse_options(cls, options) -> None:
        """Remember the SHM codes that flake8's ``--select``/``--extend-select``
        name explicitly: they turn on rules that are off by default."""
        named = [c for opt in ("select", "extend_select") for c in (getattr(options, opt, None) or [])
                 if c.upper().startswith("SHM")]
        try:
            cls._explicit = frozenset(_expand(named))
        except ConfigError:
            cls._explicit = frozenset()

    def run(self) -> Iterator[tuple]:
        """The findings, as flake8 wants them (0-based columns)."""
        directory = os.path.dirname(os.path.abspath(self.filename))
        try:
            cfg, codes = _project(directory)
        except ConfigError as e:
            yield 1, 0, f"SHM100 cannot read the shmreg lint configuration: {e}", type(self)
            return
        if self.filename not in ("<stdin>", "-", "stdin"):
            if not cfg.include_tests and is_test_file(self.filename):
                return
            if _excluded(self.filename, cfg.exclude, [cfg.root]):
                return
        ignored = _expand(cfg.ignore)
        wanted = (codes | self._explicit) - ignored
        for f in check_tree(self.tree, self.filename):
            if f.code in wanted:
                yield f.line, f.col - 1, f"{f.code} {f.message}", type(self)
