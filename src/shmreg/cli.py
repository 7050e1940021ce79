"""The ``shmreg`` command line.

Exit codes: 0 ok; 1 error (no such table or key, invalid name, bad value,
permission ...: one line on stderr, no traceback; a missing table is never
created); 2 usage; 3 corruption found (``check``, or any command that meets
a corrupt table); 4 ``destroy`` refused because the table is in use;
130 interrupted, 141 output pipe closed.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import math
import os
import sys
import time
from typing import Any

import shmreg
from shmreg import _segment
from shmreg.table import temporary_orphaned

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CORRUPT, EXIT_IN_USE = 0, 1, 2, 3, 4

EPILOG = ("exit codes: 0 ok, 1 error (missing table or key, invalid name, bad value), "
          "2 usage, 3 corruption found, 4 destroy refused (table in use)")


class CliError(Exception):
    """An error reported as one line on stderr, with an exit code."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


# -- JSON encoding of keys and values ------------------------------------------------

def to_json(v: Any) -> Any:
    """A JSON-safe form of a key or value (the documented ``--json`` form):

    - ``str``, ``int``, ``bool``, ``None`` and finite ``float``: themselves;
    - ``float`` nan/inf: ``{"float": "nan"}`` (``"inf"``, ``"-inf"``);
    - ``bytes``: ``{"bytes_b64": "<base64>"}``;
    - a pickled value left opaque (:class:`shmreg.PickledValue`, a table
      others can write, read without ``--unpickle``):
      ``{"pickle_b64": "<base64>", "unpickled": false}``;
    - ``list`` and ``dict`` with ``str`` keys: themselves, items encoded
      the same way;
    - anything else (tuples, sets, objects: pickled values):
      ``{"repr": repr(v), "type": "module.qualname"}``.
    """
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        return v if math.isfinite(v) else {"float": repr(v)}
    if isinstance(v, shmreg.PickledValue):
        return {"pickle_b64": base64.b64encode(bytes(v)).decode("ascii"), "unpickled": False}
    if isinstance(v, (bytes, bytearray)):
        return {"bytes_b64": base64.b64encode(bytes(v)).decode("ascii")}
    if type(v) is list:
        return [to_json(x) for x in v]
    if type(v) is dict and all(isinstance(k, str) for k in v):
        return {k: to_json(x) for k, x in v.items()}
    t = type(v)
    name = t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"
    return {"repr": repr(v), "type": name}


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - unreachable


def _sharing(args: argparse.Namespace) -> dict:
    """``mode``/``trust`` keywords from --mode, --trust, --trust-group, --unpickle."""
    mode = getattr(args, "mode", None)
    users, groups = getattr(args, "trust", None) or (), getattr(args, "trust_group", None) or ()
    unpickle = getattr(args, "unpickle", False)
    trust = shmreg.Trust(uids=users, gids=groups, unpickle=unpickle) \
        if users or groups or unpickle else None
    url = _url(args)
    return {"mode": 0o600 if mode is None else mode, "trust": trust, **({"url": url} if url else {})}


def _url(args: argparse.Namespace) -> str | None:
    """The Redis/Valkey URL of --url (or $SHMREG_URL): the tables live there."""
    return getattr(args, "url", None) or os.environ.get("SHMREG_URL") or None


def _open(name: str, args: argparse.Namespace) -> shmreg.Table:
    """Open an existing table (never creates one), with the sharing options;
    a missing one names the close matches."""
    try:
        return shmreg.Table.open(name, **_sharing(args))
    except shmreg.TableNotFoundError as e:
        from shmreg._names import did_you_mean

        if _url(args):
            from shmreg.backends.redis.connection import redact

            raise shmreg.TableNotFoundError(e.errno, f"no table named {name!r} on {redact(_url(args))}",
                                            e.filename) from None

        raise shmreg.TableNotFoundError(e.errno, f"no table named {name!r}{did_you_mean(name)}",
                                        e.filename) from None


def _note_opaque(name: str, values: list) -> None:
    """Say on stderr why pickled values are shown as opaque bytes."""
    n = sum(isinstance(v, shmreg.PickledValue) for v in values)
    if n:
        owner = _user(_segment.owner_of(name))
        print(f"shmreg: note: {n} pickled value{'s' if n > 1 else ''} shown as opaque bytes, not "
              f"unpickled: others can write table {name!r} (owner {owner}), and unpickling runs "
              "their code as you; --unpickle to unpickle anyway", file=sys.stderr)


def _miss(t: shmreg.Table, key: Any, args: argparse.Namespace) -> CliError:
    """The error for a missing KEY, hinting at --int-key / --bytes-key when
    the key exists with another type."""
    hint = ""
    if isinstance(key, str):
        try:
            as_int = int(key, 0)
        except ValueError:
            as_int = None
        if as_int is not None and t.get(as_int, shmreg.MISSING) is not shmreg.MISSING:
            hint = f" (an int key {as_int} exists: add --int-key)"
        elif t.get(key.encode(), shmreg.MISSING) is not shmreg.MISSING:
            hint = f" (a bytes key {key.encode()!r} exists: add --bytes-key with {key.encode().hex()})"
    return CliError(f"no key {key!r} in table {args.name!r}{hint}")


