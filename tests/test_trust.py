"""The trust model: a process uses only segment files it may trust.

Hostile segments (links, FIFOs, another user's files, files others can
write) are refused with UntrustedTableError at once; sharing across users is
an explicit opt-in (``mode=`` + ``shmreg.Trust``); pickled values of a table
others can write stay opaque unless ``Trust(unpickle=True)``.

The tests of the second half create throwaway users (useradd) and run real
child processes as them: they need root, which CI has.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import shutil
import stat
import subprocess
import sys
import textwrap
import time

import pytest

import shmreg
import shmreg.mp
from shmreg import _segment
from _helpers import unique_name

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
CAN_ADD_USERS = IS_ROOT and shutil.which("useradd") is not None and shutil.which("groupadd") is not None
needs_users = pytest.mark.skipif(
    not CAN_ADD_USERS, reason="creates throwaway users: needs root and useradd/groupadd "
                              "(CI runs as root; as a normal user these cannot run)")


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("SHMREG_CRASH_AT", None)
    return subprocess.run([sys.executable, "-m", "shmreg", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def openers(name: str, **kw):
    """Every public way of opening table ``name`` by name."""
    return {
        "Table": lambda: shmreg.Table(name, **kw),
        "Table.open": lambda: shmreg.Table.open(name, **kw),
        "Registry": lambda: shmreg.Registry(name, **kw),
        "Cache": lambda: shmreg.Cache(name, **kw),
        "Watcher": lambda: shmreg.Watcher(name, **kw),
        "mp.attach": lambda: shmreg.mp.attach(name, **kw),
    }


def assert_all_refused(name: str, *words: str, **kw) -> None:
    for how, opener in openers(name, **kw).items():
        with pytest.raises(shmreg.UntrustedTableError) as ei:
            opener()
        msg = str(ei.value)
        assert _segment.path_of(name) in msg, (how, msg)
        for w in words:
            assert w in msg, (how, w, msg)
        assert isinstance(ei.value, PermissionError)


def leftovers() -> list:
    return [n for n in os.listdir(_segment.segment_dir()) if n.startswith(".shmreg-init.")]


# -- links, special files, loose modes (any user) -----------------------------------------

@pytest.mark.timeout(30)
def test_dangling_symlink_fails_at_once(table_name):
    path = _segment.path_of(table_name)
    os.symlink(os.path.join(os.path.dirname(path), "nowhere", "x"), path)
    try:
        start = time.monotonic()
        assert_all_refused(table_name, "symbolic link", "never follows links")
        assert time.monotonic() - start < 20   # (the old code looped forever here)
        with pytest.raises(shmreg.TableExistsError):
            shmreg.Table.create(table_name)
        assert os.path.islink(path) and leftovers() == []
    finally:
        os.unlink(path)


@pytest.mark.timeout(30)
def test_symlink_to_a_real_table_is_not_followed(table, table_name):
    other = unique_name("target")
    with shmreg.Table.create(other, capacity=100, memory=1 << 16) as t:
        t["secret"] = 1
    link = _segment.path_of(table_name) + "-link"
    os.symlink(_segment.path_of(other), link)
    try:
        assert_all_refused(table_name + "-link", "symbolic link")
    finally:
        os.unlink(link)
        shmreg.unlink(other)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_special_file_at_a_name_is_refused(table_name, kind):
    path = _segment.path_of(table_name)
    (os.mkfifo if kind == "fifo" else os.mkdir)(path)
    try:
        assert_all_refused(table_name, "FIFO" if kind == "fifo" else "directory")
    finally:
        (os.unlink if kind == "fifo" else os.rmdir)(path)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("file_mode, words", [(0o666, "writable by every user"),
                                              (0o606, "writable by every user"),
                                              (0o660, "writable by group")])
def test_own_table_writable_by_others_needs_a_shared_mode(table_name, file_mode, words):
    with shmreg.Table.create(table_name, capacity=100, memory=1 << 16) as t:
        t["obj"] = {"a": [1]}
        t["n"] = 5
    os.chmod(_segment.path_of(table_name), file_mode)
    assert_all_refused(table_name, words, f"{file_mode:#o}")
    # Asking for that sharing opens it, but others can write it: pickled
    # values stay opaque unless unpickling is trusted explicitly.
    with shmreg.Table.open(table_name, mode=file_mode) as t:
        assert t["n"] == 5
        raw = t["obj"]
        assert type(raw) is shmreg.PickledValue and pickle.loads(raw) == {"a": [1]}
        assert dict(t.items())["obj"] == raw
    with shmreg.Table.open(table_name, mode=file_mode, trust=shmreg.Trust(unpickle=True)) as t:
        assert t["obj"] == {"a": [1]}
    # Our own private table unpickles as always.
    os.chmod(_segment.path_of(table_name), 0o600)
    with shmreg.Table.open(table_name) as t:
        assert t["obj"] == {"a": [1]} and t.allow_pickle


def test_created_shared_table_opens_with_the_same_mode(table_name):
    # Creating with a shared mode is asking for that sharing: the same call opens it.
    with shmreg.Table(table_name, mode=0o660, capacity=100, memory=1 << 16) as t:
        assert stat.S_IMODE(os.stat(t.path).st_mode) == 0o660
        t["l"] = [1]
        assert type(t["l"]) is shmreg.PickledValue   # the group can write it
    # A Cache on a table made plain says so (wt/everyday's mismatch warning).
    with pytest.warns(shmreg.ConfigMismatchWarning, match="no eviction"):
        c = shmreg.Cache(table_name, mode=0o660)
    with c:
        assert c.table.mode == 0o660
        assert c.get_or_set("k", lambda: 1) == 1    # the flights table gets the mode too
        assert stat.S_IMODE(os.stat(c._flight_table().path).st_mode) == 0o660
        c.unlink()


def test_pickled_table_reopens_with_its_trust(table_name):
    trust = shmreg.Trust(uids=[os.geteuid()], unpickle=True)
    with shmreg.Table(table_name, mode=0o640, trust=trust, capacity=100, memory=1 << 16) as t:
        with pickle.loads(pickle.dumps(t)) as again:
            assert (again.name, again.mode, again.trust) == (table_name, 0o640, trust)


def test_trust_and_mode_validation():
    assert shmreg.Trust(uids=0).uids == frozenset({0})
    assert shmreg.Trust(uids=["root", "0"], gids=[0]).uids == frozenset({0})
    with pytest.raises(ValueError, match="no user named"):
        shmreg.Trust(uids=["no-such-user-shmreg"])
    with pytest.raises(ValueError, match="no group named"):
        shmreg.Trust(gids=["no-such-group-shmreg"])
    with pytest.raises(TypeError):
        shmreg.Trust(uids=[1.5])
    with pytest.raises(TypeError):
        shmreg.Trust(unpickle="yes")
    with pytest.raises(TypeError, match="shmreg.Trust"):
        shmreg.Table("x", trust={"uids": [0]})
    with pytest.raises(ValueError):
        shmreg.Table("x", mode=0o4777)
    r = cli("dump", "x", "--trust", "no-such-user-shmreg")
    assert r.returncode == 1 and "no user named" in r.stderr
    r = cli("dump", "x", "--mode", "99")
    assert r.returncode == 2 and "octal" in r.stderr


# -- ttl=inf: one meaning everywhere ---------------------------------------------------------

def test_inf_ttl_never_expires_in_cache_and_cli(table_name):
    inf = float("inf")
    with shmreg.Cache(table_name, ttl=inf) as c:
        c["a"] = 1
        c.set("b", 2, ttl=inf)
        assert c.add("c", 3, ttl=inf)
        assert c.get_or_set("d", lambda: 4, ttl=inf) == 4
        c.set("e", 5, ttl=10)
        assert c.touch("e", ttl=inf)
        assert c.memoize(ttl=inf)(lambda x: x + 1)(1) == 2
        assert all(c.table.ttl(k) is None for k in c.table.keys())
        for bad in (0, -1, float("nan"), -inf):
            with pytest.raises(ValueError):
                c.set("z", 1, ttl=bad)
    r = cli("set", table_name, "k", "v", "--ttl", "inf")
    assert r.returncode == 0, r.stderr
    r = cli("get", table_name, "k", "--json")
    assert json.loads(r.stdout)["ttl"] is None
    for bad in ("nan", "0", "-inf"):
        r = cli("set", table_name, "k", "v", "--ttl", bad)
        assert r.returncode == 2 and "--ttl" in r.stderr, (bad, r.stderr)
    shmreg.Cache(table_name).unlink()


# -- real users ------------------------------------------------------------------------------

def _admin(*cmd: str) -> None:
    # useradd & co. lock /etc/passwd; a concurrent run elsewhere may hold it.
    for attempt in range(20):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if r.returncode == 0:
            return
        if "lock" not in (r.stderr + r.stdout).lower():
            break
        time.sleep(0.25)
    raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr}")


class Users:
    """Two throwaway users (``alice``, ``mallory``) and a group ``team``
    holding both, created for this module and deleted after it."""

    def __init__(self) -> None:
        import grp
        import pwd

        tag = f"{os.getpid() % 100000}"
        self.group = f"shmregt{tag}"
        self.names = {"alice": f"shmregt{tag}a", "mallory": f"shmregt{tag}m"}
        _admin("groupadd", self.group)
        self.made = []
        for login in self.names.values():
            _admin("useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", "--user-group",
                   "--groups", self.group, login)
            self.made.append(login)
        self.gid = grp.getgrnam(self.group).gr_gid
        self.pw = {who: pwd.getpwnam(login) for who, login in self.names.items()}

    def uid(self, who: str) -> int:
        return self.pw[who].pw_uid

    def delete(self) -> None:
        for login in self.made:
            _admin("userdel", login)
        _admin("groupdel", self.group)

    def run(self, who: str, code: str, *args: str, egid: int | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
        """Run ``code`` in a fresh interpreter as user ``who`` (groups: its
        own and ``team``; effective group ``egid``, default its own).

        The interpreter imports shmreg as root and then drops every
        privilege for good (setgroups/setgid/setuid), so it does not matter
        whether the user could read the virtualenv."""
        pw = self.pw[who]
        prelude = textwrap.dedent(f"""\
            import grp, json, os, pickle, pwd, sys
            import psutil
            import shmreg, shmreg._proc, shmreg.cli, shmreg.mp, shmreg.recipes
            os.setgroups([{pw.pw_gid}, {self.gid}])
            os.setgid({pw.pw_gid if egid is None else egid})
            os.setuid({pw.pw_uid})
            assert os.geteuid() == os.getuid() == {pw.pw_uid}
            """)
        env = dict(os.environ)
        env.pop("SHMREG_CRASH_AT", None)
        return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code), *args],
                              capture_output=True, text=True, timeout=timeout, env=env, cwd="/")


@pytest.fixture(scope="module")
def users():
    u = Users()
    try:
        yield u
    finally:
        u.delete()


EVIL = """
    class Evil:
        def __reduce__(self):
            return (os.mkdir, (sys.argv[2],))   # runs as whoever unpickles it (once: else EEXIST)

    t = shmreg.Table(sys.argv[1], mode=0o666, capacity=100, memory=1 << 16)
    t["config"] = Evil()
    t["n"] = 7
    print(oct(os.stat(t.path).st_mode & 0o777))
