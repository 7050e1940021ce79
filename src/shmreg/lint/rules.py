"""The rule table of ``shmreg lint``: one code per kind of per-process state.

Each rule says what it finds, why that state diverges across prefork
workers, which shmreg object replaces it, and whether it is on by default.
A rule is on by default only if its measured precision on real code bases
is at least 80% (see ``docs/lint.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Rule", "RULES", "DEFAULT_CODES", "PREFIX"]

#: Every code starts with this prefix (the flake8 plugin's code prefix).
PREFIX = "SHM"


@dataclass(frozen=True)
class Rule:
    """One check: its ``code`` (``SHM1xx``), a short ``name``, what it finds
    (``title``), why that diverges across workers (``why``), the shmreg
    replacement (``fix``) and whether it runs without ``--select``."""

    code: str
    name: str
    title: str
    why: str
    fix: str
    default: bool


_EACH_WORKER = "each worker process mutates its own copy, so workers drift apart without an error"

RULES: dict = {r.code: r for r in (
    Rule("SHM101", "module-container-mutated",
         "module-level dict/list/set/Counter/defaultdict/deque mutated inside a function",
         _EACH_WORKER,
         "shmreg.Table (shmreg.recipes.Counters for counts, "
         "shmreg.recipes.Deduper for a seen-set, shmreg.recipes.Flags for switches)",
         True),
    Rule("SHM102", "global-rebound",
         "a `global` name rebound inside a function",
         "the new value exists only in the worker that ran the function; "
         "the other workers keep the old one",
         "a key in a shmreg.Table (shmreg.recipes.Flags for an on/off switch)",
         False),
    Rule("SHM103", "functools-cache",
         "functools.cache / lru_cache on a module-level function or a method",
         "every worker fills and invalidates its own cache: cache_clear() in one "
         "worker leaves stale results in the others, and each computes every value itself",
         "shmreg.Cache(...).memoize(ttl=...): one cache for all workers, with single flight",
         False),
    Rule("SHM104", "cached-property",
         "cached_property-like per-instance cache",
         "the cached value lives in one worker's instance; other workers compute "
         "and keep their own, and none sees another's invalidation",
         "shmreg.Cache.get_or_set keyed by the instance's identity",
         False),
    Rule("SHM105", "class-container-mutated",
         "class attribute holding a mutable container mutated through "
         "cls / self.__class__ / type(self) / ClassName / self",
         "class attributes are module state too: " + _EACH_WORKER,
         "shmreg.Table (shmreg.Registry if it tracks live objects or processes)",
         True),
    Rule("SHM106", "module-counter",
         "module-level counter: itertools.count() advanced, or an int incremented "
         "through `global` (or a class-level int through cls/ClassName)",
         "each worker counts on its own, so ids repeat across workers and totals "
         "are per worker",
         "Table.update_counter or shmreg.recipes.Counters",
         True),
    Rule("SHM107", "worker-registry",
         "module-level registry of workers/processes (keyed by pid or named after "
         "workers/processes/children) filled inside a function",
         "a worker sees only the registrations it made itself, and entries of "
         "dead workers are never removed",
         "shmreg.Registry (entries owned by the registering worker, gone when it "
         "dies) or shmreg.recipes.Scoreboard",
         True),
    Rule("SHM108", "module-cache-filled",
         "module-level dict/list/... named like a cache (`*cache*`, `*memo*`) filled or "
         "changed inside a function",
         "each worker fills its own copy and an invalidation reaches only the worker "
         "that made it, so the others serve stale entries",
         "shmreg.Cache (get_or_set, memoize, delete): one cache for all workers",
         False),
)}

#: The codes that run when no ``select`` is given.
DEFAULT_CODES = tuple(code for code, rule in RULES.items() if rule.default)
