#!/usr/bin/env python
"""Generate ``docs/api.md`` from the docstrings of shmreg's public API.

    python docs/gen_api.py            # (re)write docs/api.md
    python docs/gen_api.py --check    # exit 1 if docs/api.md is out of date
    python docs/gen_api.py --stdout   # print the generated markdown

What is documented:

* every name in ``shmreg.__all__`` (classes with their public methods and
  properties, functions, constants, and the exception tree as a table);
* every module in ``MODULES`` below that can be imported: the names in its
  ``__all__`` plus the public functions, classes and pytest fixtures it
  defines itself (not the ones it imports), in source order;
* the command line, from ``shmreg.cli.build_parser()`` (walked, not
  formatted by argparse, so the output does not depend on the terminal
  width or the Python version).

Signatures come from :func:`inspect.signature`; where that fails (Cython
objects without an introspectable signature) from the signature line that
Cython's ``embedsignature=True`` puts at the top of the docstring.  That
line is removed from the text shown.  Docstrings are reST-ish; they are
converted to markdown just enough: ``code``, :role:`refs`, field lists
(``:param:``/``:raises:``/``:return:``), ``>>>`` blocks and ``::`` literal
blocks.  The output is deterministic: no memory addresses, no dates.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import re
import sys
import textwrap

# Modules documented after the top-level ``shmreg`` names, each only if it
# imports.  Add new public modules here.
MODULES = [
    "shmreg.metrics",
    "shmreg.recipes",
    "shmreg.gunicorn",
    "shmreg.uwsgi",
    "shmreg.uvicorn",
    "shmreg.mp",
    "shmreg.prometheus",
    "shmreg.celery",
    "shmreg.testing",
    "shmreg.django",
    "shmreg.cachelib",
    "shmreg.backends.redis",
]

# The command line parser: ``module:function`` returning an ArgumentParser.
CLI = "shmreg.cli:build_parser"

HERE = os.path.dirname(os.path.abspath(__file__))
OUTPUT = os.path.join(HERE, "api.md")

# Dunder methods worth a mention, and how they are spelled in use.
PROTOCOLS = {
    "__getitem__": "`x[key]`",
    "__setitem__": "`x[key] = value`",
    "__delitem__": "`del x[key]`",
    "__contains__": "`key in x`",
    "__len__": "`len(x)`",
    "__iter__": "`iter(x)`",
    "__enter__": "`with x:`",
    "__call__": "`x(...)`",
    "__reduce__": "pickling",
}


# -- signatures ------------------------------------------------------------------


class _Raw(str):
    """A string that ``repr()``s as itself: lets ``inspect.Parameter`` print
    annotations and defaults as written, not quoted."""

    def __repr__(self) -> str:
        return str(self)


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _public_aliases() -> dict:
    import shmreg

    out = {}
    for name in getattr(shmreg, "__all__", ()):
        obj = getattr(shmreg, name, None)
        if obj is not None and not isinstance(obj, (int, float, str, bytes, bool)):
            out[id(obj)] = name
    return out


def _default_text(name: str, value: object, aliases: dict) -> str:
    if id(value) in aliases:
        return aliases[id(value)]
    if name == "mode" and isinstance(value, int) and not isinstance(value, bool):
        return oct(value)
    if inspect.isfunction(value) or inspect.isclass(value) or inspect.isbuiltin(value):
        return value.__qualname__
    return _ADDRESS.sub("", repr(value))


def _annotation_text(ann: object) -> str:
    if isinstance(ann, str):
        # ``-> "Table"`` under ``from __future__ import annotations`` is the
        # string "'Table'": show it unquoted.
        if len(ann) >= 2 and ann[0] == ann[-1] and ann[0] in "'\"":
            return ann[1:-1]
        return ann
    return inspect.formatannotation(ann)


def format_signature(obj: object, *, drop_first: bool, aliases: dict, constructor: bool = False
                     ) -> str | None:
    """``(a, b=1, *, c=None) -> int`` for ``obj``, or None if unknown."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    params = list(sig.parameters.values())
    if drop_first and params and params[0].name in ("self", "cls"):
        params = params[1:]
    shown = []
    for p in params:
        if p.name.startswith("_"):
            continue  # private knobs (``_how=...``) are not part of the API
        changes = {}
        if p.annotation is not inspect.Parameter.empty:
            changes["annotation"] = _Raw(_annotation_text(p.annotation))
        if p.default is not inspect.Parameter.empty:
            changes["default"] = _Raw(_default_text(p.name, p.default, aliases))
        shown.append(p.replace(**changes))
    ret = inspect.Signature.empty
    if sig.return_annotation is not inspect.Signature.empty:
        ret = _Raw(_annotation_text(sig.return_annotation))
    if constructor:
        ret = inspect.Signature.empty  # a class's signature is its __init__'s: "-> None" says nothing
    try:
        text = str(inspect.Signature(shown, return_annotation=ret))
    except ValueError:  # dropping a private parameter broke the ordering rules
        text = "(" + ", ".join(str(p) for p in shown) + ")"
    return text