"""


@pytest.fixture
def planted(users, table_name, tmp_path):
    """Table ``table_name`` created by mallory with mode 0o666 and a pickle
    that makes directory ``marker`` when unpickled."""
    marker = str(tmp_path / "pwned")
    r = users.run("mallory", EVIL, table_name, marker)
    assert r.returncode == 0 and r.stdout.strip() == "0o666", r.stderr
    assert os.stat(_segment.path_of(table_name)).st_uid == users.uid("mallory")
    yield table_name, marker
    try:
        shmreg.unlink(table_name, trust=shmreg.Trust(uids=[users.uid("mallory")]))
    except shmreg.TableNotFoundError:
        pass


@needs_users
@pytest.mark.timeout(120)
def test_another_users_table_is_refused_everywhere(users, planted):
    name, marker = planted
    login, uid = users.names["mallory"], users.uid("mallory")
    # The attack of the issue: the victim opens "its" table as the README shows.
    assert_all_refused(name, f"{login} (uid {uid})", "0o666",
                       f"Table(name, mode=0o666, trust=shmreg.Trust(uids=[{uid}]))", f"--trust {login} --mode 666")
    assert_all_refused(name, login, mode=0o666)   # asking for sharing is not trusting mallory
    with pytest.raises(shmreg.TableExistsError, match=login):
        shmreg.Table.create(name)
    for cmd in (["get", name, "config"], ["dump", name], ["stat", name], ["check", name],
                ["flag", name], ["reap", name], ["destroy", name], ["watch", name]):
        r = cli(*cmd)
        assert r.returncode == 1 and login in r.stderr and "Traceback" not in r.stderr, (cmd, r.stderr)
    # The gunicorn helpers and recipes open by name too.
    import shmreg.gunicorn as gu
    from shmreg.recipes import flags_command

    with pytest.raises(shmreg.UntrustedTableError):
        flags_command(name)
    old = gu._configured
    try:
        gu.configure({name: "table"}, registry=None)
        with pytest.raises(shmreg.UntrustedTableError):
            gu.table(name)
    finally:
        gu._configured = old
    # Another ordinary user is refused the same way.
    r = users.run("alice", """
        try:
            shmreg.Table(sys.argv[1])
        except shmreg.UntrustedTableError as e:
            print("refused", e.owner_uid)
    """, name)
    assert r.stdout.split() == ["refused", str(uid)], r.stderr
    assert not os.path.exists(marker)


@needs_users
@pytest.mark.timeout(120)
def test_a_planted_single_flight_table_is_refused(users, table_name, tmp_path):
    # Cache opens a second table by name, NAME--flights, on its first get_or_set.
    flights = f"{table_name}--flights"
    r = users.run("mallory", EVIL, flights, str(tmp_path / "pwned"))
    assert r.returncode == 0, r.stderr
    try:
        with shmreg.Cache(table_name) as c:
            with pytest.raises(shmreg.UntrustedTableError, match=users.names["mallory"]):
                c.get_or_set("k", lambda: 1)
            r = cli("destroy", table_name)   # removes NAME--flights too: not someone else's
            assert r.returncode == 1 and users.names["mallory"] in r.stderr
            c.table.unlink()
    finally:
        shmreg.unlink(flights, trust=shmreg.Trust(uids=[users.uid("mallory")]))


@needs_users
@pytest.mark.timeout(120)
def test_explicit_trust_opens_but_unpickles_only_on_request(users, planted):
    name, marker = planted
    uid = users.uid("mallory")
    with shmreg.Table(name, mode=0o666, trust=shmreg.Trust(uids=[uid])) as t:
        assert t["n"] == 7
        value = t["config"]
        assert type(value) is shmreg.PickledValue and b"mkdir" in value
        assert dict(t.items())["config"] == value
        assert not os.path.exists(marker)
    with shmreg.Registry(name, mode=0o666, trust=shmreg.Trust(uids=[uid])) as reg:
        assert reg.table["config"] == value
    # The explicit opt-in really does run the writer's code, as the docs warn.
    with shmreg.Table(name, mode=0o666, trust=shmreg.Trust(uids=[users.names["mallory"]],
                                                            unpickle=True)) as t:
        assert t["config"] is None
    assert os.path.isdir(marker)


@needs_users
@pytest.mark.timeout(120)
def test_root_dump_shows_opaque_bytes_with_a_note(users, planted):
    name, marker = planted
    login = users.names["mallory"]
    r = cli("dump", name, "--trust", login, "--mode", "666")
    assert r.returncode == 0, r.stderr
    assert "'config': <pickled value," in r.stdout and "not unpickled>" in r.stdout
    assert "'n': 7" in r.stdout
    assert "shown as opaque bytes" in r.stderr and "--unpickle" in r.stderr and login in r.stderr
    r = cli("dump", name, "--trust", login, "--mode", "666", "--json")
    entries = {e["key"]: e["value"] for e in json.loads(r.stdout)["entries"]}
    assert entries["config"]["unpickled"] is False and entries["n"] == 7
    assert b"mkdir" in base64.b64decode(entries["config"]["pickle_b64"])
    r = cli("get", name, "config", "--trust", str(users.uid("mallory")), "--mode", "666")
    assert r.returncode == 0 and r.stdout.startswith("<pickled value") and "opaque" in r.stderr
    assert not os.path.exists(marker)
    r = cli("get", name, "config", "--trust", login, "--mode", "666", "--unpickle")
    assert r.returncode == 0 and r.stdout.strip() == "None", r.stderr
    assert os.path.isdir(marker)


@needs_users
@pytest.mark.timeout(120)
def test_two_users_share_a_table_through_their_group(users, table_name):
    alice, gid = users.uid("alice"), users.gid
    # alice creates a table for the team (group-writable, group = team)
    r = users.run("alice", """
        t = shmreg.Table(sys.argv[1], mode=0o660, capacity=100, memory=1 << 16)
        t["jobs"] = 1
        t["meta"] = {"by": "alice"}
        st = os.stat(t.path)
        print(oct(st.st_mode & 0o777), st.st_gid)
    """, table_name, egid=gid)
    assert r.returncode == 0 and r.stdout.split() == ["0o660", str(gid)], r.stderr
    # mallory (also in the team) must name both alice and the team
    code = """
        kw = json.loads(sys.argv[2])
        trust = shmreg.Trust(**kw.pop("trust")) if "trust" in kw else None
        try:
            with shmreg.Table.open(sys.argv[1], trust=trust, **kw) as t:
                print("ok", t.update_counter("jobs"), type(t["meta"]).__name__)
        except shmreg.UntrustedTableError as e:
            print("refused", str(e).split(" is ", 1)[1].split(":")[0])
    """
    try:
        for kw, out in [({}, "refused not yours"),
                        ({"trust": {"uids": [alice]}}, "refused writable by group"),
                        ({"mode": 0o660, "trust": {"uids": [alice]}}, "refused writable by group"),
                        ({"mode": 0o660, "trust": {"uids": [alice], "gids": [gid]}}, "ok 2 PickledValue"),
                        ({"mode": 0o660, "trust": {"uids": [alice], "gids": [users.group],
                                                   "unpickle": True}}, "ok 3 dict")]:
            r = users.run("mallory", code, table_name, json.dumps(kw))
            assert r.returncode == 0 and r.stdout.strip().startswith(out), (kw, r.stdout, r.stderr)
    finally:
        shmreg.unlink(table_name, trust=shmreg.Trust(uids=[alice]))


@needs_users
@pytest.mark.timeout(120)
def test_junk_file_of_another_user_says_who_owns_it(users, table_name):
    path = _segment.path_of(table_name)
    r = users.run("mallory", "os.close(os.open(sys.argv[1], os.O_CREAT | os.O_WRONLY, 0o600))", path)
    assert r.returncode == 0, r.stderr
    try:
        login = users.names["mallory"]
        assert_all_refused(table_name, login, "not yours")       # root can open it: still refused
        with pytest.raises(shmreg.TableExistsError, match=login):
            shmreg.Table.create(table_name)
        # alice cannot even open it (EACCES): the error still names the owner
        r = users.run("alice", """
            try:
                shmreg.Table(sys.argv[1])
            except shmreg.UntrustedTableError as e:
                print("refused", e.owner_uid)
        """, table_name)
        assert r.stdout.split() == ["refused", str(users.uid("mallory"))], r.stderr
        # with trust, root sees what it is: not a table
        with pytest.raises(shmreg.IncompatibleTableError):
            shmreg.Table.open(table_name, trust=shmreg.Trust(uids=[login]))
    finally:
        os.unlink(path)


@needs_users
@pytest.mark.timeout(120)
def test_ls_and_list_tables_show_your_tables_unless_asked(users, planted):
    name, _ = planted
    login = users.names["mallory"]
    table = shmreg.Table.create(unique_name("mine"), capacity=100, memory=1 << 16)
    assert table.name in shmreg.list_tables() and name not in shmreg.list_tables()
    assert {table.name, name} <= set(shmreg.list_tables(all_users=True))
    r = cli("ls", "--json")
    assert [row["name"] for row in json.loads(r.stdout)] == shmreg.list_tables()
    r = cli("ls", "--all")
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith(name))
    assert login in line and f"--trust {login}" in line
    r = cli("ls", "--all", "--json", "--trust", login, "--mode", "666")
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert rows[name]["owner"] == login and rows[name]["entries"] == 2
    # mallory's own listing has only hers
    r = users.run("mallory", "print(json.dumps(shmreg.list_tables()))")
    assert name in json.loads(r.stdout) and table.name not in json.loads(r.stdout)
    table.unlink()
    table.close()


@needs_users
@pytest.mark.timeout(120)
def test_unlink_of_another_users_table_is_refused(users, planted):
    name, _ = planted
    with pytest.raises(shmreg.UntrustedTableError, match=users.names["mallory"]):
        shmreg.unlink(name)
    r = cli("destroy", name)
    assert r.returncode == 1 and users.names["mallory"] in r.stderr
    assert os.path.exists(_segment.path_of(name))
    r = cli("destroy", name, "--trust", users.names["mallory"], "--mode", "666")
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(_segment.path_of(name))


@needs_users
@pytest.mark.timeout(120)
def test_sweep_removes_only_our_own_orphans(users, table_name):
    d = _segment.segment_dir()
    dead = 2 ** 22 + 1   # above pid_max: never alive
    theirs = os.path.join(d, f".shmreg-init.{table_name}x.{dead}.abcd")
    mine = os.path.join(d, f".shmreg-init.{table_name}y.{dead}.abcd")
    r = users.run("mallory", "os.close(os.open(sys.argv[1], os.O_CREAT | os.O_WRONLY, 0o600))", theirs)
    assert r.returncode == 0, r.stderr
    open(mine, "wb").close()
    try:
        shmreg.Table.create(table_name, capacity=100, memory=1 << 16).close()
        assert os.path.exists(theirs) and not os.path.exists(mine)
    finally:
        os.unlink(theirs)


# -- pool workers and the fallback directory ---------------------------------------------------

def _worker_reads(key):
    t = shmreg.mp.table()
    return type(t[key]).__name__, t.mode, t.update_counter("n")


@pytest.mark.timeout(120)
def test_pool_workers_attach_with_the_sharing_given(table_name):
    import multiprocessing

    with shmreg.Table.create(table_name, capacity=100, memory=1 << 16) as t:
        t["obj"] = [1, 2]
    os.chmod(_segment.path_of(table_name), 0o666)
    ctx = multiprocessing.get_context("spawn")
    with pytest.raises(shmreg.UntrustedTableError):
        shmreg.mp.attach(table_name)         # what a worker without the sharing gets
    with ctx.Pool(2, **shmreg.mp.pool_kwargs(table_name, mode=0o666)) as pool:
        got = pool.map(_worker_reads, ["obj"] * 4)
    assert sorted(n for *_, n in got) == [1, 2, 3, 4]
    assert {(kind, mode) for kind, mode, _ in got} == {("PickledValue", 0o666)}


def test_fallback_directory_of_another_user_is_refused(tmp_path, monkeypatch):
    # Without /dev/shm (macOS), tables live in $TMPDIR/shmreg-<uid>: a
    # directory someone else made there first, or one others can write, is refused.
    monkeypatch.delenv("SHMREG_DIR")
    real_isdir = os.path.isdir
    monkeypatch.setattr(os.path, "isdir", lambda p: p != "/dev/shm" and real_isdir(p))
    monkeypatch.setattr(_segment.tempfile, "gettempdir", lambda: str(tmp_path))
    d = tmp_path / f"shmreg-{os.getuid()}"
    assert _segment.segment_dir() == str(d)          # made now, mode 0700: fine
    os.chmod(d, 0o777)
    with pytest.raises(shmreg.UntrustedTableError, match="segment directory"):
        _segment.segment_dir()
