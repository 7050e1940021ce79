"""``shmreg lint``: find per-process state that silently diverges across
prefork workers.

Every gunicorn, uWSGI, Celery or multiprocessing worker gets its own copy
of module-level and class-level state.  When a worker mutates that state at
run time (a module dict filled by a view, a ``global`` rebound, an
``lru_cache``, a class-level registry), the workers drift apart without an
error.  The checker reads the source with :mod:`ast` (nothing is imported
or run) and reports each such place with a code (``SHM1xx``), the reason
and the shmreg object that replaces it.

>>> from shmreg.lint import lint_source
>>> src = '''
... hits = {}
... def view(path):
...     hits[path] = hits.get(path, 0) + 1
... '''
>>> [(f.code, f.line, f.symbol) for f in lint_source(src)]
[('SHM101', 4, 'hits')]

Entry points: ``shmreg lint PATH...`` (the command line), the flake8
plugin :class:`shmreg.lint.flake8_plugin.Plugin`, and :func:`lint_paths` /
:func:`lint_source` here.  See ``docs/lint.md``.
"""

from shmreg.lint.checker import Finding, check_tree
from shmreg.lint.config import Config, ConfigError, load_config
from shmreg.lint.rules import DEFAULT_CODES, RULES, Rule
from shmreg.lint.runner import Result, is_test_file, lint_paths, lint_source

__all__ = ["lint_paths", "lint_source", "check_tree", "Finding", "Result", "Rule", "RULES",
           "DEFAULT_CODES", "Config", "ConfigError", "load_config", "is_test_file"]