_EMBEDDED = re.compile(r"^(?:[A-Za-z_][\w]*\.)*(?P<name>[A-Za-z_]\w*)(?P<sig>\(.*\))(?:\s*->\s*(?P<ret>.+))?$")


def split_embedded(doc: str, name: str) -> tuple[str | None, str]:
    """Remove the signature line Cython embeds at the top of a docstring.
    Returns ``(signature or None, rest of the docstring)``."""
    lines = doc.splitlines()
    if lines:
        m = _EMBEDDED.match(lines[0].strip())
        if m and m.group("name") in (name, "__init__"):
            sig = m.group("sig")
            sig = re.sub(r"^\((?:self|cls)(?:,\s*|\))", "(", sig)
            if sig == "(":
                sig = "()"
            if m.group("ret"):
                sig += " -> " + m.group("ret")
            return sig, "\n".join(lines[1:]).strip("\n")
    return None, doc


def get_doc(obj: object) -> str:
    doc = getattr(obj, "__doc__", None)
    if not isinstance(doc, str):
        return ""
    return inspect.cleandoc(doc)


# -- docstring -> markdown -------------------------------------------------------

_ROLE = re.compile(r":(?:py:)?(?P<role>[a-z]+):`(?P<tilde>~?)(?P<target>[^`]+)`")


def _inline(text: str) -> str:
    text = re.sub(r"``(.+?)``", r"`\1`", text, flags=re.S)

    def role(m: re.Match) -> str:
        target = m.group("target")
        if m.group("tilde"):
            target = target.rsplit(".", 1)[-1]
        if m.group("role") in ("meth", "func") and not target.endswith(")"):
            target += "()"
        return f"`{target}`"

    text = _ROLE.sub(role, text)
    # Field markers in the middle of a paragraph ("... created.  :raises X: ...").
    text = re.sub(r"(?<=\S)(\s+):(?:raises|raise) ([\w.]+):", r"\1Raises `\2`:", text)
    text = re.sub(r"^:(?:raises|raise) ([\w.]+):", r"Raises `\1`:", text)
    text = re.sub(r"(?<=\S)(\s+):returns?:", r"\1Returns:", text)
    return text


_FIELD = re.compile(r"^:(?P<kind>param|parameter|arg|key|keyword|raises|raise|except|return|returns|rtype|type)"
                    r"(?:\s+(?P<arg>[^:]+))?:\s*(?P<text>.*)$")


def _field_line(kind: str, arg: str | None, text: str) -> str:
    text = _inline(text.strip())
    if kind in ("param", "parameter", "arg", "key", "keyword"):
        return f"- `{arg}`: {text}" if arg else f"- {text}"
    if kind in ("raises", "raise", "except"):
        return f"- Raises `{arg}`: {text}" if arg else f"- Raises: {text}"
    if kind in ("return", "returns"):
        return f"- Returns: {text}"
    if kind == "rtype":
        return f"- Return type: {text}"
    return f"- `{arg}` type: {text}" if arg else f"- Type: {text}"


