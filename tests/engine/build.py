#!/usr/bin/env python3
"""Build the engine's C tests: unit tests, corpus replays and fuzzers.

    python tests/engine/build.py [--out DIR] [--cc CC] [--fuzzers] [--run]

Every target is built under ASan + UBSan (no recovery), from the engine
sources in src/shmreg/engine/ and the tests in tests/engine/:

- ``unit``: the C unit tests (tests/engine/unit/*.c), run with no argument
  or a name filter;
- ``replay_<name>``: each fuzz target with a plain main() that runs every
  file (or every file of every directory) given: the seed corpus and the
  regression inputs (built with ``cc``, no libFuzzer needed);
- ``fuzz_<name>`` (``--fuzzers``, needs clang with libFuzzer): the
  coverage-guided fuzzers.

``--run`` runs the unit tests and replays the corpus afterwards (what
tests/test_engine_c.py does).  Also checks that every engine header
compiles on its own.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
ENGINE = ROOT / "src" / "shmreg" / "engine"
FUZZ_TARGETS = ("ops", "segment", "crash")

WARN = ["-std=c11", "-Wall", "-Wextra", "-Werror"]
SAN = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
OPT = ["-g", "-O1"]


def engine_sources() -> list[Path]:
    return sorted(ENGINE.glob("*.c"))


def corpus_dirs(name: str) -> list[Path]:
    """The seed corpus and the regression inputs of fuzz target ``name``."""
    return [HERE / "corpus" / name, HERE / "regress" / name]


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"build failed: {shlex.join(cmd)}\n{proc.stdout}{proc.stderr}")


def header_checks(cc: str) -> list[list[str]]:
    """One command per engine header: it must compile on its own."""
    return [[cc, *WARN, "-fsyntax-only", "-I", str(ENGINE), "-x", "c", "-include", str(h), "/dev/null"]
            for h in sorted(ENGINE.glob("*.h"))]


def build(out: Path, cc: str = "cc", fuzzers: bool = False, clang: str = "clang",
          jobs: int = 2) -> dict[str, Path]:
    """Build everything into ``out``; returns {target name: binary path}."""
    out.mkdir(parents=True, exist_ok=True)
    inc = ["-I", str(ENGINE), "-I", str(HERE)]
    flags = WARN + SAN + OPT + inc
    objdir = out / "obj"
    objdir.mkdir(exist_ok=True)
    compiles: list[list[str]] = header_checks(cc)
    objs = []
    for src in engine_sources():
        obj = objdir / (src.stem + ".o")
        objs.append(obj)
        compiles.append([cc, *flags, "-c", str(src), "-o", str(obj)])
    with concurrent.futures.ThreadPoolExecutor(jobs) as ex:
        list(ex.map(_run, compiles))
    links: list[list[str]] = []
    targets: dict[str, Path] = {}
    unit = out / "unit"
    links.append([cc, *flags, "-o", str(unit), *map(str, sorted((HERE / "unit").glob("*.c"))),
                  *map(str, objs), "-lpthread", "-lm"])
    targets["unit"] = unit
    for name in FUZZ_TARGETS:
        exe = out / f"replay_{name}"
        links.append([cc, *flags, "-o", str(exe), str(HERE / "fuzz" / f"fuzz_{name}.c"),
                      str(HERE / "fuzz" / "replay_main.c"), *map(str, objs), "-lpthread", "-lm"])
        targets[f"replay_{name}"] = exe
    if fuzzers:
        # The engine is compiled once with coverage instrumentation, then
        # linked into each target with libFuzzer's main().
        san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
        fobjs = []
        fcompiles = []
        for src in engine_sources():
            obj = objdir / (src.stem + ".fuzz.o")
            fobjs.append(obj)
            fcompiles.append([clang, *WARN, *san, "-fsanitize=fuzzer-no-link", *OPT, *inc,
                              "-c", str(src), "-o", str(obj)])
        with concurrent.futures.ThreadPoolExecutor(jobs) as ex:
            list(ex.map(_run, fcompiles))
        for name in FUZZ_TARGETS:
            exe = out / f"fuzz_{name}"
            links.append([clang, *WARN, *san, "-fsanitize=fuzzer", *OPT, *inc, "-o", str(exe),
                          str(HERE / "fuzz" / f"fuzz_{name}.c"), *map(str, fobjs), "-lpthread", "-lm"])
            targets[f"fuzz_{name}"] = exe
    with concurrent.futures.ThreadPoolExecutor(jobs) as ex:
        list(ex.map(_run, links))
    return targets


def run_all(targets: dict[str, Path], timeout: float = 120) -> int:
    """Run the unit tests and every corpus replay; the number that failed."""
    failed = 0
    runs = [[str(targets["unit"])]]
    for name in FUZZ_TARGETS:
        runs.append([str(targets[f"replay_{name}"]), *map(str, corpus_dirs(name))])
    for cmd in runs:
        print("$", shlex.join(cmd), flush=True)
        rc = subprocess.run(cmd, timeout=timeout).returncode
        if rc != 0:
            print(f"exit {rc}", flush=True)
            failed += 1
    return failed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "build" / "engine-tests"), help="build directory")
    ap.add_argument("--cc", default=os.environ.get("CC", "cc"), help="C compiler for unit tests and replays")
    ap.add_argument("--clang", default="clang", help="clang for the libFuzzer targets")
    ap.add_argument("--fuzzers", action="store_true", help="also build the libFuzzer targets (clang)")
    ap.add_argument("--run", action="store_true", help="run the unit tests and the corpus replays")
    ap.add_argument("-j", "--jobs", type=int, default=2)
    args = ap.parse_args(argv)
    targets = build(Path(args.out), args.cc, args.fuzzers, args.clang, args.jobs)
    for name, path in targets.items():
        print(f"{name}: {path}")
    if args.run:
        return 1 if run_all(targets) else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
