"""Single-process operation cost: shmreg against a dict, py-lmdb and Redis.

One pytest-benchmark group per operation, so each group's table puts the
backends side by side.  Every benchmarked call runs 1,000 operations on the
same 1,000 keys for every backend: **times are per 1,000 ops** (N us per
call = N ns per operation).  ``extra_info`` carries ``ops_per_call`` and the
resulting ``ns_per_op`` (min and median); the terminal summary at the end
prints ns/op and the ratios.
"""

from __future__ import annotations

import pytest

import _bench_common as bc


@pytest.fixture(params=bc.BACKENDS)
def backend(request):
    """``(name, store)`` of one backend, loaded with the data set."""
    name = request.param
    return name, request.getfixturevalue(f"{name}_store")


_checked: set = set()


def _bench(benchmark, backend, op, dataset):
    name, store = backend
    if name not in _checked:
        # Once per backend, before any timing: the loops do what they claim.
        bc.check_backend(name, store, dataset)
        _checked.add(name)
    # LMDB: the get loops reuse one read transaction; none is open while the
    # write loops run (an open reader pins old pages and bloats the file).
    txn = store.begin() if name == "lmdb" and op.startswith("get") else None
    try:
        loops = bc.backend_loops(name, store, dataset, txn)
        benchmark.group = f"{op} (time per 1000 ops)"
        benchmark.extra_info.update(ops_per_call=bc.OPS, unit="time per call = time per 1000 ops",
                                    backend=name, operation=op, entries=bc.N_ENTRIES,
                                    key_bytes=bc.KEY_LEN, value_bytes=bc.VALUE_LEN)
        benchmark(loops[op])
    finally:
        if txn is not None:
            txn.abort()
    st = benchmark.stats.stats if benchmark.stats else None
    if st is not None and st.rounds:
        benchmark.extra_info["ns_per_op_min"] = st.min / bc.OPS * 1e9
        benchmark.extra_info["ns_per_op_median"] = st.median / bc.OPS * 1e9
        bc.RESULTS[(op, name)] = st.median / bc.OPS * 1e9


def test_get_hit_x1000(benchmark, backend, dataset):
    _bench(benchmark, backend, "get-hit", dataset)


def test_get_miss_x1000(benchmark, backend, dataset):
    _bench(benchmark, backend, "get-miss", dataset)


def test_set_x1000(benchmark, backend, dataset):
    _bench(benchmark, backend, "set", dataset)


def test_update_counter_x1000(benchmark, backend, dataset):
    _bench(benchmark, backend, "update_counter", dataset)