def doc_to_markdown(doc: str) -> str:
    """Convert a cleaned reST-ish docstring to markdown."""
    lines = doc.splitlines()
    out: list[str] = []
    i = 0
    n = len(lines)

    prose: list[str] = []

    def indent_of(s: str) -> int:
        return len(s) - len(s.lstrip())

    def flush() -> None:
        # Inline markup (``code`` in particular) may span lines of a paragraph.
        if prose:
            out.extend(_inline("\n".join(prose)).split("\n"))
            prose.clear()

    while i < n:
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith(">>>"):
            flush()
            block = []
            base = indent_of(line)
            while i < n and lines[i].strip():
                block.append(lines[i][base:] if indent_of(lines[i]) >= base else lines[i].strip())
                i += 1
            out += ["```pycon", *block, "```"]
            continue
        m = _FIELD.match(stripped)
        if m:
            flush()
            text = m.group("text")
            base = indent_of(line)
            i += 1
            while i < n and lines[i].strip() and indent_of(lines[i]) > base and not _FIELD.match(lines[i].strip()):
                text += " " + lines[i].strip()
                i += 1
            if out and out[-1].strip() and not out[-1].startswith("- "):
                out.append("")  # a field list is its own paragraph
            out.append(_field_line(m.group("kind"), m.group("arg"), text))
            continue
        if stripped.endswith("::") and not stripped.startswith(".."):
            # A paragraph introducing a literal block: "text::" -> "text:",
            # "text ::" -> "text", a lone "::" disappears.
            if stripped.endswith(" ::"):
                prose.append(line.rstrip()[:-3].rstrip())
            elif stripped != "::":
                prose.append(line.rstrip()[:-1])
            flush()
            base = indent_of(line)
            i += 1
            block = []
            while i < n and (not lines[i].strip() or indent_of(lines[i]) > base):
                block.append(lines[i])
                i += 1
            while block and not block[-1].strip():
                block.pop()
            while block and not block[0].strip():
                block.pop(0)
            if block:
                out += ["", "```python", *textwrap.dedent("\n".join(block)).splitlines(), "```", ""]
            continue
        prose.append(line.rstrip())
        i += 1
    flush()
    text = "\n".join(out)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


# -- collecting members ----------------------------------------------------------


def _is_fixture(obj: object) -> bool:
    return (type(obj).__name__ == "FixtureFunctionDefinition"
            or hasattr(obj, "_pytestfixturefunction")
            or hasattr(obj, "_fixture_function_marker"))


def _defined_in(obj: object, modname: str) -> bool:
    return getattr(obj, "__module__", None) == modname


def _shmreg_bases(cls: type) -> list:
    return [c for c in reversed(cls.__mro__)
            if c is not object and (c.__module__ or "").split(".")[0] == "shmreg"]


def class_members(cls: type) -> tuple[list, list]:
    """``([(name, static attribute)], [protocol spellings])`` for the public
    members of ``cls`` and its shmreg base classes, base classes first, each
    class in definition order, overrides resolved to the most derived."""
    names: list[str] = []
    for c in _shmreg_bases(cls):
        for name in vars(c):
            if name not in names:
                names.append(name)
    members = []
    protocols = []
    for name in names:
        attr = inspect.getattr_static(cls, name)
        if name.startswith("__"):
            if name in PROTOCOLS and name not in ("__reduce__",):
                protocols.append(PROTOCOLS[name])
            continue
        if name.startswith("_"):
            continue
        members.append((name, attr))
    return members, protocols


def _kind(attr: object) -> str | None:
    if isinstance(attr, property) or type(attr).__name__ in ("getset_descriptor", "member_descriptor"):
        return "property"
    if isinstance(attr, classmethod):
        return "classmethod"
    if isinstance(attr, staticmethod):
        return "staticmethod"
    if callable(attr):
        return "method"
    return None


