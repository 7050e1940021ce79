"""The analysis behind ``shmreg lint``: one pass of :mod:`ast` over a module.

What counts as module state: names bound at the top level of the module
(also inside top-level ``if``/``try``/``with`` blocks, but not under
``if __name__ == "__main__":``) and class attributes bound in a class body.
What counts as a run-time change: a mutation or rebinding made *inside a
function* (any ``def``/``lambda``, at any depth).  Code that runs at import
time (module and class bodies) fills state once and is left alone.

Names are resolved the way Python does it: a name that a function (or an
enclosing function) binds is local unless declared ``global``; class scopes
are not visible from methods.  Imports are followed through aliases
(``import functools as ft``, ``from functools import lru_cache as memo``).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

from shmreg.lint.rules import RULES

__all__ = ["Finding", "check_tree"]


@dataclass(frozen=True)
class Finding:
    """One finding: ``path:line:col: code message``; ``symbol`` is the name of
    the state (``_cache``, ``Config.hooks``, ``get_user``)."""

    path: str
    line: int
    col: int
    code: str
    message: str
    symbol: str

    def as_dict(self) -> dict:
        """The finding as a JSON-ready dict (the ``--json`` schema)."""
        return {"path": self.path, "line": self.line, "col": self.col, "code": self.code,
                "rule": RULES[self.code].name, "symbol": self.symbol, "message": self.message}


# -- what is a mutable container, a cache, a counter ---------------------------------

_CONTAINER_CALLS = {
    "dict": "dict", "list": "list", "set": "set", "bytearray": "bytearray",
    "collections.Counter": "Counter", "collections.defaultdict": "defaultdict",
    "collections.deque": "deque", "collections.OrderedDict": "OrderedDict",
    "collections.ChainMap": "ChainMap", "typing.Counter": "Counter",
}
_CONTAINER_NODES = {ast.Dict: "dict", ast.List: "list", ast.Set: "set",
                    ast.DictComp: "dict", ast.ListComp: "list", ast.SetComp: "set"}

# Methods that change a container in place (dict, list, set, deque, Counter).
MUTATORS = frozenset({
    "append", "extend", "insert", "remove", "pop", "popitem", "clear", "update",
    "setdefault", "add", "discard", "sort", "reverse", "appendleft", "extendleft",
    "popleft", "rotate", "subtract", "difference_update", "intersection_update",
    "symmetric_difference_update", "move_to_end", "__setitem__", "__delitem__",
    "__iadd__", "__ior__",
})

_FUNCTOOLS_CACHES = {"functools.lru_cache", "functools.cache"}
_CACHED_PROPERTY_NAMES = {"cached_property", "cachedproperty", "cached_attribute",
                          "lazy_property", "lazyproperty", "memoized_property", "reify"}

# Names that say "a registry of workers/processes" (SHM107).
_WORKERISH = re.compile(r"(?:^|_)(?:workers?|pids?)(?:$|_)", re.I)
# Functions that set up or reset a process (run at start, or bring state
# back to what a fresh worker has): treated like registration.
_STARTUP = re.compile(r"^_?(?:setup|install|configure|initiali[sz]e|bootstrap|reset|patch|monkeypatch)"
                      r"(?:_|$)", re.I)
# Values that are per-process resources by nature (SHM101 stays quiet on them).
_RESOURCE_CALLS = re.compile(r"(?:^|\.)(?:R?Lock|Condition|Semaphore|BoundedSemaphore|Event|local)$")
_CACHEISH = re.compile(r"cache|memo", re.I)
_SEENISH = re.compile(r"seen|sent|emitted|warned|done|visited|dedup|once", re.I)
_FLAGISH = re.compile(r"flag|feature|enabled|disabled|switch", re.I)


@dataclass
class _Binding:
    kind: str          # "container", "counter", "int", "other"
    detail: str        # "dict", "Counter", ... for containers
    line: int


def _is_main_guard(node: ast.stmt) -> bool:
    if not isinstance(node, ast.If):
        return False
    t = node.test
    if isinstance(t, ast.Compare) and len(t.ops) == 1 and isinstance(t.ops[0], ast.Eq):
        sides = [t.left, t.comparators[0]]
        names = [s for s in sides if isinstance(s, ast.Name) and s.id == "__name__"]
        consts = [s for s in sides if isinstance(s, ast.Constant) and s.value == "__main__"]
        return bool(names and consts)
    return False


def _root_name(expr: ast.expr) -> Optional[ast.Name]:
    """``x`` for ``x``, ``x[k]``, ``x[k][j]`` (not for ``x.a``)."""
    while isinstance(expr, ast.Subscript):
        expr = expr.value
    return expr if isinstance(expr, ast.Name) else None


class _Scope:
    """The names a function binds locally, and its global/nonlocal declarations."""

    def __init__(self, node: ast.AST) -> None:
        self.node = node
        self.globals: set = set()
        self.nonlocals: set = set()
        self.locals: set = set()
        args = node.args
        for a in [*getattr(args, "posonlyargs", []), *args.args, *args.kwonlyargs]:
            self.locals.add(a.arg)
        for a in (args.vararg, args.kwarg):
            if a is not None:
                self.locals.add(a.arg)
        body = node.body if isinstance(node.body, list) else [node.body]
        for child in body:
            self._collect(child)
        self.locals -= self.globals | self.nonlocals
        # Set by the checker: the function runs at import time (called or
        # used as a decorator at module level), or it is a registration
        # function (named register*, or a decorator returning its argument).
        self.import_time = False
        self.registration = False

    def _collect(self, node: ast.AST) -> None:
        if isinstance(node, ast.Global):
            self.globals.update(node.names)
        elif isinstance(node, ast.Nonlocal):
            self.nonlocals.update(node.names)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            self.locals.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for a in node.names:
                self.locals.add((a.asname or a.name).split(".")[0])
        elif isinstance(node, ast.ExceptHandler) and node.name:
            self.locals.add(node.name)
        elif type(node).__name__ in ("MatchAs", "MatchStar") and getattr(node, "name", None):
            self.locals.add(node.name)
        elif type(node).__name__ == "MatchMapping" and getattr(node, "rest", None):
            self.locals.add(node.rest)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            self.locals.add(node.name)
            for d in node.decorator_list:
                self._collect(d)
            if not isinstance(node, ast.ClassDef):
                for d in [*node.args.defaults, *node.args.kw_defaults]:
                    if d is not None:
                        self._collect(d)
            return  # its body is another scope
        if isinstance(node, ast.Lambda):
            for d in [*node.args.defaults, *node.args.kw_defaults]:
                if d is not None:
                    self._collect(d)
            return
        for child in ast.iter_child_nodes(node):
            self._collect(child)


@dataclass
class _Class:
    name: str
    node: ast.ClassDef
    containers: dict           # attr -> detail
    bases: list                # base class names (simple names only)


class _Checker:
    def __init__(self, tree: ast.Module, path: str) -> None:
        self.tree = tree
        self.path = path
        self.findings: list = []
        self.aliases: dict = {}        # local name -> dotted qualified name
        self.module: dict = {}         # module-level name -> _Binding
        self.cache_aliases: set = set()  # module names bound to lru_cache(...)/cache
        self.classes: dict = {}        # module-level class name -> _Class
        self._seen_global: set = set()  # (function node id, name) already reported
        self.import_time_calls: set = set()  # functions called or used as decorators at import
        self._registering = False        # inside a registration function (see _is_registration)

    # -- imports and qualified names --

    def qualname(self, expr: ast.expr) -> Optional[str]:
        """``collections.defaultdict`` for ``dd``, ``c.defaultdict`` ... (aliases
        followed), the builtin name for an unbound builtin, else None."""
        parts = []
        while isinstance(expr, ast.Attribute):
            parts.append(expr.attr)
            expr = expr.value
        if not isinstance(expr, ast.Name):
            return None
        root = self.aliases.get(expr.id)
        if root is None:
            if expr.id in self.module:
                return None
            root = expr.id
        return ".".join([root, *reversed(parts)])

    def _record_imports(self, node: ast.stmt) -> None:
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    self.aliases[a.asname] = a.name
                else:
                    top = a.name.split(".")[0]
                    self.aliases[top] = top
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                self.aliases[a.asname or a.name] = f"{node.module}.{a.name}"

    # -- classifying values --

    def container_kind(self, value: Optional[ast.expr]) -> Optional[str]:
        if value is None:
            return None
        for t, kind in _CONTAINER_NODES.items():
            if isinstance(value, t):
                return kind
        if isinstance(value, ast.Call):
            q = self.qualname(value.func)
            if q in _CONTAINER_CALLS:
                return _CONTAINER_CALLS[q]
        return None

    def is_counter_call(self, value: Optional[ast.expr]) -> bool:
        return isinstance(value, ast.Call) and self.qualname(value.func) == "itertools.count"

    def is_functools_cache(self, expr: ast.expr) -> bool:
        if isinstance(expr, ast.Call):
            expr = expr.func
        if isinstance(expr, ast.Name) and expr.id in self.cache_aliases:
            return True
        return self.qualname(expr) in _FUNCTOOLS_CACHES

    def is_cached_property(self, expr: ast.expr) -> bool:
        if isinstance(expr, ast.Call):
            expr = expr.func
        q = self.qualname(expr)
        if q == "functools.cached_property":
            return True
        last = expr.attr if isinstance(expr, ast.Attribute) else getattr(expr, "id", "")
        return last.lower() in _CACHED_PROPERTY_NAMES

    # -- module pass: imports, bindings, classes --

    def _module_statements(self, body: Iterable[ast.stmt]) -> Iterator[ast.stmt]:
        """Top-level statements that run at import, main guard excluded."""
        for node in body:
            if _is_main_guard(node):
                continue
            yield node
            if isinstance(node, ast.If):
                yield from self._module_statements(node.body)
                yield from self._module_statements(node.orelse)
            elif isinstance(node, ast.Try) or type(node).__name__ == "TryStar":
                yield from self._module_statements(node.body)
                for h in node.handlers:
                    yield from self._module_statements(h.body)
                yield from self._module_statements(node.orelse)
                yield from self._module_statements(node.finalbody)
            elif isinstance(node, (ast.With, ast.AsyncWith)):
                yield from self._module_statements(node.body)

    def _bind(self, target: ast.expr, value: Optional[ast.expr], line: int) -> None:
        if isinstance(target, (ast.Tuple, ast.List)):
            values = value.elts if isinstance(value, (ast.Tuple, ast.List)) and \
                len(value.elts) == len(target.elts) else [None] * len(target.elts)
            for t, v in zip(target.elts, values):
                self._bind(t, v, line)
            return
        if not isinstance(target, ast.Name):
            return
        kind = self.container_kind(value)
        old = self.module.get(target.id)
        if kind:
            self.module[target.id] = _Binding("container", kind, line)
        elif self.is_counter_call(value):
            self.module[target.id] = _Binding("counter", "itertools.count", line)
        elif isinstance(value, ast.Constant) and type(value.value) is int:
            if old is None or old.kind != "container":
                self.module[target.id] = _Binding("int", "int", line)
        elif old is None or old.kind not in ("container", "counter"):
            # A container rebound later (``x = None`` after ``x = {}``) stays a container.
            self.module[target.id] = _Binding("other", "", line)
        if value is not None and (self.is_functools_cache(value) and not
                                  (isinstance(value, ast.Call) and isinstance(value.func, ast.Call))):
            self.cache_aliases.add(target.id)

    def _collect_module(self) -> None:
        stmts = list(self._module_statements(self.tree.body))
        for node in stmts:
            self._record_imports(node)
            self._note_import_time_calls(node)
        for node in stmts:
            if isinstance(node, ast.Assign):
                for t in node.targets:
                    self._bind(t, node.value, node.lineno)
            elif isinstance(node, ast.AnnAssign) and node.value is not None:
                self._bind(node.target, node.value, node.lineno)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.module.setdefault(node.name, _Binding("other", "", node.lineno))
            elif isinstance(node, ast.ClassDef):
                self.module.setdefault(node.name, _Binding("other", "", node.lineno))
                self.classes[node.name] = self._class_info(node)

    def _note_import_time_calls(self, node: ast.stmt) -> None:
        """Remember ``f`` for ``f(...)``, ``@f`` and ``@f(...)`` run by this
        top-level statement (not inside a def or a class body's methods)."""
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for d in node.decorator_list:
                target = d.func if isinstance(d, ast.Call) else d
                if isinstance(target, ast.Name):
                    self.import_time_calls.add(target.id)
            return
        if isinstance(node, (ast.If, ast.Try, ast.With, ast.AsyncWith)):
            return  # their statements come one by one from _module_statements
        for sub in ast.walk(node):
            if isinstance(sub, ast.Call) and isinstance(sub.func, ast.Name):
                self.import_time_calls.add(sub.func.id)

    def _class_info(self, node: ast.ClassDef) -> _Class:
        containers = {}
        for stmt in node.body:
            targets, value = [], None
            if isinstance(stmt, ast.Assign):
                targets, value = stmt.targets, stmt.value
            elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
                targets, value = [stmt.target], stmt.value
            for t in targets:
                if isinstance(t, ast.Name):
                    kind = self.container_kind(value)
                    if kind:
                        containers[t.id] = kind
        bases = [b.id for b in node.bases if isinstance(b, ast.Name)]
        return _Class(node.name, node, containers, bases)

    # -- reporting --

    def report(self, node: ast.AST, code: str, symbol: str, what: str, fix: Optional[str] = None) -> None:
        rule = RULES[code]
        msg = f"{what}: {rule.why}; use {fix or rule.fix}"
        self.findings.append(Finding(self.path, node.lineno, node.col_offset + 1, code, msg, symbol))

    # -- the walk --

    def run(self) -> list:
        self._collect_module()
        for node in self.tree.body:
            if _is_main_guard(node):
                continue
            self._walk(node, [], None, at_module=True)
        self.findings.sort(key=lambda f: (f.line, f.col, f.code))
        return self.findings

    def _walk(self, node: ast.AST, stack: list, cls: Optional[_Class], at_module: bool = False) -> None:
        """Visit ``node`` with ``stack`` the enclosing function scopes (innermost
        last) and ``cls`` the class whose methods we are in, if any."""
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            self._check_decorators(node, stack, cls)
            for d in node.decorator_list:
                self._walk(d, stack, cls)
            for d in [*node.args.defaults, *node.args.kw_defaults]:
                if d is not None:
                    self._walk(d, stack, cls)
            scope = _Scope(node)
            # Not inherited: a wrapper defined inside a decorator runs at call time.
            scope.import_time = not stack and cls is None and node.name in self.import_time_calls
            scope.registration = _is_registration(node)
            inner = [*stack, scope]
            if not scope.import_time:
                self._check_globals(node, scope, inner)
            for child in node.body:
                self._walk(child, inner, cls)
            return
        if isinstance(node, ast.Lambda):
            scope = _Scope(node)
            self._walk(node.body, [*stack, scope], cls)
            return
        if isinstance(node, ast.ClassDef):
            info = self.classes.get(node.name) if not stack else None
            if info is None or info.node is not node:
                info = self._class_info(node)
            for d in [*node.decorator_list, *node.bases]:
                self._walk(d, stack, cls)
            for child in node.body:
                self._walk(child, stack, info)
            return
        if _is_main_guard(node) and at_module:
            return
        if stack:
            self._check_node(node, stack, cls)
        for child in ast.iter_child_nodes(node):
            self._walk(child, stack, cls, at_module=at_module and isinstance(node, (ast.If, ast.Try)))

    def resolves_to_module(self, name: str, stack: list) -> bool:
        """True if ``name`` used in the innermost function of ``stack`` is the
        module-level binding."""
        for scope in reversed(stack):
            if name in scope.globals:
                return True
            if name in scope.nonlocals or name in scope.locals:
                return False
        return name in self.module

    # -- checks --

    def _module_container(self, expr: ast.expr, stack: list) -> Optional[tuple]:
        root = _root_name(expr)
        if root is None or not self.resolves_to_module(root.id, stack):
            return None
        b = self.module.get(root.id)
        if b is None or b.kind != "container":
            return None
        return root.id, b.detail

    def _check_node(self, node: ast.AST, stack: list, cls: Optional[_Class]) -> None:
        func = stack[-1].node
        self._registering = stack[-1].registration or stack[-1].import_time
        where = f"in `{func.name}`" if hasattr(func, "name") else "in a lambda"
        # x[k] = v / x[k] += v / del x[k]
        targets: list = []
        how = ""
        if isinstance(node, ast.Assign):
            targets, how = node.targets, "item assignment"
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets, how = [node.target], "augmented assignment" if isinstance(node, ast.AugAssign) \
                else "item assignment"
        elif isinstance(node, ast.Delete):
            targets, how = node.targets, "del item"
        for t in targets:
            for sub in ([t] if not isinstance(t, (ast.Tuple, ast.List)) else t.elts):
                if isinstance(sub, ast.Subscript):
                    hit = self._module_container(sub, stack)
                    if hit:
                        self._container_finding(sub, hit, f"{how} {where}", node, sub)
                    else:
                        self._class_container(sub, stack, cls, f"{how} {where}")
                elif isinstance(sub, ast.Attribute) and isinstance(node, ast.AugAssign):
                    self._class_aug(node, sub, stack, cls, where)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in MUTATORS:
            recv = node.func.value
            hit = self._module_container(recv, stack)
            if hit:
                self._container_finding(node, hit, f".{node.func.attr}() {where}", node, recv)
            else:
                self._class_container(recv, stack, cls, f".{node.func.attr}() {where}", node)
        # next(counter) on a module-level itertools.count()
        if isinstance(node, ast.Call):
            target = None
            if isinstance(node.func, ast.Name) and node.func.id == "next" and node.args \
                    and not self._shadowed("next", stack):
                target = node.args[0]
            elif isinstance(node.func, ast.Attribute) and node.func.attr == "__next__":
                target = node.func.value
            if isinstance(target, ast.Name) and self.resolves_to_module(target.id, stack):
                b = self.module.get(target.id)
                if b is not None and b.kind == "counter":
                    self.report(node, "SHM106", target.id,
                                f"module-level itertools.count() `{target.id}` advanced {where}")

    def _shadowed(self, name: str, stack: list) -> bool:
        """True if a builtin's name is rebound by the module or an enclosing function."""
        return any(name in s.locals for s in stack) or name in self.module

    def _container_finding(self, node: ast.AST, hit: tuple, how: str, stmt: ast.AST,
                           target: ast.expr) -> None:
        name, detail = hit
        if self._registering or _is_reset(stmt, target) or self._stores_resource(stmt):
            return
        if _WORKERISH.search(name) or self._pid_keyed(target, stmt):
            self.report(node, "SHM107", name,
                        f"module-level {detail} `{name}` looks like a registry of workers ({how})")
            return
        if _CACHEISH.search(name):
            self.report(node, "SHM108", name, f"module-level cache {detail} `{name}` filled or "
                                              f"changed ({how})")
            return
        self.report(node, "SHM101", name, f"module-level {detail} `{name}` mutated ({how})",
                    fix=self._container_fix(name, detail, stmt))

    def _stores_resource(self, stmt: ast.AST) -> bool:
        """``locks.setdefault(name, Lock())``, ``locks[name] = threading.RLock()``."""
        values = []
        if isinstance(stmt, ast.Assign):
            values = [stmt.value]
        elif isinstance(stmt, ast.Call):
            values = stmt.args[-1:]
        return any(isinstance(v, ast.Call) and _RESOURCE_CALLS.search(self.qualname(v.func) or "")
                   for v in values)

    @staticmethod
    def _pid_keyed(target: ast.expr, stmt: ast.AST) -> bool:
        """``reg[os.getpid()] = ...``, ``reg[pid] = ...``, ``reg.add(proc.pid)``."""
        exprs = []
        if isinstance(target, ast.Subscript):
            exprs.append(target.slice)
        if isinstance(stmt, ast.Call):
            exprs.extend(stmt.args[:1])
        for e in exprs:
            for x in ast.walk(e):
                if isinstance(x, ast.Attribute) and x.attr in ("getpid", "pid"):
                    return True
                if isinstance(x, ast.Name) and x.id in ("pid", "getpid", "worker_pid"):
                    return True
        return False

    @staticmethod
    def _container_fix(name: str, detail: str, stmt: ast.AST) -> str:
        counting = detail == "Counter" or (
            isinstance(stmt, ast.AugAssign) and isinstance(stmt.op, (ast.Add, ast.Sub))
            and isinstance(stmt.target, ast.Subscript))
        if counting:
            return "shmreg.recipes.Counters or Table.update_counter"
        if detail == "set" and _SEENISH.search(name):
            return "shmreg.recipes.Deduper or Table.insert_new"
        if _FLAGISH.search(name):
            return "shmreg.recipes.Flags"
        return "a shmreg.Table"

    # class attributes (SHM105, SHM106)

    def _class_of_receiver(self, expr: ast.expr, stack: list, cls: Optional[_Class]
                           ) -> Optional[tuple]:
        """For ``cls.attr`` / ``self.__class__.attr`` / ``type(self).attr`` /
        ``ClassName.attr`` / ``self.attr``: (class info, attr, spelled)."""
        if not isinstance(expr, ast.Attribute):
            return None
        owner, attr = expr.value, expr.attr
        # ``cls``/``self`` is the first parameter of the method of ``cls`` that
        # encloses us, possibly from a nested function (a closure over it).
        first, in_method = None, False
        if cls is not None:
            for i in range(len(stack) - 1, -1, -1):
                fn = stack[i].node
                if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and fn in cls.node.body:
                    if fn.args.args and not any(
                            fn.args.args[0].arg in s.locals for s in stack[i + 1:]):
                        first, in_method = fn.args.args[0].arg, True
                    break
        if isinstance(owner, ast.Name):
            if in_method and owner.id == first and first in ("cls", "mcs", "klass", "metacls"):
                return cls, attr, f"cls.{attr}"
            if owner.id in self.classes and self.resolves_to_module(owner.id, stack):
                return self.classes[owner.id], attr, f"{owner.id}.{attr}"
        if in_method and first is not None:
            if isinstance(owner, ast.Attribute) and owner.attr == "__class__" and \
                    isinstance(owner.value, ast.Name) and owner.value.id == first:
                return cls, attr, f"{first}.__class__.{attr}"
            if isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and \
                    owner.func.id == "type" and len(owner.args) == 1 and \
                    isinstance(owner.args[0], ast.Name) and owner.args[0].id == first:
                return cls, attr, f"type({first}).{attr}"
        return None

    def _containers(self, info: _Class, depth: int = 0) -> dict:
        """Container class attributes of ``info`` and of its base classes
        defined in this module (the most derived wins)."""
        out = {}
        if depth < 10:
            for base in info.bases:
                if base in self.classes and self.classes[base] is not info:
                    out.update(self._containers(self.classes[base], depth + 1))
        out.update(info.containers)
        return out

    def _class_container(self, target: ast.expr, stack: list, cls: Optional[_Class], how: str,
                         node: Optional[ast.AST] = None) -> None:
        while isinstance(target, ast.Subscript):
            target = target.value
        got = self._class_of_receiver(target, stack, cls)
        if got is None:
            return
        info, attr, spelled = got
        containers = self._containers(info)
        if attr not in containers or self._registering:
            return
        self.report(node or target, "SHM105", f"{info.name}.{attr}",
                    f"class attribute {containers[attr]} `{info.name}.{attr}` mutated through "
                    f"`{spelled}` ({how})")

    def _class_aug(self, node: ast.AugAssign, target: ast.Attribute, stack: list,
                   cls: Optional[_Class], where: str) -> None:
        got = self._class_of_receiver(target, stack, cls)
        if got is None:
            return
        info, attr, spelled = got
        if attr in self._containers(info) and not self._registering:
            self.report(node, "SHM105", f"{info.name}.{attr}",
                        f"class attribute `{info.name}.{attr}` mutated through `{spelled}` "
                        f"(augmented assignment {where})")

    # global rebinding (SHM102, and SHM101/SHM106 for in-place forms)

    def _check_globals(self, func: ast.AST, scope: _Scope, stack: list) -> None:
        if not scope.globals:
            return
        self._registering = scope.registration or scope.import_time
        for node, name in _bindings_in(func):
            if name not in scope.globals:
                continue
            key = (id(func), name)
            b = self.module.get(name)
            where = f"in `{func.name}`"
            if isinstance(node, ast.AugAssign) and b is not None:
                if b.kind == "container":
                    self._container_finding(node, (name, b.detail), f"augmented assignment {where}",
                                            node, node.target)
                    continue
                if b.kind == "int" and isinstance(node.op, (ast.Add, ast.Sub)):
                    self.report(node, "SHM106", name,
                                f"module-level counter `{name}` incremented through `global` {where}")
                    continue
            if key in self._seen_global or _lazy_init(func, node, name) or _STARTUP.match(func.name):
                continue
            self._seen_global.add(key)
            self.report(node, "SHM102", name, f"`global {name}` rebound {where}")

    # caches (SHM103, SHM104)

    def _check_decorators(self, node: ast.AST, stack: list, cls: Optional[_Class]) -> None:
        if stack:
            return  # a cache on a nested function dies with the enclosing call
        for d in node.decorator_list:
            if self.is_functools_cache(d):
                owner = f"method `{cls.name}.{node.name}`" if cls else f"function `{node.name}`"
                self.report(d, "SHM103", node.name if not cls else f"{cls.name}.{node.name}",
                            f"functools cache on {owner}")
            elif cls is not None and self.is_cached_property(d):
                self.report(d, "SHM104", f"{cls.name}.{node.name}",
                            f"cached property `{cls.name}.{node.name}`")


def _bindings_in(func: ast.AST) -> Iterator[tuple]:
    """(statement, name) for each name that ``func`` itself binds (nested
    scopes excluded), in source order."""
    todo = list(reversed(func.body))
    while todo:
        node = todo.pop()
        names: list = []
        if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            for t in targets:
                names += [x.id for x in ast.walk(t) if isinstance(x, ast.Name)
                          and isinstance(x.ctx, (ast.Store, ast.Del))]
        elif isinstance(node, (ast.For, ast.AsyncFor)):
            names += [x.id for x in ast.walk(node.target) if isinstance(x, ast.Name)]
        elif isinstance(node, (ast.With, ast.AsyncWith)):
            for item in node.items:
                if item.optional_vars is not None:
                    names += [x.id for x in ast.walk(item.optional_vars) if isinstance(x, ast.Name)]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names += [(a.asname or a.name).split(".")[0] for a in node.names]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, ast.NamedExpr) and isinstance(node.target, ast.Name):
            names.append(node.target.id)
        for n in names:
            yield node, n
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        todo.extend(reversed(list(ast.iter_child_nodes(node))))