def _key_of(args: argparse.Namespace) -> Any:
    """The KEY argument, typed by --int-key / --bytes-key (usage error if bad)."""
    if args.int_key:
        try:
            return int(args.key, 0)
        except ValueError:
            args._parser.error(f"--int-key: not an integer: {args.key!r}")
    if args.bytes_key:
        try:
            return bytes.fromhex(args.key)
        except ValueError:
            args._parser.error(f"--bytes-key: not hex: {args.key!r}")
    return args.key


def _ttl_left(exp_ns: int, now_ns: int) -> float | None:
    return None if not exp_ns else max(0.0, (exp_ns - now_ns) / 1e9)


def _short(s: str, width: int) -> str:
    return s if width <= 0 or len(s) <= width else s[: max(1, width - 3)] + "..."


# -- demo, stat, watch (unchanged behaviour) -------------------------------------------

def _cmd_demo(args: argparse.Namespace) -> int:
    from shmreg import demo

    return demo.run(workers=args.workers, seconds=args.seconds)


def _cmd_stat(args: argparse.Namespace) -> int:
    with _open(args.name, args) as t:
        if args.prometheus:
            from shmreg.metrics import prometheus_text

            sys.stdout.write(prometheus_text(t) + _near_prometheus(t))
            return EXIT_OK
        st = t.stats()
        st.update(_near_status(t))
    # Per-process read counters mean nothing for a one-shot CLI process.
    for k in ("hits", "misses", "read_retries", "lock_fallbacks"):
        st.pop(k)
    if args.json:
        print(json.dumps(st, indent=2))
    else:
        width = max(map(len, st))
        for k, v in st.items():
            print(f"{k:<{width}}  {v:,}" if isinstance(v, int) and not isinstance(v, bool)
                  else f"{k:<{width}}  {v}")
    return EXIT_OK


def _near_status(t: Any) -> dict:
    # This host's near cache of a Redis table (docs/near-cache.md), if any.
    if getattr(t, "url", None) is None:
        return {}
    from shmreg.backends.redis.near import host_near_status

    return host_near_status(t)


def _near_prometheus(t: Any) -> str:
    if getattr(t, "url", None) is None:
        return ""
    from shmreg.backends.redis.near import near_prometheus_text

    return near_prometheus_text(t)


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
    w = Watcher(args.name, on_death=on_death, interval=args.interval, **_sharing(args))
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
    return EXIT_OK


# -- ls ------------------------------------------------------------------------------

def _user(uid: int | None) -> str:
    """User name of ``uid`` (its number if it has none)."""
    if uid is None:
        return "-"
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _cmd_ls(args: argparse.Namespace) -> int:
    from shmreg.metrics import prometheus_text, table_metrics

    if _url(args):
        return _ls_url(args)
    rows = []
    for name in shmreg.list_tables(all_users=args.all):
        owner = _segment.owner_of(name)
        try:
            with _open(name, args) as t:
                rows.append(table_metrics(t))
        except shmreg.TableNotFoundError:
            continue  # removed between the listing and the open
        except shmreg.UntrustedTableError as e:
            # Another user's table: say whose, not the whole lecture.
            rows.append({"name": name, "error": "UntrustedTableError: not opened (--trust "
                         f"{_user(owner)} to inspect it)" if e.owner_uid != os.geteuid()
                         else f"UntrustedTableError: {e}"})
        except (shmreg.Error, OSError) as e:
            msg = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            rows.append({"name": name, "error": f"{type(e).__name__}: {msg}"})
        if args.all:
            rows[-1]["owner"] = _user(owner)
    for r in rows:   # temporary tables (shmreg.temporary) whose creator is gone
        if temporary_orphaned(r["name"]):
            r["orphan"] = True
    if args.prometheus:
        sys.stdout.write(prometheus_text([{k: v for k, v in r.items() if k != "orphan"}
                                          for r in rows if "error" not in r]))
        return EXIT_OK
    if args.json:
        for r in rows:
            r.pop("time", None)
        _print_json(rows)
        return EXIT_OK
    if not rows:
        return EXIT_OK
    table = [("NAME", "ENTRIES", "CAPACITY", "LOAD", "SIZE", "USED", "OWNERS", "WATCHER")]
    if args.all:
        table = [("NAME", "USER") + table[0][1:]]
    for r in rows:
        user = (r["owner"],) if args.all else ()
        if "error" in r:
            table.append((r["name"], *user, "-", "-", "-", "-", "-", "-", r["error"]))
            continue
        table.append((r["name"], *user, f"{r['entries']:,}", f"{r['capacity']:,}",
                       f"{r['load_factor'] * 100:.1f}%", _human_bytes(r["segment_bytes"]),
                       _human_bytes(r["bytes_used"]), str(r["owner_processes"]),
                       str(r["watcher_pid"]) if r["watcher_pid"] else "-"))
    widths = [max(len(row[i]) for row in table if len(row) > i) for i in range(len(table[0]) - 1)]
    for row, r in zip(table, [None, *rows]):
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        orphan = "  orphan: its creator is gone (shmreg clean)" if r and r.get("orphan") else ""
        print("  ".join(cells + [row[-1]]) + orphan)
    return EXIT_OK