# -- rendering -------------------------------------------------------------------


class Writer:
    def __init__(self) -> None:
        self.parts: list[str] = []
        self.aliases = _public_aliases()

    def add(self, *chunks: str) -> None:
        for c in chunks:
            self.parts.append(c.rstrip("\n"))

    def text(self) -> str:
        out = "\n\n".join(p for p in self.parts if p is not None)
        out = re.sub(r"\n{3,}", "\n\n", out)
        return out.strip() + "\n"

    # ---

    def doc_block(self, doc: str) -> None:
        md = doc_to_markdown(doc)
        if md:
            self.add(md)

    def callable_signature(self, obj: object, name: str, drop_first: bool) -> tuple[str, str]:
        doc = get_doc(obj)
        embedded, doc = split_embedded(doc, name)
        sig = format_signature(obj, drop_first=drop_first, aliases=self.aliases)
        if sig is None:
            sig = embedded or "(...)"
        return sig, doc

    def function(self, qualname: str, obj: object, level: str = "###") -> None:
        sig, doc = self.callable_signature(obj, obj.__name__, drop_first=False)
        self.add(f"{level} `{qualname}{sig}`")
        self.doc_block(doc)

    def fixture(self, qualname: str, obj: object, level: str = "###") -> None:
        name = getattr(obj, "name", None) or qualname.rsplit(".", 1)[-1]
        self.add(f"{level} fixture `{name}`")
        fn = getattr(obj, "_get_wrapped_function", None)
        doc = get_doc(obj) or (get_doc(fn()) if callable(fn) else "")
        self.doc_block(doc)

    def constant(self, qualname: str, value: object, doc: str, level: str = "###") -> None:
        self.add(f"{level} `{qualname}`")
        self.add(f"Value: `{_default_text('', value, {})}`")
        self.doc_block(doc)

    def klass(self, qualname: str, cls: type, level: str = "###") -> None:
        short = qualname.rsplit(".", 1)[-1]
        sig = None
        doc = get_doc(cls)
        embedded, doc = split_embedded(doc, cls.__name__)
        sig = format_signature(cls, drop_first=False, aliases=self.aliases, constructor=True)
        if sig is None:
            sig = embedded or ""
        self.add(f"{level} class `{qualname}{sig}`")
        bases = [b for b in cls.__bases__ if b is not object]
        if bases:
            shown = ", ".join(f"`{_qualified(b)}`" for b in bases)
            self.add(f"Bases: {shown}")
        self.doc_block(doc)
        members, protocols = class_members(cls)
        if protocols:
            self.add("Supports " + ", ".join(protocols) + ".")
        others = [b for b in cls.__mro__[1:] if b is not object and (b.__module__ or "").split(".")[0] != "shmreg"
                  and not issubclass(b, BaseException)]
        own = {m for m, _ in members}
        inherited = sorted({n for b in others for n in vars(b)
                            if not n.startswith("_") and n not in own and callable(getattr(b, n, None))})
        if others and inherited:
            self.add(f"Also inherits from `{_qualified(others[0])}`: "
                     + ", ".join(f"`{n}()`" for n in inherited) + ".")
        for name, attr in members:
            kind = _kind(attr)
            if kind is None:
                continue
            if kind == "property":
                doc = get_doc(attr)
                self.add(f"{level}# `{short}.{name}` *(property)*")
                self.doc_block(doc)
                continue
            func = attr.__func__ if kind in ("classmethod", "staticmethod") else attr
            sig, doc = self.callable_signature(func, name, drop_first=kind != "staticmethod")
            suffix = f" *({kind})*" if kind != "method" else ""
            self.add(f"{level}# `{short}.{name}{sig}`{suffix}")
            self.doc_block(doc)

    def exceptions(self, names: list, module: object) -> None:
        rows = ["| Exception | Bases | When |", "| --- | --- | --- |"]
        for name in names:
            cls = getattr(module, name)
            bases = ", ".join(f"`{b.__name__}`" for b in cls.__bases__)
            doc = doc_to_markdown(get_doc(cls)).replace("\n", " ").replace("|", "\\|")
            rows.append(f"| `{name}` | {bases} | {doc} |")
        self.add("\n".join(rows))