def _lazy_init(func: ast.AST, stmt: ast.AST, name: str) -> bool:
    """True if the function tests ``name`` against None or for truth
    (``if name is None:``, ``if not name:``, ``if name is not None: return
    name``): a value computed once on first use, the same in every worker."""
    return any(isinstance(node, ast.If) and _tests_unset(node.test, name) for node in ast.walk(func))


def _is_reset(stmt: ast.AST, target: ast.expr) -> bool:
    """``x.clear()``, ``x[:] = []``, ``del x[:]``: a reset to the state a
    fresh worker has.  Not reported on its own: a container that diverges is
    reported where it is filled, and reset-only helpers (``reset_state()``
    called at start-up or by tests) are not a source of divergence."""
    if isinstance(stmt, ast.Call) and isinstance(stmt.func, ast.Attribute):
        return stmt.func.attr == "clear" and not stmt.args
    whole = isinstance(target, ast.Subscript) and isinstance(target.slice, ast.Slice) and \
        target.slice.lower is None and target.slice.upper is None and target.slice.step is None
    if isinstance(stmt, ast.Delete):
        return whole
    if isinstance(stmt, ast.Assign):
        v = stmt.value
        return whole and isinstance(v, (ast.List, ast.Dict, ast.Set, ast.Tuple)) and \
            not getattr(v, "elts", getattr(v, "keys", None))
    return False