def _ls_url(args: argparse.Namespace) -> int:
    """``ls --url``: the tables on a Redis/Valkey server (or Cluster)."""
    from shmreg.backends.redis import list_tables as redis_tables

    url = _url(args)
    rows = []
    for name in redis_tables(url):
        with _open(name, args) as t:
            st = t.stats()
        rows.append({k: st[k] for k in ("name", "entries", "owner_processes", "watcher_pid")})
    if args.json or args.prometheus:
        _print_json(rows)
        return EXIT_OK
    table = [("NAME", "ENTRIES", "OWNERS", "WATCHER")] + [
        (r["name"], f"{r['entries']:,}", str(r["owner_processes"]), str(r["watcher_pid"] or "-"))
        for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    for row in table:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths))))
    return EXIT_OK


# -- clean ---------------------------------------------------------------------------

def _cmd_clean(args: argparse.Namespace) -> int:
    removed, kept = [], {}
    for name in shmreg.list_tables():
        if not temporary_orphaned(name):
            continue
        try:
            with _open(name, args) as t:
                pids, watcher = _users(t)
        except shmreg.TableNotFoundError:
            continue
        except (shmreg.Error, OSError) as e:
            pids, watcher = [], None   # unreadable: an orphan all the same
            if not args.force:
                kept[name] = f"{type(e).__name__}: {e}"
                continue
        if (pids or watcher) and not args.force:
            kept[name] = f"in use by pids {', '.join(map(str, pids or [watcher]))} (--force removes it)"
            continue
        if not args.dry_run:
            try:
                shmreg.unlink(name, trust=_sharing(args)["trust"])
            except shmreg.TableNotFoundError:
                continue
        removed.append(name)
    if args.json:
        _print_json({"removed": removed, "dry_run": args.dry_run, "kept": kept})
        return EXIT_OK
    for name in removed:
        print(("would remove " if args.dry_run else "removed ") + repr(name))
    for name, why in kept.items():
        print(f"kept {name!r}: {why}", file=sys.stderr)
    if not removed and not kept:
        print("no orphaned temporary tables")
    return EXIT_OK


# -- dump, get, set, del -----------------------------------------------------------------

_KEY_ORDER = {int: 0, str: 1, bytes: 2}


def _cmd_dump(args: argparse.Namespace) -> int:
    if args.prefix is not None and args.bytes_prefix is not None:
        args._parser.error("--prefix and --bytes-prefix are mutually exclusive")
    prefix: Any = args.prefix
    if args.bytes_prefix is not None:
        try:
            prefix = bytes.fromhex(args.bytes_prefix)
        except ValueError:
            args._parser.error(f"--bytes-prefix: not hex: {args.bytes_prefix!r}")
    if args.limit is not None and args.limit < 0:
        args._parser.error("--limit must be >= 0")
    with _open(args.name, args) as t:
        owners = None
        if args.owner is not None:
            owners = {p["owner"] for p in t._proc_table() if p["pid"] == args.owner and p["alive"]}
        rows = []
        for si in range(t.nshards):
            for key, value, exp, own in t._shard_entries(si, 4, prefix):
                if owners is not None and own not in owners:
                    continue
                rows.append((key, value, exp, own))
        now = time.monotonic_ns()
        pids = {own: t._owner_pid(own) for own in {r[3] for r in rows} if own}
    rows.sort(key=lambda r: (_KEY_ORDER.get(type(r[0]), 3), r[0]))
    total = len(rows)
    if args.limit is not None:
        rows = rows[: args.limit]
    entries = [dict(key=k, value=v, ttl=_ttl_left(exp, now), owner=pids.get(own) if own else None)
               for k, v, exp, own in rows]
    _note_opaque(args.name, [e["value"] for e in entries])
    if args.json:
        _print_json({"table": args.name, "total": total, "truncated": len(entries) < total,
                     "entries": [dict(e, key=to_json(e["key"]), value=to_json(e["value"]))
                                 for e in entries]})
        return EXIT_OK
    for e in entries:
        extra = []
        if e["ttl"] is not None:
            extra.append(f"ttl {e['ttl']:.1f}s")
        if e["owner"] is not None:
            extra.append(f"owner {e['owner']}")
        tail = f"  ({', '.join(extra)})" if extra else ""
        print(f"{e['key']!r}: {_short(repr(e['value']), args.width)}{tail}")
    if len(entries) < total:
        print(f"... {total - len(entries):,} more entries (raise --limit)", file=sys.stderr)
    return EXIT_OK


def _cmd_get(args: argparse.Namespace) -> int:
    key = _key_of(args)
    with _open(args.name, args) as t:
        # One read gives value and owner: a value is decoded (unpickled) once.
        got = t._get_owned(key, shmreg.MISSING)
        if got is shmreg.MISSING:
            raise _miss(t, key, args)
        value, owner_id = got
        owner = t._owner_pid(owner_id) if owner_id else None
        try:
            ttl = t.ttl(key)
        except KeyError:  # expired or deleted since the read
            ttl = None
    _note_opaque(args.name, [value])
    if args.json:
        _print_json({"key": to_json(key), "value": to_json(value), "ttl": ttl, "owner": owner})
    elif isinstance(value, str):
        print(value)
    else:
        print(repr(value))
    return EXIT_OK


