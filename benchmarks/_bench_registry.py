"""Shared setup for the registry benchmarks (pytest suite and report.py).

**Reap latency.**  How long after a ``SIGKILL`` the entries of an owner
process are gone.  Each round kills one owner child and times, with
``time.perf_counter`` in a polling loop, from just before ``os.kill`` until

- *invisible*: ``Registry.lookup`` of one of its keys returns None (no
  watcher needed: every read checks the owner's liveness), and
- *gone*: the table's owned-entry count (``stats()['owned']``, read here as
  the ``_shard_stats()`` sum it is made of, which is cheaper) has dropped by
  the child's entries, i.e. a watcher has deleted them (memory freed).

Starting a Python process takes ~50 ms, so the owner children come from a
pool: a *zygote* process (``shmreg`` imported, the registry open, no owner
slot of its own) forks them on request.  Each forked child registers
``REG_KEYS`` keys with :meth:`Registry.register` and writes ``OWNED_KEYS``
entries with ``set(..., owned=True)``, reports ``"<index> <pid>"`` and blocks
reading a pipe, until it is killed.  They are ordinary processes with their
own owner slot (claimed after the fork), so their death is what any owner's
death is.  The zygote ignores ``SIGCHLD``, so the kernel reaps the killed
children (no zombies); when the zygote exits the pipe reaches EOF and any
child still alive exits too.

Scenarios (``REAP_SCENARIOS``):

- ``no watcher``: only *invisible* (the entries stay until someone reaps
  them: the round then calls ``t.reap(pid)`` and checks it deleted all 4);
- ``watcher process``: ``shmreg watch NAME`` (the CLI, a process of its own,
  printing each death to /dev/null);
- ``watcher thread``: a :class:`shmreg.Watcher` thread in the measuring
  process (``with Watcher(name): run_the_app()``), whose polling loop sleeps
  50 us between checks, like an application that does I/O;
- ``watcher thread, busy poller``: the same, but the polling loop never
  sleeps: a CPU-bound Python main thread holds the GIL, so the watcher thread
  waits the 5 ms switch interval each time it needs it back.

Every round also records *exited*: when a pidfd of the child (opened before
the kill) turns readable, i.e. when the kernel reports the process gone.  An
owner's entries turn invisible before that (its liveness mutex is marked
OWNER_DIED as its threads exit, earlier in the exit path).

**Lookup cost.**  One registry table (capacity ``LOOKUP_CAPACITY``) holding,
with the same 16-byte keys and 64-byte values: 1,000 registrations of this
process, 1,000 plain (unowned) entries, 1,000 registrations of another live
process that registered itself, and 1,000 registrations made for a live
process by ``register(..., pid=...)`` (a "foreign" owner: its liveness is a
``poll()`` of a cached pidfd, one syscall per read, instead of one load of
its liveness mutex word).  Each timed call does 1,000 reads.
"""

from __future__ import annotations

import math
import os
import select
import selectors
import signal
import subprocess
import sys
import time

import shmreg
from shmreg import Registry

import _bench_common as bc

REAP_ROUNDS = 100           # deaths per scenario
REG_KEYS = 2                # Registry.register keys per owner child
OWNED_KEYS = 2              # t.set(..., owned=True) entries per owner child
ENTRIES_PER_CHILD = REG_KEYS + OWNED_KEYS
SPAWN_BATCH = 25            # children forked per request to the zygote
ROUND_TIMEOUT = 5.0         # seconds a round may take before it counts as a failure
REAP_TARGET_P99_MS = 50.0
THREAD_POLL_SLEEP = 50e-6   # the watcher-thread scenario's poll loop sleeps this long

LOOKUP_CAPACITY = 10_000
LOOKUP_TARGET_RATIO = 1.2   # owned t.get vs unowned t.get

#: Filled in by the pytest benchmarks (the terminal summary prints them):
#: ``REAP[scenario] -> latency summary``, ``LOOKUP[op] -> ns/op`` (median),
#: ``LOOKUP_MIN[op] -> ns/op`` (fastest call).
REAP: dict = {}
LOOKUP: dict = {}
LOOKUP_MIN: dict = {}

HAVE_PIDFD = hasattr(os, "pidfd_open")


def _never(timeout: float) -> bool:
    return False


REAP_SCENARIOS = ("no watcher", "watcher process", "watcher thread", "watcher thread, busy poller")

