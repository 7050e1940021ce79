#!/usr/bin/env python
"""Re-run the precision measurement of ``shmreg lint`` (docs/lint.md).

    python -m venv /tmp/lintprec
    /tmp/lintprec/bin/pip install Django Flask requests celery click jinja2
    python benchmarks/lint_precision.py /tmp/lintprec/lib/python3.*/site-packages

Runs every rule over the packages below (test files excluded, as by
default), prints the findings per rule and package, and the precision of
the judged sample in ``benchmarks/lint_precision.csv`` (``diverges`` and
``matters`` columns, method in docs/lint.md).  Findings of the run that the
CSV does not judge are listed, so a changed rule shows what to re-judge.
Not part of the test run (it needs the packages installed).
"""

from __future__ import annotations

import collections
import csv
import os
import sys

from shmreg.lint import lint_paths
from shmreg.lint.rules import RULES

PACKAGES = ["django", "flask", "requests", "celery", "click", "jinja2", "kombu", "werkzeug", "billiard"]
CSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lint_precision.csv")


def main(argv: list) -> int:
    if len(argv) != 1 or not os.path.isdir(argv[0]):
        print(__doc__, file=sys.stderr)
        return 2
    os.chdir(argv[0])
    present = [p for p in PACKAGES if os.path.isdir(p)]
    result = lint_paths(present, select=["SHM"], use_config=False)
    counts = collections.Counter((f.code, f.path.split(os.sep)[0]) for f in result.findings)
    with open(CSV, newline="") as fh:
        rows = list(csv.DictReader(fh))
    judged = {(r["code"], r["path"], int(r["line"]), r["symbol"]) for r in rows}
    print(f"{result.files} files in {', '.join(present)}\n")
    print("| rule | default | " + " | ".join(present) + " | total | judged | diverges | matters |")
    print("|---" * (len(present) + 6) + "|")
    for code, rule in RULES.items():
        total = sum(counts[(code, p)] for p in present)
        mine = [r for r in rows if r["code"] == code]
        div = sum(r["diverges"] == "yes" for r in mine)
        mat = sum(r["matters"] == "yes" for r in mine)
        pct = (lambda k: f"{k}/{len(mine)} ({k / len(mine):.0%})") if mine else (lambda k: "n/a")
        print(f"| {code} | {'on' if rule.default else 'off'} | "
              + " | ".join(str(counts[(code, p)]) for p in present)
              + f" | {total} | {len(mine)} | {pct(div)} | {pct(mat)} |")
    unjudged = [f for f in result.findings
                if (f.code, f.path, f.line, f.symbol) not in judged
                and sum(1 for r in rows if r["code"] == f.code) < min(30, sum(counts[(f.code, p)] for p in present))]
    if unjudged:
        print("\nnot judged yet:")
        for f in unjudged:
            print(f"  {f.path}:{f.line}: {f.code} {f.symbol}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