def _value_of(args: argparse.Namespace) -> Any:
    raw = args.value
    try:
        if args.int:
            return int(raw, 0)
        if args.float:
            return float(raw)
        if args.json:
            return json.loads(raw)
        if args.bytes:
            return bytes.fromhex(raw)
    except ValueError as e:
        flag = "--int" if args.int else "--float" if args.float else "--json" if args.json else "--bytes"
        args._parser.error(f"{flag}: bad value {raw!r}: {e}")
    return raw


def _cmd_set(args: argparse.Namespace) -> int:
    key = _key_of(args)
    value = _value_of(args)
    if args.ttl is not None and not args.ttl > 0:  # inf: never expires, as without --ttl
        args._parser.error(f"--ttl must be a positive number of seconds (or inf), not {args.ttl}")
    with _open(args.name, args) as t:
        t.set(key, value, ttl=args.ttl)
    return EXIT_OK


def _cmd_del(args: argparse.Namespace) -> int:
    key = _key_of(args)
    with _open(args.name, args) as t:
        if not t.delete(key):
            raise _miss(t, key, args)
    return EXIT_OK


# -- reap, check, destroy ----------------------------------------------------------------

def _cmd_reap(args: argparse.Namespace) -> int:
    with _open(args.name, args) as t:
        if args.pid is None:
            dead = {p["pid"] for p in t._proc_table() if not p["alive"]}
            n = t.reap_dead()
            out = {"table": args.name, "pid": None, "dead_processes": len(dead), "reaped": n}
            text = f"reaped {n} entries of {len(dead)} dead processes"
        else:
            alive = any(p["pid"] == args.pid and p["alive"] for p in t._proc_table())
            n = t.reap(args.pid, force=args.force)
            out = {"table": args.name, "pid": args.pid, "alive": alive, "reaped": n}
            text = f"reaped {n} entries of pid {args.pid}"
            if alive and not args.force:
                text += " (it is alive: nothing reaped; --force deletes its entries anyway)"
    if args.json:
        _print_json(out)
    else:
        print(text)
    return EXIT_OK


def _cmd_check(args: argparse.Namespace) -> int:
    repaired: list = []
    with _open(args.name, args) as t:
        try:
            repaired = t.check(repair=args.repair) or []
        except shmreg.CorruptTableError as e:
            if args.json:
                _print_json({"table": args.name, "ok": False, "error": str(e),
                             **({"repaired": repaired} if args.repair else {})})
            raise CliError(f"table {args.name!r} is corrupt: {e}", EXIT_CORRUPT) from None
        n, shards = len(t), t.nshards
    if args.json:
        _print_json({"table": args.name, "ok": True, "entries": n, "shards": shards,
                     **({"repaired": repaired} if args.repair else {})})
    else:
        for what in repaired:
            print(f"repaired: {what}: its lock had no live holder and was reinitialised")
        print(f"ok: table {args.name!r} passed every check ({n:,} entries, {shards} shards)")
    return EXIT_OK


def _cmd_flag(args: argparse.Namespace) -> int:
    from shmreg.recipes import flags_command

    try:
        flags = flags_command(args.name, args.flag, args.value, prefix=args.prefix, **_sharing(args))
    except ValueError as e:
        raise CliError(str(e), EXIT_USAGE) from None
    if args.flag is not None and not flags:
        raise CliError(f"no flag {args.flag!r} in table {args.name!r}")
    if args.json:
        _print_json(flags)
    elif not flags:
        print(f"no flags in table {args.name!r} (no key starts with {args.prefix!r}; "
              f"set one: shmreg flag {args.name} NAME on)", file=sys.stderr)
    else:
        for name, on in sorted(flags.items()):
            print(f"{name}  {'on' if on else 'off'}")
    return EXIT_OK


def _users(t: shmreg.Table) -> tuple[list, int | None]:
    """(live pids holding a slot, active watcher pid) of an open table."""
    pids = sorted({p["pid"] for p in t._proc_table() if p["alive"]})
    return pids, t._lease_holder()


