"""A multiprocessing job run over two shared tables that never outlive it.

    python examples/pool_jobs.py

``shmreg.temporary`` tables are unlinked when the block exits, even on an
exception; if the script is killed (``kill -9``) they are left behind as
orphans that ``shmreg ls`` marks and ``shmreg clean`` removes.
"""

from __future__ import annotations

import functools
import multiprocessing

import shmreg
import shmreg.mp


def square(results_name: str, n: int) -> int:
    shmreg.mp.table().update_counter("done")           # the first table attached: progress
    shmreg.mp.table(results_name)[n] = n * n           # any attached table, by name
    return n


def main() -> int:
    with shmreg.temporary("progress", capacity=16) as progress, \
            shmreg.temporary("results", capacity=10_000) as results:
        with multiprocessing.Pool(4, **shmreg.mp.pool_kwargs(progress.name, results.name)) as pool:
            pool.map(functools.partial(square, results.name), range(1000))
        total: int = sum(v for _, v in results.items())
        print(f"{progress['done']} jobs, sum of squares {total}")
        return total


if __name__ == "__main__":
    main()