def _qualified(cls: type) -> str:
    mod = cls.__module__
    if mod == "builtins":
        return cls.__qualname__
    import shmreg

    if getattr(shmreg, cls.__name__, None) is cls:
        return f"shmreg.{cls.__name__}"
    return f"{mod}.{cls.__qualname__}"


# ``#:`` comments above a module-level assignment document constants.


def _constant_doc(module: object, name: str) -> str:
    files = []
    f = getattr(module, "__file__", None)
    if f:
        files.append(f)
    pkg_dir = os.path.dirname(f) if f else None
    if pkg_dir and os.path.isdir(pkg_dir):
        for fn in sorted(os.listdir(pkg_dir)):
            # .py only: .pyx sources are not installed, and the reference must
            # come out the same from a checkout and from an installed wheel.
            if fn.endswith(".py"):
                files.append(os.path.join(pkg_dir, fn))
    pattern = re.compile(rf"^{re.escape(name)}\s*(?::[^=]+)?=")
    for path in files:
        if path.endswith((".so", ".pyd")):
            continue
        try:
            with open(path, encoding="utf-8") as fh:
                lines = fh.read().splitlines()
        except OSError:
            continue
        for idx, line in enumerate(lines):
            if pattern.match(line):
                comment = []
                j = idx - 1
                while j >= 0 and lines[j].startswith("#:"):
                    comment.insert(0, lines[j][2:].strip())
                    j -= 1
                if comment:
                    return " ".join(comment)
    return ""


def _module_names(module: object) -> list:
    modname = module.__name__
    exported = list(getattr(module, "__all__", []))
    names = []
    for name, obj in vars(module).items():
        if name.startswith("_"):
            continue
        if name in exported or (_defined_in(obj, modname)
                                and (inspect.isfunction(obj) or inspect.isclass(obj) or _is_fixture(obj))):
            names.append(name)
    for name in exported:  # exported but assigned in a way vars() order missed
        if name not in names and hasattr(module, name):
            names.append(name)
    return names


def render_top(w: Writer) -> None:
    import shmreg

    w.add("## Package `shmreg`")
    w.doc_block(get_doc(shmreg))
    names = list(shmreg.__all__)
    excs = [n for n in names if inspect.isclass(getattr(shmreg, n)) and issubclass(getattr(shmreg, n), BaseException)]
    classes = [n for n in names if inspect.isclass(getattr(shmreg, n)) and n not in excs]
    funcs = [n for n in names if n not in excs and n not in classes and callable(getattr(shmreg, n))
             and (inspect.isfunction(getattr(shmreg, n)) or inspect.isbuiltin(getattr(shmreg, n)))]
    consts = [n for n in names if n not in excs + classes + funcs]
    for n in classes:
        w.klass(f"shmreg.{n}", getattr(shmreg, n))
    for n in funcs:
        w.function(f"shmreg.{n}", getattr(shmreg, n))
    for n in consts:
        w.constant(f"shmreg.{n}", getattr(shmreg, n), _constant_doc(shmreg, n))
    if excs:
        w.add("### Exceptions")
        w.add("Every error shmreg raises derives from `shmreg.Error`; each class also "
              "inherits the builtin a Python user would catch.")
        w.exceptions(excs, shmreg)
        for n in excs:
            cls = getattr(shmreg, n)
            if "__init__" in vars(cls):
                sig = format_signature(cls, drop_first=False, aliases=w.aliases, constructor=True)
                w.add(f"`shmreg.{n}{sig}`: " + doc_to_markdown(get_doc(cls)).replace("\n", " "))