def _cmd_destroy(args: argparse.Namespace) -> int:
    names = [args.name]
    flights = f"{args.name}--flights"  # shmreg.Cache's single-flight companion
    if _url(args):
        from shmreg.backends.redis import list_tables as redis_tables

        if flights in redis_tables(_url(args)):
            names.append(flights)
    elif _segment.owner_of(args.name) is not None and _segment.owner_of(flights) is not None:
        names.append(flights)
    users: dict = {}
    for name in names:
        with _open(name, args) as t:
            pids, watcher = _users(t)
        if pids or watcher:
            users[name] = {"pids": pids, "watcher_pid": watcher}
    if users and not args.force:
        parts = []
        for name, u in users.items():
            who = []
            if u["pids"]:
                who.append("pid" + ("s " if len(u["pids"]) > 1 else " ") + ", ".join(map(str, u["pids"])))
            if u["watcher_pid"]:
                who.append(f"watcher pid {u['watcher_pid']}")
            parts.append(f"{name!r} by {' and '.join(who)}")
        raise CliError(f"table in use: {'; '.join(parts)} (use --force to destroy it anyway)",
                       EXIT_IN_USE)
    removed = []
    for name in names:
        try:
            if _url(args):
                with _open(name, args) as t:
                    t.unlink()
            else:
                shmreg.unlink(name, trust=_sharing(args)["trust"])
            removed.append(name)
        except shmreg.TableNotFoundError:
            if name == args.name:
                raise
    if args.json:
        _print_json({"destroyed": removed, "forced": bool(users), "in_use_by": users})
    else:
        for name in removed:
            print(f"destroyed {name!r}" + (" (forced: it was in use)" if name in users else ""))
    return EXIT_OK


# -- top ---------------------------------------------------------------------------------

def _rate(cur: dict, prev: dict | None, key: str, dt: float) -> float | None:
    if prev is None or dt <= 0:
        return None
    return max(0, cur[key] - prev[key]) / dt


def render_top(cur: dict, prev: dict | None, *, unlinked: bool = False, width: int = 80) -> str:
    """One frame of ``shmreg top`` from two ``table_metrics`` snapshots."""
    dt = cur["time"] - prev["time"] if prev else 0.0

    def r(key: str) -> str:
        v = _rate(cur, prev, key, dt)
        return "-" if v is None else f"{v:,.0f}"

    rates = {k: _rate(cur, prev, k, dt) for k in ("sets", "deletes", "reads_hit", "reads_missed")}
    total = None if rates["sets"] is None else sum(rates.values())
    hits_d = (cur["reads_hit"] - prev["reads_hit"]) if prev else 0
    miss_d = (cur["reads_missed"] - prev["reads_missed"]) if prev else 0
    ratio_now = f"{hits_d / (hits_d + miss_d) * 100:.1f}%" if hits_d + miss_d else "-"
    all_reads = cur["reads_hit"] + cur["reads_missed"]
    ratio_all = f"{cur['reads_hit'] / all_reads * 100:.1f}%" if all_reads else "-"
    owners = ", ".join(map(str, cur["owner_pids"][:12]))
    if len(cur["owner_pids"]) > 12:
        owners += f", ... (+{len(cur['owner_pids']) - 12})"
    mem_total = cur["bytes_used"] + cur["bytes_free"]
    lines = [
        f"shmreg top - table {cur['name']!r}" + ("  [UNLINKED]" if unlinked else "")
        + f"  {time.strftime('%H:%M:%S')}" + (f"  (over {dt:.1f}s)" if prev else ""),
        "",
        f"ops/s      {total:,.0f} total" if total is not None else "ops/s      -",
        f"  sets {r('sets')}   deletes {r('deletes')}   reads hit {r('reads_hit')}"
        f"   reads missed {r('reads_missed')}   (reads sampled)",
        f"hit ratio  {ratio_now} now, {ratio_all} since creation",
        f"entries    {cur['entries']:,} of {cur['capacity']:,} ({cur['load_factor'] * 100:.1f}%)"
        f"   with ttl {cur['with_ttl']:,}   owned {cur['owned']:,}",
        f"memory     {_human_bytes(cur['bytes_used'])} used of {_human_bytes(mem_total)}"
        f" ({cur['memory_used_ratio'] * 100:.1f}%)   segment {_human_bytes(cur['segment_bytes'])}",
        f"evictions  {r('evictions')}/s   expirations {r('expirations')}/s"
        f"   repairs {cur['repairs']:,} total",
        f"owners     {cur['owner_processes']} live" + (f": {owners}" if owners else ""),
        "watcher    " + (f"pid {cur['watcher_pid']} (active)" if cur["watcher_pid"] else "none"),
    ]
    return "\n".join(_short(line, width) if width else line for line in lines)


def _cmd_top(args: argparse.Namespace) -> int:
    from shmreg.metrics import table_metrics

    if args.interval <= 0:
        args._parser.error("--interval must be > 0")
    frames = 1 if args.once else args.frames
    if frames is not None and frames < 1:
        args._parser.error("--frames must be >= 1")
    tty = sys.stdout.isatty()
    with _open(args.name, args) as t:
        path = t.path
        prev = table_metrics(t)
        shown = 0
        if tty:
            sys.stdout.write("\x1b[?25l\x1b[H\x1b[2J")
        try:
            while frames is None or shown < frames:
                time.sleep(args.interval)
                cur = table_metrics(t)
                try:
                    width = os.get_terminal_size(sys.stdout.fileno()).columns if tty else 0
                except OSError:
                    width = 0
                frame = render_top(cur, prev, unlinked=not os.path.exists(path), width=width)
                if tty:
                    sys.stdout.write("\x1b[H" + frame.replace("\n", "\x1b[K\n") + "\x1b[K\x1b[J")
                else:
                    sys.stdout.write(("\n" if shown else "") + frame + "\n")
                sys.stdout.flush()
                prev = cur
                shown += 1
        except KeyboardInterrupt:
            pass
        finally:
            if tty:
                sys.stdout.write("\x1b[?25h\n")
                sys.stdout.flush()
    return EXIT_OK


