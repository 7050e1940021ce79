"""``shmreg lint``: its arguments, and text and JSON reports.

Exit codes: 0 nothing found, 1 findings (or a file that cannot be parsed),
2 usage error (unknown option or rule code, missing path, bad
``[tool.shmreg.lint]``).

The ``--json`` report (schema version 1)::

    {
      "version": 1,
      "findings": [
        {"path": "app/views.py", "line": 12, "col": 5, "code": "SHM101",
         "rule": "module-container-mutated", "symbol": "_cache",
         "message": "module-level dict `_cache` mutated (...): ...; use ..."}
      ],
      "errors": [{"path": "app/broken.py", "message": "cannot parse (line 3): ..."}],
      "summary": {"files": 10, "findings": 1, "errors": 0,
                  "by_code": {"SHM101": 1}, "rules": ["SHM101", "SHM105", ...]}
    }

``line`` is 1-based, ``col`` 1-based; findings are sorted by path, line,
column; ``by_code`` counts findings per code; ``rules`` lists the codes
that ran.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, TextIO

from shmreg.lint.config import ConfigError
from shmreg.lint.rules import RULES
from shmreg.lint.runner import Result, lint_paths

__all__ = ["add_arguments", "run", "to_json", "to_text", "JSON_VERSION"]

#: The version of the ``--json`` schema.
JSON_VERSION = 1

EXIT_CLEAN, EXIT_FOUND, EXIT_USAGE = 0, 1, 2


def _codes(text: str) -> list:
    return [c for c in text.replace(" ", "").split(",") if c]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``shmreg lint`` (added to the ``lint`` subparser)."""
    p.add_argument("paths", nargs="*", metavar="PATH",
                   help="files or directories to check (default: .)")
    p.add_argument("--select", type=_codes, metavar="CODES",
                   help="comma-separated codes or prefixes to run, replacing the defaults "
                        "(e.g. SHM1 for every rule)")
    p.add_argument("--extend-select", type=_codes, metavar="CODES",
                   help="codes or prefixes to run in addition (e.g. SHM103)")
    p.add_argument("--ignore", type=_codes, metavar="CODES", help="codes or prefixes to skip")
    p.add_argument("--exclude", action="append", metavar="GLOB", default=[],
                   help="skip files or directories matching GLOB (repeatable)")
    p.add_argument("--include-tests", action="store_true",
                   help="also check test files (test_*.py, *_test.py, conftest.py, tests/)")
    p.add_argument("--config", metavar="PYPROJECT",
                   help="read [tool.shmreg.lint] from this file instead of the nearest pyproject.toml")
    p.add_argument("--no-config", action="store_true", help="ignore pyproject.toml")
    p.add_argument("--json", action="store_true", help="print a JSON report")
    p.add_argument("--list-rules", action="store_true", help="list the rules and exit")


def to_json(result: Result) -> dict:
    """The ``--json`` report of ``result`` (schema in this module's docstring)."""
    by_code: dict = {}
    for f in result.findings:
        by_code[f.code] = by_code.get(f.code, 0) + 1
    return {
        "version": JSON_VERSION,
        "findings": [f.as_dict() for f in result.findings],
        "errors": [{"path": p, "message": m} for p, m in result.errors],
        "summary": {"files": result.files, "findings": len(result.findings),
                    "errors": len(result.errors), "by_code": dict(sorted(by_code.items())),
                    "rules": sorted(result.codes)},
    }


def to_text(result: Result) -> str:
    """One ``path:line:col: CODE message`` line per finding, then a summary."""
    lines = [f"{f.path}:{f.line}:{f.col}: {f.code} {f.message}" for f in result.findings]
    lines += [f"{p}: error: {m}" for p, m in result.errors]
    n = len(result.findings)
    summary = f"{n} finding{'s' * (n != 1)} in {result.files} file{'s' * (result.files != 1)}"
    if result.errors:
        summary += f", {len(result.errors)} unreadable"
    return "\n".join([*lines, summary])


def rules_text() -> str:
    """The rule table, one rule per paragraph."""
    out = []
    for r in RULES.values():
        out.append(f"{r.code} {r.name} ({'on' if r.default else 'off'} by default)\n"
                   f"    finds: {r.title}\n    why:   {r.why}\n    use:   {r.fix}")
    return "\n".join(out)


def run(args: argparse.Namespace, out: Optional[TextIO] = None) -> int:
    """Run ``shmreg lint`` with parsed ``args``; returns the exit code."""
    out = out or sys.stdout
    if args.list_rules:
        print(rules_text(), file=out)
        return EXIT_CLEAN
    try:
        result = lint_paths(args.paths or ["."], select=args.select,
                            extend_select=args.extend_select, ignore=args.ignore,
                            exclude=args.exclude, include_tests=args.include_tests or None,
                            config=args.config, use_config=not args.no_config)
    except (ConfigError, FileNotFoundError) as e:
        msg = f"{e.strerror}: {e.filename}" if isinstance(e, FileNotFoundError) else str(e)
        print(f"shmreg lint: {msg}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(to_json(result), indent=2), file=out)
    else:
        print(to_text(result), file=out)
    return EXIT_FOUND if result.findings or result.errors else EXIT_CLEAN