def render_module(w: Writer, modname: str) -> bool:
    try:
        module = importlib.import_module(modname)
    except ImportError:
        return False
    w.add(f"## Module `{modname}`")
    w.doc_block(get_doc(module))
    for name in _module_names(module):
        obj = getattr(module, name)
        qual = f"{modname}.{name}"
        if _is_fixture(obj):
            w.fixture(qual, obj)
        elif inspect.isclass(obj):
            w.klass(qual, obj)
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
            w.function(qual, obj)
        else:
            w.constant(qual, obj, _constant_doc(module, name))
    return True


def _action_line(action: argparse.Action) -> str | None:
    if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
        return None
    if action.option_strings:
        spelled = ", ".join(action.option_strings)
        if action.nargs != 0:
            metavar = action.metavar or action.dest.upper()
            spelled += f" {metavar}"
    else:
        spelled = action.metavar or action.dest
        if action.nargs in ("?", "*"):
            spelled = f"[{spelled}]"
    help_text = action.help or ""
    if "%(" in help_text:
        try:
            help_text = help_text % dict(vars(action), prog="shmreg")
        except (KeyError, TypeError, ValueError):
            pass
    return f"- `{spelled}`: {help_text}" if help_text else f"- `{spelled}`"


def _render_parser(w: Writer, parser: argparse.ArgumentParser, prog: str, level: str) -> None:
    sub_actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    lines = [line for a in parser._actions if not isinstance(a, argparse._SubParsersAction)
             for line in [_action_line(a)] if line]
    helps = {}
    for sa in sub_actions:
        for choice in sa._choices_actions:
            helps[choice.dest] = choice.help
    if lines:
        w.add("\n".join(lines))
    for sa in sub_actions:
        for name, sub in sa.choices.items():
            w.add(f"{level} `{prog} {name}`")
            text = sub.description or helps.get(name) or ""
            if text:
                w.add(text)
            _render_parser(w, sub, f"{prog} {name}", level + "#")


def render_cli(w: Writer) -> bool:
    modname, _, func = CLI.partition(":")
    try:
        module = importlib.import_module(modname)
        parser = getattr(module, func)()
    except (ImportError, AttributeError):
        return False
    w.add("## Command line `shmreg`")
    if parser.description:
        w.add(parser.description)
    w.add("Run `shmreg --help` or `shmreg COMMAND --help` for the same text in the terminal.")
    _render_parser(w, parser, "shmreg", "###")
    return True


def generate() -> str:
    w = Writer()
    w.add("# API reference")
    w.add("<!-- Generated by docs/gen_api.py from the docstrings: do not edit by hand. "
          "Regenerate with `python docs/gen_api.py`. -->")
    w.add("Contents: [`shmreg`](#package-shmreg)"
          + "".join(f", [`{m}`](#module-{m.replace('.', '')})" for m in MODULES if _importable(m))
          + (", [command line](#command-line-shmreg)" if _importable(CLI.partition(":")[0]) else "") + ".")
    render_top(w)
    for m in MODULES:
        render_module(w, m)
    render_cli(w)
    return w.text()


def _importable(modname: str) -> bool:
    try:
        importlib.import_module(modname)
    except ImportError:
        return False
    return True


def main(argv: list | None = None) -> int:
    ap = argparse.ArgumentParser(description="Generate docs/api.md from shmreg's docstrings.")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--check", action="store_true", help="exit 1 if docs/api.md is stale")
    g.add_argument("--stdout", action="store_true", help="print instead of writing")
    args = ap.parse_args(argv)
    text = generate()
    if args.stdout:
        sys.stdout.write(text)
        return 0
    if args.check:
        try:
            with open(OUTPUT, encoding="utf-8") as fh:
                current = fh.read()
        except FileNotFoundError:
            current = ""
        if " ".join(current.split()) != " ".join(text.split()):
            print(f"{OUTPUT} is out of date: run python docs/gen_api.py", file=sys.stderr)
            return 1
        return 0
    with open(OUTPUT, "w", encoding="utf-8") as fh:
        fh.write(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