# -- bench ---------------------------------------------------------------------------------

def _cmd_bench(args: argparse.Namespace) -> int:
    from shmreg import bench

    peers = None
    if args.peers:
        peers = [p.strip() for p in args.peers.split(",") if p.strip()]
        bad = [p for p in peers if p not in bench.PEERS]
        if bad or not peers:
            args._parser.error(f"--peers: unknown peer {bad[0] if bad else ''!r}; "
                               f"choose from {','.join(bench.PEERS)}")
    for opt in ("entries", "ops", "repeat"):
        v = getattr(args, opt)
        if v is not None and v < 1:
            args._parser.error(f"--{opt} must be >= 1")
    if args.seconds is not None and not args.seconds > 0:
        args._parser.error("--seconds must be > 0")
    chart_note = None
    if args.chart and not bench.matplotlib_available():
        # Before any timing: minutes of benchmark for a chart that cannot be drawn.
        raise CliError(f"--chart needs matplotlib, which is not installed: {bench.install_hint()}")
    progress = None if args.no_progress else bench.ProgressBar(sys.stderr)
    res = bench.run(peers, quick=args.quick, entries=args.entries, ops=args.ops,
                    repeat=args.repeat, budget=args.seconds, servers=not args.no_servers,
                    redis_addr=args.redis, memcached_addr=args.memcached, progress=progress)
    chart_written = None
    if args.chart and chart_note is None:
        if res["results"]:
            bench.write_chart(res, args.chart)
            chart_written = args.chart
        else:
            chart_note = "skipped: no peer ran"
    if args.output:
        rel = None
        if chart_written:
            rel = os.path.relpath(os.path.abspath(chart_written),
                                  os.path.dirname(os.path.abspath(args.output)))
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(bench.markdown_report(res, rel, chart_note))
    res["report"] = args.output
    res["chart"] = chart_written
    res["chart_note"] = chart_note
    if args.json:
        _print_json(res)
    else:
        print(bench.format_table(res))
        if args.output:
            print(f"report: {args.output}")
        if chart_written:
            print(f"chart: {chart_written}")
    if not res["results"]:
        raise CliError("no peer could run (see the skipped lines)")
    return EXIT_OK


def _cmd_lint(args: argparse.Namespace) -> int:
    from shmreg.lint import report

    return report.run(args)


# -- parser -------------------------------------------------------------------------------

