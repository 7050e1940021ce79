"""Project configuration of ``shmreg lint``: ``[tool.shmreg.lint]`` in the
nearest ``pyproject.toml`` (found by walking up from the linted path), and
the rule selection it and the command line make.

::

    [tool.shmreg.lint]
    select = ["SHM1"]            # replaces the default rules (prefixes allowed)
    extend-select = ["SHM103"]   # adds to them
    ignore = ["SHM102"]
    exclude = ["build/*", "legacy/*.py"]
    include-tests = false

TOML is read with :mod:`tomllib` (Python 3.11+), else ``tomli`` when it is
installed, else a small reader that understands this one table (strings,
booleans and arrays of strings), which is all the section needs.
"""

from __future__ import annotations

import ast
import os
import re
from dataclasses import dataclass, field
from typing import Iterable, Optional

from shmreg.lint.rules import DEFAULT_CODES, PREFIX, RULES

__all__ = ["Config", "ConfigError", "find_pyproject", "load_config", "resolve_codes"]

_KEYS = {"select", "extend-select", "ignore", "exclude", "include-tests"}


class ConfigError(ValueError):
    """A bad ``[tool.shmreg.lint]`` table or an unknown rule code (a usage
    error: ``shmreg lint`` exits 2)."""


@dataclass
class Config:
    """The ``[tool.shmreg.lint]`` settings; ``root`` is the directory of the
    pyproject.toml they came from (exclude patterns are relative to it)."""

    select: Optional[list] = None
    extend_select: list = field(default_factory=list)
    ignore: list = field(default_factory=list)
    exclude: list = field(default_factory=list)
    include_tests: bool = False
    root: Optional[str] = None
    source: Optional[str] = None


def find_pyproject(start: str) -> Optional[str]:
    """The nearest ``pyproject.toml`` in ``start`` (a file's directory) or above."""
    d = os.path.abspath(start)
    if not os.path.isdir(d):
        d = os.path.dirname(d)
    while True:
        candidate = os.path.join(d, "pyproject.toml")
        if os.path.isfile(candidate):
            return candidate
        parent = os.path.dirname(d)
        if parent == d:
            return None
        d = parent


def _read_toml_section(text: str) -> dict:
    """``tool.shmreg.lint`` from TOML text, by the best reader available."""
    try:
        import tomllib as toml  # Python 3.11+
    except ImportError:
        try:
            import tomli as toml  # type: ignore[no-redef]
        except ImportError:
            return _mini_section(text)
    try:
        data = toml.loads(text)
    except toml.TOMLDecodeError as e:
        raise ConfigError(f"invalid TOML: {e}") from None
    section = data.get("tool", {}).get("shmreg", {}).get("lint", {})
    if not isinstance(section, dict):
        raise ConfigError("[tool.shmreg.lint] must be a table")
    return section


_HEADER = re.compile(r"^\s*\[\s*tool\s*\.\s*shmreg\s*\.\s*lint\s*\]\s*(?:#.*)?$")


def _mini_section(text: str) -> dict:
    """A reader for Python 3.9/3.10 without tomli: ``key = value`` lines of
    the ``[tool.shmreg.lint]`` table, values being strings, booleans or
    (possibly multi-line) arrays of strings."""
    out: dict = {}
    inside = False
    pending = ""
    for raw in text.splitlines():
        line = _strip_comment(raw.strip())
        if not pending:
            if line.startswith("["):
                inside = bool(_HEADER.match(line))
                continue
            if not inside or not line:
                continue
        pending = f"{pending} {line}" if pending else line
        key, sep, value = pending.partition("=")
        value = value.strip()
        if value.startswith("[") and not value.endswith("]"):
            continue  # an array going on on the next line
        pending = ""
        if not sep:
            raise ConfigError(f"cannot read [tool.shmreg.lint] line: {raw.strip()!r}")
        key = key.strip().strip('"')
        value = {"true": "True", "false": "False"}.get(value, value)
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ConfigError(f"cannot read [tool.shmreg.lint] value of {key!r}: {value!r} "
                              "(install tomli for full TOML)") from None
    if pending:
        raise ConfigError("unterminated array in [tool.shmreg.lint]")
    return out


def _strip_comment(value: str) -> str:
    quote = None
    for i, ch in enumerate(value):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#":
            return value[:i].rstrip()
    return value


def _str_list(section: dict, key: str, where: str) -> list:
    value = section.get(key, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: {key} must be a list of strings")
    return value


def load_config(path: Optional[str]) -> Config:
    """Read ``[tool.shmreg.lint]`` from the pyproject.toml at ``path``
    (``None``: an empty configuration).

    :raises ConfigError: unreadable TOML, an unknown key or a bad value.
    """
    if path is None:
        return Config()
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    where = f"{path} [tool.shmreg.lint]"
    try:
        section = _read_toml_section(text)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    unknown = set(section) - _KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} "
                          f"(known: {', '.join(sorted(_KEYS))})")
    include_tests = section.get("include-tests", False)
    if not isinstance(include_tests, bool):
        raise ConfigError(f"{where}: include-tests must be true or false")
    cfg = Config(
        select=_str_list(section, "select", where) if "select" in section else None,
        extend_select=_str_list(section, "extend-select", where),
        ignore=_str_list(section, "ignore", where),
        exclude=_str_list(section, "exclude", where),
        include_tests=include_tests,
        root=os.path.dirname(os.path.abspath(path)),
        source=path,
    )
    for key in ("select", "extend_select", "ignore"):
        _expand(getattr(cfg, key) or [], where)
    return cfg


def _expand(patterns: Iterable[str], where: str = "") -> set:
    """The rule codes that ``patterns`` (codes or prefixes: ``SHM``, ``SHM1``,
    ``SHM10``, ``SHM101``) name.

    :raises ConfigError: a pattern that names no rule.
    """
    out = set()
    for p in patterns:
        p = p.strip().upper()
        if not p:
            continue
        hit = {c for c in RULES if c.startswith(p)}
        if not hit or not p.startswith(PREFIX[:len(p)]):
            known = ", ".join(RULES)
            raise ConfigError(f"{where + ': ' if where else ''}unknown rule code {p!r} (known: {known})")
        out |= hit
    return out


def resolve_codes(config: Config, *, select: Optional[list] = None,
                  extend_select: Optional[list] = None, ignore: Optional[list] = None) -> set:
    """The codes to run: ``select`` (command line, else config, else the
    defaults), plus every ``extend-select``, minus every ``ignore``.

    :raises ConfigError: an unknown code.
    """
    chosen = select if select is not None else config.select
    codes = _expand(chosen, "--select") if chosen is not None else set(DEFAULT_CODES)
    codes |= _expand(config.extend_select) | _expand(extend_select or [], "--extend-select")
    codes -= _expand(config.ignore) | _expand(ignore or [], "--ignore")
    return codes