_ZYGOTE = r"""
import os, signal, sys
from shmreg import Registry
name, nreg, nown = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
reg = Registry(name)
t = reg.table
signal.signal(signal.SIGCHLD, signal.SIG_IGN)     # killed children are reaped by the kernel
hold_r, hold_w = os.pipe()                        # children block reading hold_r
out = sys.stdout.fileno()
os.write(out, b"zygote %d\n" % os.getpid())
for line in sys.stdin:
    start, count = map(int, line.split())
    for idx in range(start, start + count):
        if os.fork():
            continue
        code = 1
        try:
            os.close(hold_w)
            for j in range(nreg):
                reg.register(f"reap:{idx}:reg{j}", ("worker", idx, j))
            for j in range(nown):
                t.set(f"reap:{idx}:own{j}", b"v" * 64, owned=True)
            os.write(out, b"%d %d\n" % (idx, os.getpid()))
            os.read(hold_r, 1)                    # until killed, or EOF when the zygote exits
            code = 0
        except BaseException as e:
            try:
                os.write(out, f"error {idx} {e!r}\n".encode())
            except BaseException:
                pass
        finally:
            os._exit(code)
"""


class _Lines:
    """Line reader on a pipe with a timeout (raw fd reads: no hidden buffer)."""

    def __init__(self, f) -> None:
        self.fd = f.fileno()
        self.buf = b""
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.fd, selectors.EVENT_READ)

    def readline(self, timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sel.select(left):
                raise RuntimeError(f"{what}: nothing within {timeout} s")
            chunk = os.read(self.fd, 65536)
            if not chunk:
                raise RuntimeError(f"{what}: pipe closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def close(self) -> None:
        self.sel.close()


class OwnerPool:
    """Pre-started owner children forked by a zygote (see the module doc)."""

    def __init__(self, registry_name: str, timeout: float = 30.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _ZYGOTE, registry_name, str(REG_KEYS), str(OWNED_KEYS)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines = _Lines(self.proc.stdout)
        self.next_index = 0
        try:
            first = self.lines.readline(timeout, "zygote start")
            if not first.startswith("zygote "):
                raise RuntimeError(f"zygote said {first!r}")
        except BaseException:
            self.close()
            raise

    def spawn(self, count: int, timeout: float = 30.0) -> list:
        """Fork ``count`` owner children; ``[(index, pid), ...]`` once all are
        registered and blocked."""
        out = []
        while len(out) < count:
            n = min(SPAWN_BATCH, count - len(out))
            start = self.next_index
            self.next_index += n
            self.proc.stdin.write(b"%d %d\n" % (start, n))
            self.proc.stdin.flush()
            for _ in range(n):
                line = self.lines.readline(timeout, "owner child ready")
                if line.startswith("error"):
                    raise RuntimeError(f"owner child failed: {line}")
                idx, pid = map(int, line.split())
                out.append((idx, pid))
        return sorted(out)

    def close(self, timeout: float = 10.0) -> None:
        """Close the zygote's stdin: it exits, its pipe closes, the children exit."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None and not f.closed:
                f.close()
        self.lines.close()


def percentiles(samples: list) -> dict:
    """p50/p95/p99/max (nearest rank) and mean of ``samples`` (seconds), in ms."""
    s = sorted(samples)
    n = len(s)

    def rank(p: float) -> float:
        return s[max(0, math.ceil(p / 100 * n) - 1)] * 1e3

    return {"n": n, "p50_ms": rank(50), "p95_ms": rank(95), "p99_ms": rank(99),
            "max_ms": s[-1] * 1e3, "min_ms": s[0] * 1e3, "mean_ms": sum(s) / n * 1e3}


def _owned(t) -> int:
    return t._shard_stats()["owned"]


def _start_watcher_process(name: str, t, timeout: float = 30.0) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-m", "shmreg", "watch", name],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while t.stats()["watcher_pid"] != p.pid:
        if p.poll() is not None:
            raise RuntimeError(f"shmreg watch exited with {p.returncode}: {p.stderr.read()!r}")
        if time.monotonic() > deadline:
            p.kill()
            p.wait(timeout=10)
            raise RuntimeError(f"shmreg watch did not become active within {timeout} s")
        time.sleep(0.01)
    return p


def _stop_watcher_process(p: subprocess.Popen, timeout: float = 10.0) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=timeout)
    p.stderr.close()


def reap_latency(scenario: str, rounds: int = REAP_ROUNDS) -> dict:
    """Kill ``rounds`` owner children one by one under ``scenario`` (one of
    ``REAP_SCENARIOS``) on a fresh registry table; latency summaries (ms) of
    *invisible* and, with a watcher, *gone* (see the module doc)."""
    if scenario not in REAP_SCENARIOS:
        raise ValueError(scenario)
    name = bc.unique_table_name("reap")
    reg = Registry(name)
    t = reg.table
    capacity = t.capacity
    pool = watcher_proc = watcher = None
    invisible, gone, exited, failures = [], [], [], []
    reaped_by_hand = 0
    try:
        pool = OwnerPool(name)
        children = pool.spawn(rounds)
        assert _owned(t) == rounds * ENTRIES_PER_CHILD, _owned(t)
        if scenario == "watcher process":
            watcher_proc = _start_watcher_process(name, t)
        elif scenario.startswith("watcher thread"):
            deaths = []
            watcher = shmreg.Watcher(name, on_death=lambda pid, entries: deaths.append((pid, len(entries))))
            watcher.start()
            if not watcher.wait_active(30):
                raise RuntimeError("in-process watcher did not become active")
        # Let the watcher open a pidfd for every child (it rescans every 50 ms).
        time.sleep(0.2)
        lookup, perf, kill = reg.lookup, time.perf_counter, os.kill
        pause = THREAD_POLL_SLEEP if scenario == "watcher thread" else 0   # 0: never sleeps
        sleep = time.sleep
        for idx, pid in children:
            key = f"reap:{idx}:reg0"
            reg_now = reg.lookup(key)
            assert reg_now is not None and reg_now.pid == pid, (idx, pid, reg_now)
            before = _owned(t)
            target = before - ENTRIES_PER_CHILD
            # The kernel's own "it has exited" (pidfd readable), as a reference
            # (Linux only: elsewhere *exited* is not measured).
            pidfd = os.pidfd_open(pid) if HAVE_PIDFD else -1
            if HAVE_PIDFD:
                exit_poll = select.poll()
                exit_poll.register(pidfd, select.POLLIN)
                ready = exit_poll.poll
            else:
                ready = _never
            inv = ext = None
            try:
                t0 = perf()
                kill(pid, signal.SIGKILL)
                while True:
                    if inv is None and lookup(key) is None:
                        inv = perf() - t0
                    if ext is None and ready(0):
                        ext = perf() - t0
                    if scenario == "no watcher":
                        if inv is not None and (ext is not None or not HAVE_PIDFD):
                            break
                    elif _owned(t) <= target:
                        g = perf() - t0
                        gone.append(g)
                        if inv is None and lookup(key) is None:
                            inv = g     # reaped between our two checks: invisible by then
                        break
                    if perf() - t0 > ROUND_TIMEOUT:
                        failures.append((idx, pid, "timeout", inv, ext, _owned(t), target))
                        break
                    if pause:
                        sleep(pause)
                # Reaped before the pidfd turned readable: wait for the exit still.
                while HAVE_PIDFD and ext is None and perf() - t0 < ROUND_TIMEOUT:
                    if ready(0):
                        ext = perf() - t0
            finally:
                if HAVE_PIDFD:
                    os.close(pidfd)
            if inv is None:
                failures.append((idx, pid, "still visible"))
            else:
                invisible.append(inv)
            if ext is not None:
                exited.append(ext)
            for j in range(REG_KEYS):
                if reg.lookup(f"reap:{idx}:reg{j}") is not None:
                    failures.append((idx, pid, f"reg{j} visible after the round"))
            if scenario == "no watcher":
                # Invisible is not gone: the entries are still there until reaped.
                n = t.reap(pid)
                reaped_by_hand += n
                if n != ENTRIES_PER_CHILD:
                    failures.append((idx, pid, f"reap() deleted {n}, expected {ENTRIES_PER_CHILD}"))
        leftover = _owned(t)
        t.check()
    finally:
        if watcher is not None:
            watcher.stop()
            watcher.table.close()
        if watcher_proc is not None:
            _stop_watcher_process(watcher_proc)
        if pool is not None:
            pool.close()
        reg.close()
        try:
            shmreg.unlink(name)
        except shmreg.TableNotFoundError:
            pass
    out = {"scenario": scenario, "rounds": rounds, "entries_per_child": ENTRIES_PER_CHILD,
           "capacity": capacity, "failures": failures,
           "owned_left": leftover, "cpus": os.cpu_count()}
    if exited:
        out["exited"] = percentiles(exited)
    if invisible:
        out["invisible"] = percentiles(invisible)
    if gone:
        out["gone"] = percentiles(gone)
        out["target_p99_ms"] = REAP_TARGET_P99_MS
        out["meets_target"] = not failures and out["gone"]["p99_ms"] < REAP_TARGET_P99_MS
    if scenario == "no watcher":
        out["reaped_by_hand"] = reaped_by_hand
    if watcher is not None:
        out["watcher_reaped_processes"] = watcher.reaped_processes
        out["watcher_reaped_entries"] = watcher.reaped_entries
        if any(n != ENTRIES_PER_CHILD for _, n in deaths):
            failures.append(("on_death saw", deaths))
    return out


# -- lookup cost ---------------------------------------------------------------

#: op id -> what it times (each timed call: 1,000 of them on 1,000 keys)
LOOKUP_OPS = {
    "get-unowned": "t.get, unowned entry (the baseline)",
    "get-owned": "t.get, entry owned by this process",
    "get-owned-other": "t.get, entry owned by another live process",
    "get-owned-pid": "t.get, entry registered with register(pid=) (pidfd poll)",
    "lookup": "Registry.lookup, own registration",
    "whereis": "Registry.whereis, own registration",
}

_OTHER_OWNER = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
import _bench_common as bc
from shmreg import Registry
import random
reg = Registry(sys.argv[2])
rng = random.Random(int(sys.argv[3]))
for i in range(bc.OPS):
    reg.register(bc._key(b"reg-other", i), rng.randbytes(bc.VALUE_LEN))
print("ready", os.getpid(), flush=True)
sys.stdin.read()                      # until the benchmark closes our stdin
"""

_SLEEPER = "import sys; print('ready', flush=True); sys.stdin.read()"


class LookupBench:
    """The lookup-cost registry table (see the module doc); ``close()`` stops
    the two helper processes and unlinks the table."""

    def __init__(self, timeout: float = 30.0) -> None:
        import random
        rng = random.Random(bc.SEED)
        self.name = bc.unique_table_name("reglookup")
        self.reg = Registry(self.name, capacity=LOOKUP_CAPACITY)
        self.t = self.reg.table
        self.procs: list = []
        try:
            self.keys = {tag: [bc._key(tag.encode(), i) for i in range(bc.OPS)]
                         for tag in ("reg-self", "plain", "reg-other", "reg-pid")}
            vals = lambda: [rng.randbytes(bc.VALUE_LEN) for _ in range(bc.OPS)]  # noqa: E731
            for k, v in zip(self.keys["reg-self"], vals()):
                self.reg.register(k, v)
            for k, v in zip(self.keys["plain"], vals()):
                self.t[k] = v
            here = os.path.dirname(os.path.abspath(__file__))
            self.other = self._start([sys.executable, "-c", _OTHER_OWNER, here, self.name, str(bc.SEED)],
                                     timeout)
            self.sleeper = self._start([sys.executable, "-c", _SLEEPER], timeout)
            for k, v in zip(self.keys["reg-pid"], vals()):
                self.reg.register(k, v, pid=self.sleeper.pid)
            assert len(self.t) == 4 * bc.OPS, len(self.t)
        except BaseException:
            self.close()
            raise

    def _start(self, argv: list, timeout: float) -> subprocess.Popen:
        p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.procs.append(p)
        lines = _Lines(p.stdout)
        try:
            line = lines.readline(timeout, "helper process ready")
        finally:
            lines.close()
        if not line.startswith("ready"):
            raise RuntimeError(f"helper process said {line!r}")
        return p

    def loops(self) -> dict:
        """op id -> zero-argument function doing ``bc.OPS`` reads."""
        get, lookup, whereis = self.t.get, self.reg.lookup, self.reg.whereis
        own, plain, other, bypid = (self.keys[k] for k in ("reg-self", "plain", "reg-other", "reg-pid"))

        def loop(fn, keys):
            def run():
                for k in keys:
                    fn(k)
            return run

        return {"get-unowned": loop(get, plain), "get-owned": loop(get, own),
                "get-owned-other": loop(get, other), "get-owned-pid": loop(get, bypid),
                "lookup": loop(lookup, own), "whereis": loop(whereis, own)}

    def check(self) -> None:
        """Every loop's keys read back as what they claim to be (so a broken
        loop cannot produce a fast number)."""
        me, t = os.getpid(), self.t
        for k in self.keys["plain"]:
            assert t.get(k) is not None and t.owner(k) is None, k
        for tag, pid in (("reg-self", me), ("reg-other", self.other.pid), ("reg-pid", self.sleeper.pid)):
            for k in self.keys[tag]:
                r = self.reg.lookup(k)
                assert r is not None and r.pid == pid and t.get(k) == r.value, (tag, k, r)
        assert self.reg.whereis(self.keys["reg-self"][0]) == me
        kinds = {p["pid"]: p["kind"] for p in t._proc_table()}
        assert kinds == {me: "self", self.other.pid: "self", self.sleeper.pid: "pid"}, kinds

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.stdin.close()
                except OSError:
                    pass
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=10)
            for f in (p.stdin, p.stdout, p.stderr):
                if not f.closed:
                    f.close()
        self.procs.clear()
        self.reg.close()      # stays mapped: this process owns entries in it
        try:
            shmreg.unlink(self.name)
        except shmreg.TableNotFoundError:
            pass


def lookup_ratios(ns: dict) -> dict:
    """op id -> ns/op over ``get-unowned`` ns/op."""
    base = ns.get("get-unowned")
    return {op: v / base for op, v in ns.items()} if base else {}


# -- formatting ----------------------------------------------------------------

def _ms(d: dict | None, field: str) -> str:
    return "-" if d is None else f"{d[field]:.2f}"


def markdown_reap_table(results: dict) -> str:
    """``results[scenario] -> reap_latency() dict`` as Markdown (ms)."""
    lines = ["| scenario | deaths | gone p50 | gone p95 | gone p99 | gone max | invisible p50 | "
             "invisible p99 | exited p50 | exited p99 | p99 < 50 ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for sc in REAP_SCENARIOS:
        r = results.get(sc)
        if r is None:
            continue
        g, inv, ex = r.get("gone"), r.get("invisible"), r.get("exited")
        target = "n/a (no watcher)" if g is None else ("met" if r["meets_target"] else "**MISSED**")
        if r["failures"]:
            target += f" ({len(r['failures'])} failed rounds)"
        lines.append(f"| {sc} | {r['rounds']} | {_ms(g, 'p50_ms')} | {_ms(g, 'p95_ms')} | {_ms(g, 'p99_ms')} | "
                     f"{_ms(g, 'max_ms')} | {_ms(inv, 'p50_ms')} | {_ms(inv, 'p99_ms')} | "
                     f"{_ms(ex, 'p50_ms')} | {_ms(ex, 'p99_ms')} | {target} |")
    return "\n".join(lines)


def markdown_lookup_table(ns: dict, ns_min: dict | None = None) -> str:
    """``ns[op id] -> ns/op`` as Markdown, with the ratio to an unowned get;
    with ``ns_min`` (the fastest call of each) also those and their ratio,
    which a loaded machine disturbs less than the median."""
    ratios = lookup_ratios(ns)
    rmin = lookup_ratios(ns_min) if ns_min else {}
    head = "| read | ns/op | vs unowned t.get |"
    rule = "|---|---:|---:|"
    if ns_min:
        head += " min ns/op | min vs unowned |"
        rule += "---:|---:|"
    lines = [head, rule]
    for op, what in LOOKUP_OPS.items():
        if op not in ns:
            continue
        r = ratios.get(op)
        mark = ""
        if op == "get-owned" and r is not None:
            mark = f" (target <= {LOOKUP_TARGET_RATIO}x: {'met' if r <= LOOKUP_TARGET_RATIO else 'MISSED'})"
        row = f"| {what} | {ns[op]:,.0f} | {'n/a' if r is None else f'{r:.2f}x'}{mark} |"
        if ns_min:
            m = rmin.get(op)
            row += (f" {ns_min[op]:,.0f} | {'n/a' if m is None else f'{m:.2f}x'} |" if op in ns_min
                    else " n/a | n/a |")
        lines.append(row)
    return "\n".join(lines)