def _pid(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a pid: {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"not a pid: {s!r}")
    return v


def _mode(s: str) -> int:
    try:
        v = int(s, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal mode: {s!r}") from None
    if not 0 <= v <= 0o777:
        raise argparse.ArgumentTypeError(f"not a permission mode: {s!r}")
    return v


# Commands that open a table: they take the sharing options.
_OPENS = {"ls", "clean", "stat", "dump", "get", "set", "del", "watch", "reap", "check", "flag",
          "top", "destroy"}

SHARING_EPILOG = (
    "sharing: only your own tables are opened, and only if no one else can write them. "
    "--trust USER accepts a table owned by USER (e.g. root inspecting a user's table); "
    "--trust-group GROUP one that GROUP can write; --mode 660/666 one shared that way. "
    "Pickled values of a table others can write are shown as opaque bytes unless --unpickle.")


def _sharing_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sharing (see docs/guarantees.md, Trust model)")
    g.add_argument("--trust", action="append", metavar="USER",
                   help="accept a table owned by USER (name or uid; repeatable)")
    g.add_argument("--trust-group", action="append", metavar="GROUP",
                   help="accept a table GROUP can write (name or gid; repeatable)")
    g.add_argument("--mode", type=_mode, metavar="MODE",
                   help="accept a table as shared as MODE (octal, e.g. 660 or 666; default 600)")
    g.add_argument("--unpickle", action="store_true",
                   help="unpickle values of a table others can write (runs their code as you)")
    g.add_argument("--url", metavar="URL",
                   help="the table is on this Redis/Valkey server or Cluster (redis://, "
                        "rediss://, unix://, redis+cluster://, redis+sentinel://; default "
                        "$SHMREG_URL); see docs/redis.md")


def _add(sub, name: str, func, help: str, description: str | None = None):
    opens = name in _OPENS
    p = sub.add_parser(name, help=help, description=description or help,
                       epilog=f"{SHARING_EPILOG}  {EPILOG}" if opens else EPILOG)
    p.set_defaults(func=func, _parser=p)
    if opens:
        _sharing_args(p)
    return p


def _key_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="table name")
    p.add_argument("key", help="the key (a str unless --int-key / --bytes-key)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--int-key", action="store_true", help="KEY is an int (0x.. accepted)")
    g.add_argument("--bytes-key", action="store_true", help="KEY is bytes, given in hex")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="shmreg", description="Inspect and exercise shmreg shared-memory tables.",
        epilog=EPILOG)
    ap.add_argument("--version", action="version", version=f"shmreg {shmreg.__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = _add(sub, "ls", _cmd_ls, "list your tables on this host",
             "List your tables on this host (every user's with --all): entries, "
             "capacity, load factor, segment size, bytes used, live owner processes, "
             "active watcher.  Tables that cannot be opened are listed with the error.")
    p.add_argument("--all", action="store_true",
                   help="every user's tables, with a USER column (another user's are "
                        "opened only with --trust)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--json", action="store_true", help="print JSON (a list of objects)")
    g.add_argument("--prometheus", action="store_true",
                   help="print every table's metrics in Prometheus text format")

    p = _add(sub, "clean", _cmd_clean, "remove orphaned temporary tables",
             "Remove the temporary tables (shmreg.temporary(), named tmp-PID-START-...) "
             "whose creator process is gone: what a script killed inside its `with` "
             "block left behind.  One in use by a live process is kept unless --force.")
    p.add_argument("--dry-run", action="store_true", help="only print what would be removed")
    p.add_argument("--force", action="store_true", help="remove orphans even while in use")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = _add(sub, "stat", _cmd_stat, "show a table's geometry, usage and counters",
             "Show a table's geometry, usage and counters.")
    p.add_argument("name", help="table name")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--json", action="store_true", help="print JSON")
    g.add_argument("--prometheus", action="store_true",
                   help="print Prometheus text exposition format (metrics labelled table=NAME)")

    p = _add(sub, "dump", _cmd_dump, "print a table's entries",
             "Print the live entries, sorted by key (int, str, bytes): key, value "
             "(repr), seconds of TTL left, owner pid.  --json encodes keys and values "
             "JSON-safely: str/int/float/bool/null and lists/dicts of them as "
             "themselves, bytes as {\"bytes_b64\": ...}, nan/inf as {\"float\": \"nan\"}, "
             "other objects as {\"repr\": ..., \"type\": ...}.")
    p.add_argument("name", help="table name")
    p.add_argument("--prefix", help="only str keys starting with PREFIX")
    p.add_argument("--bytes-prefix", metavar="HEX", help="only bytes keys starting with these bytes")
    p.add_argument("--owner", type=_pid, metavar="PID", help="only entries owned by live process PID")
    p.add_argument("--limit", type=int, metavar="N", help="print at most N entries")
    p.add_argument("--width", type=int, default=200, metavar="W",
                   help="cut value reprs to W characters in text mode (0: never; default 200)")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = _add(sub, "get", _cmd_get, "print the value of a key",
             "Print the value of KEY: a str as is, anything else as its repr; "
             "--json prints {key, value, ttl, owner} (encoding as in `dump --json`).  "
             "A missing key exits 1.")
    _key_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")

    p = _add(sub, "set", _cmd_set, "store a value",
             "Store VALUE under KEY.  VALUE is stored as a str unless a type flag "
             "says otherwise.  The table must exist.")
    _key_args(p)
    p.add_argument("value", help="the value (a str unless a type flag is given)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--int", action="store_true", help="VALUE is an int")
    g.add_argument("--float", action="store_true", help="VALUE is a float")
    g.add_argument("--json", action="store_true",
                   help="VALUE is JSON, stored as the parsed value (dict, list, number, ...)")
    g.add_argument("--bytes", action="store_true", help="VALUE is bytes, given in hex")
    p.add_argument("--ttl", type=float, metavar="SECONDS",
                   help="expire after SECONDS (inf: never, as without --ttl)")

    p = _add(sub, "del", _cmd_del, "delete a key", "Delete KEY.  A missing key exits 1.")
    _key_args(p)

    p = _add(sub, "watch", _cmd_watch, "reap the entries of owner processes as they die",
             "Run a watcher on a table: print what each dead owner "
             "process owned (post-mortem), then reap it.  Exits on "
             "SIGINT/SIGTERM.  Several can run: one is active, the "
             "others stand by and take over when it dies.")
    p.add_argument("name", help="table name")
    p.add_argument("--interval", type=float, default=1.0,
                   help="seconds between full sweeps (default 1)")

    p = _add(sub, "reap", _cmd_reap, "delete the entries of dead owner processes",
             "Without PID: delete every entry whose owner process is dead and free "
             "their slots.  With PID: delete the entries of that (dead) process; a "
             "live one is left alone unless --force.  Prints how many entries.")
    p.add_argument("name", help="table name")
    p.add_argument("pid", nargs="?", type=_pid, help="the owner process")
    p.add_argument("--force", action="store_true",
                   help="with PID: delete its entries even if it is alive")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = _add(sub, "check", _cmd_check, "verify every invariant of a table",
             "Verify every invariant of every shard (each under its lock) and every "
             "lock word.  Exits 3 with the first broken invariant if the table is "
             "corrupt.  A lock whose word names a thread that does not exist is "
             "reported within about a second; --repair reinitialises such locks "
             "(never one held by a live process, even a stopped one) and repairs "
             "what they guarded.")
    p.add_argument("name", help="table name")
    p.add_argument("--repair", action="store_true",
                   help="reinitialise abandoned or invalid locks, then check")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = _add(sub, "flag", _cmd_flag, "show or flip feature flags (shmreg.recipes.Flags)",
             "Show the feature flags kept in a table, or set one: every worker sees "
             "the change on its next read.  VALUE: on/off (true/false, 1/0, yes/no) "
             "or 'unset'.")
    p.add_argument("name", help="table name")
    p.add_argument("flag", nargs="?", help="flag name (all flags if omitted)")
    p.add_argument("value", nargs="?", help="on | off | unset")
    p.add_argument("--prefix", default="flag:", help="key prefix of the flags (default 'flag:')")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = _add(sub, "top", _cmd_top, "live view of a table's activity",
             "A live view refreshed in place: ops/s (from the shared set/delete "
             "counters and the sampled read counters), hit ratio, entries, memory, "
             "live owners, watcher.  Without a terminal, frames are printed one after "
             "another with no control codes.  Ctrl-C exits.")
    p.add_argument("name", help="table name")
    p.add_argument("--interval", type=float, default=1.0, metavar="S",
                   help="seconds between frames (default 1)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--once", action="store_true", help="render one frame (after one interval) and exit")
    g.add_argument("--frames", type=int, metavar="N", help="render N frames and exit")

    p = _add(sub, "destroy", _cmd_destroy, "remove a table",
             "Unlink a table (and its NAME--flights companion made by shmreg.Cache, if "
             "any).  Refused (exit 4) while a live process holds a slot in it "
             "(owned entries, registrations) or a watcher is active, unless --force.  "
             "Processes that have it open keep using it until they close it.")
    p.add_argument("name", help="table name")
    p.add_argument("--force", action="store_true", help="destroy even while in use")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = _add(sub, "demo", _cmd_demo, "run worker processes on one table, kill one mid-write, verify",
             "Several worker processes share one table: counters, "
             "insert_new, TTL expiry, and a kill -9 of one worker in the "
             "middle of a write, then proof that the table is intact.")
    p.add_argument("--workers", type=int, default=4, help="worker processes (default 4)")
    p.add_argument("--seconds", type=float, default=2.0, help="how long they run (default 2)")

    p = _add(sub, "bench", _cmd_bench, "benchmark shmreg against the installed peers",
             "Time get (hit, miss), set and update_counter on shmreg and each peer "
             "that is installed: dict, multiprocessing.Manager().dict, py-lmdb, "
             "diskcache, UltraDict, and Redis / memcached when a server already "
             "answers on loopback (none is started).  Prints ops/s and the ratio to "
             "dict; writes a Markdown report and a PNG chart on request.  Progress "
             "goes to stderr.")
    p.add_argument("--quick", action="store_true", help="small data set and short timings (seconds)")
    p.add_argument("--peers", metavar="LIST",
                   help="comma-separated peers to run (default: all available): "
                        "dict,shmreg,manager,lmdb,diskcache,ultradict,redis,memcached")
    p.add_argument("--no-servers", action="store_true",
                   help="do not probe for Redis / memcached servers")
    p.add_argument("--redis", metavar="ADDR", help="Redis at HOST:PORT or a unix socket path")
    p.add_argument("--memcached", metavar="ADDR", help="memcached at HOST:PORT or a unix socket path")
    p.add_argument("--entries", type=int, metavar="N", help="entries loaded into each peer")
    p.add_argument("--ops", type=int, metavar="N", help="operations per timed call")
    p.add_argument("--repeat", type=int, metavar="N", help="measurements per cell (best is kept)")
    p.add_argument("--seconds", type=float, metavar="S", help="time budget per peer and operation")
    p.add_argument("--output", "-o", metavar="FILE.md", help="write a Markdown report")
    p.add_argument("--chart", metavar="FILE.png", help="write a PNG chart (needs matplotlib)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")

    from shmreg.lint import report as lint_report
    p = _add(sub, "lint", _cmd_lint, "find per-process state that diverges across prefork workers",
             "Check Python sources (read with ast, nothing is imported) for module- and "
             "class-level state that a function mutates at run time: each prefork worker "
             "(gunicorn, uWSGI, Celery, multiprocessing) has its own copy, and they drift "
             "apart silently.  Each finding names the shmreg replacement.  Settings come "
             "from [tool.shmreg.lint] in the nearest pyproject.toml.  Exit codes: 0 clean, "
             "1 findings, 2 usage error.  --list-rules shows the rules.")
    lint_report.add_arguments(p)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 error, 2 usage, 3 corrupt,
    4 destroy refused)."""
    args, extra = build_parser().parse_known_args(argv)
    if extra:   # reported with the subcommand's usage, not the top-level one
        args._parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        rc = args.func(args)
        sys.stdout.flush()
        return rc
    except BrokenPipeError:  # e.g. `shmreg dump t | head`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except CliError as e:
        print(f"shmreg: {e}", file=sys.stderr)
        return e.code
    except shmreg.CorruptTableError as e:
        print(f"shmreg: corrupt table: {e}", file=sys.stderr)
        return EXIT_CORRUPT
    except (shmreg.Error, ValueError, TypeError, OSError) as e:
        if isinstance(e, OSError) and e.strerror:
            msg = e.strerror
            if e.filename and not isinstance(e, shmreg.Error):
                msg += f": {e.filename}"
        else:
            msg = str(e)
        print(f"shmreg: {msg}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
