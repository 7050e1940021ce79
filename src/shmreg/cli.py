"""The ``shmreg`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys

import shmreg


def _cmd_demo(args: argparse.Namespace) -> int:
    from shmreg import demo

    return demo.run(workers=args.workers, seconds=args.seconds)


def _cmd_stat(args: argparse.Namespace) -> int:
    with shmreg.Table.open(args.name) as t:
        st = t.stats()
    # Per-process read counters mean nothing for a one-shot CLI process.
    for k in ("hits", "misses", "read_retries", "lock_fallbacks"):
        st.pop(k)
    if args.json:
        print(json.dumps(st, indent=2))
    else:
        width = max(map(len, st))
        for k, v in st.items():
            print(f"{k:<{width}}  {v:,}" if isinstance(v, int) else f"{k:<{width}}  {v}")
    return 0


def _cmd_watch(args: argparse.Namespace) -> int:
    import signal
    import threading

    from shmreg.watcher import Watcher

    stop = threading.Event()

    def on_death(pid: int, entries: list) -> None:
        print(f"pid {pid} died owning {len(entries)} entries", flush=True)
        for k, v in entries:
            print(f"  {k!r}: {v!r}", flush=True)

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    w = Watcher(args.name, on_death=on_death, interval=args.interval)
    w.start()
    print(f"watching {args.name!r} (pid {os.getpid()}); waiting for the lease...", flush=True)
    announced = False
    while not stop.wait(0.1):
        if w.active and not announced:
            print("active: reaping owners as they die", flush=True)
            announced = True
        if not w._thread.is_alive():
            break
    w.stop()
    print(f"stopped: reaped {w.reaped_entries} entries of {w.reaped_processes} dead processes", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="shmreg", description="Inspect and exercise shmreg shared-memory tables.")
    ap.add_argument("--version", action="version", version=f"shmreg {shmreg.__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("demo", help="run worker processes on one table, kill one mid-write, verify",
                       description="Several worker processes share one table: counters, "
                                   "insert_new, TTL expiry, and a kill -9 of one worker in the "
                                   "middle of a write, then proof that the table is intact.")
    p.add_argument("--workers", type=int, default=4, help="worker processes (default 4)")
    p.add_argument("--seconds", type=float, default=2.0, help="how long they run (default 2)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("stat", help="show a table's geometry, usage and counters",
                       description="Show a table's geometry, usage and counters.")
    p.add_argument("name", help="table name")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_stat)

    p = sub.add_parser("watch", help="reap the entries of owner processes as they die",
                       description="Run a watcher on a table: print what each dead owner "
                                   "process owned (post-mortem), then reap it.  Exits on "
                                   "SIGINT/SIGTERM.  Several can run: one is active, the "
                                   "others stand by and take over when it dies.")
    p.add_argument("name", help="table name")
    p.add_argument("--interval", type=float, default=1.0,
                   help="seconds between full sweeps (default 1)")
    p.set_defaults(func=_cmd_watch)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 error, 2 usage)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (shmreg.Error, ValueError, TypeError) as e:
        msg = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        print(f"shmreg: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