def _is_registration(func: ast.AST) -> bool:
    """``register*``/``unregister*`` functions, and decorators that return
    the function or class they were given (``def deco(f): REG.add(f);
    return f``): they fill registries while modules are imported."""
    if "register" in func.name.lower() or _STARTUP.match(func.name):
        return True
    params = [a.arg for a in [*getattr(func.args, "posonlyargs", []), *func.args.args]]
    last = func.body[-1] if func.body else None
    if not (isinstance(last, ast.Return) and isinstance(last.value, ast.Name)):
        return False
    # ``return f`` (its first argument), or ``def deco(f): ... return wrapper``
    # (a def of its own): a decorator, whose own body runs when it
    # decorates, at import.
    returned = last.value.id
    if params and returned == params[0]:
        return True
    return len(params) == 1 and returned in _nested_defs(func)


def _nested_defs(func: ast.AST) -> set:
    out, todo = set(), list(func.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
            continue
        if isinstance(node, ast.Lambda):
            continue
        todo.extend(ast.iter_child_nodes(node))
    return out


def _tests_unset(test: ast.expr, name: str) -> bool:
    if isinstance(test, ast.BoolOp):
        return any(_tests_unset(v, name) for v in test.values)
    if isinstance(test, ast.Name):
        return test.id == name
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        return isinstance(test.operand, ast.Name) and test.operand.id == name
    if isinstance(test, ast.Compare) and len(test.ops) == 1 and \
            isinstance(test.ops[0], (ast.Is, ast.Eq, ast.IsNot, ast.NotEq)):
        sides = [test.left, test.comparators[0]]
        return (any(isinstance(s, ast.Name) and s.id == name for s in sides)
                and any(isinstance(s, ast.Constant) and s.value is None for s in sides))
    return False


def check_tree(tree: ast.Module, path: str = "<string>") -> list:
    """Every finding of every rule in a parsed module, sorted by position
    (no selection, no ``noqa`` applied)."""
    return _Checker(tree, path).run()
