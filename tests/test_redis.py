"""The table surface on a real Redis/Valkey server and a real 3-master Cluster
(started by the fixtures): the local suite's API behaviour that applies,
plus what is particular to a server (bad data on it, its eviction policy,
outages)."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import shmreg
from _helpers import unique_name, wait_until
from _redis_servers import Server

redis = pytest.importorskip("redis")   # the test extra installs it: never skipped in CI
from shmreg.backends.redis import list_tables  # noqa: E402
from shmreg.backends.redis.codec import encode_value  # noqa: E402

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=["server", "cluster"])
def url(request):
    """The URL of the single server, then of the Cluster."""
    fixture = "redis_server" if request.param == "server" else "redis_cluster"
    return request.getfixturevalue(fixture).url


@pytest.fixture
def rt(url):
    """A fresh table on the server (unlinked afterwards)."""
    t = shmreg.Table(unique_name("r"), url=url, lease_ttl=5)
    yield t
    if not t.closed:
        t.unlink()
        t.close()


def child(code: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def finish(p: subprocess.Popen, timeout: float = 60) -> str:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err
    return out


def kill_all(procs) -> None:
    """Kill the children still running (a failed test) and collect them."""
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.communicate(timeout=10)


# -- the dict / ETS surface ------------------------------------------------------

def test_is_a_table_and_dict_protocol(rt):
    assert isinstance(rt, shmreg.Table)
    rt["a"] = 1
    rt[b"a"] = b"bytes"
    rt[1] = "int key"
    assert rt["a"] == 1 and rt[b"a"] == b"bytes" and rt[1] == "int key"
    assert rt[True] == "int key"          # True is the key 1, as in a dict
    assert "1" not in rt and 1 in rt
    assert len(rt) == 3
    assert sorted(rt.keys(), key=repr) == sorted(["a", b"a", 1], key=repr)
    assert sorted(map(repr, rt.values())) == sorted(map(repr, [1, b"bytes", "int key"]))
    assert dict(rt.items()) == {"a": 1, b"a": b"bytes", 1: "int key"}
    assert set(rt) == {"a", b"a", 1}
    del rt["a"]
    with pytest.raises(KeyError):
        del rt["a"]
    with pytest.raises(KeyError):
        rt["a"]
    assert rt.get("a", "dflt") == "dflt"
    rt.update({"x": 1}, y=2)
    assert rt.pop("x") == 1 and rt.pop("x", None) is None
    with pytest.raises(KeyError):
        rt.pop("x")
    rt.clear()
    assert len(rt) == 0 and rt.items() == []


@pytest.mark.parametrize("value", [
    b"", b"\x00\xff" * 100, "", "héllo \U0001F600", 0, -1, 2**63 - 1, -2**63, 2**64, 1.5, -0.0,
    float("inf"), True, False, None, {"a": [1, 2, (3,)]}, {1, 2}, 7 + 1j])
def test_values_round_trip_with_their_type(rt, value):
    rt["k"] = value
    got = rt["k"]
    assert got == value and type(got) is type(value)


def test_big_value_and_many_keys(rt):
    rt["big"] = b"x" * (1 << 20)
    assert len(rt["big"]) == 1 << 20
    rt.update((f"k{i}", i) for i in range(1200))     # more than one page of the index
    assert len(rt) == 1201
    assert sorted(v for k, v in rt.items() if k != "big") == list(range(1200))


def test_ets_operations(rt):
    assert rt.insert_new("lock", "w1") is True
    assert rt.insert_new("lock", "w2") is False
    assert rt["lock"] == "w1"
    assert rt.setdefault("sd", 5) == 5 and rt.setdefault("sd", 6) == 5
    assert rt.take("sd") == 5 and rt.take("sd", "none") == "none"
    with pytest.raises(KeyError):
        rt.take("sd")
    assert rt.update_counter("n") == 1
    assert rt.update_counter("n", 10) == 11
    assert rt.update_counter("m", -5, default=100) == 95
    assert rt["n"] == 11 and type(rt["n"]) is int
    rt["s"] = "text"
    with pytest.raises(TypeError):
        rt.update_counter("s")
    rt["max"] = 2**63 - 1
    with pytest.raises(OverflowError):
        rt.update_counter("max")
    assert rt["max"] == 2**63 - 1
    with pytest.raises(TypeError):
        rt.update_counter("n", 1.5)
    assert rt.compare_and_swap("lock", "w1", "w3") is True
    assert rt.compare_and_swap("lock", "w1", "w4") is False
    assert rt.compare_and_swap("absent", None, 1) is False
    rt["f"] = 1.0
    assert rt.compare_and_swap("f", 1, 2.0) is True   # == as in the local table
    assert rt["f"] == 2.0


def test_ttl_expire_and_purge(rt):
    rt.set("short", 1, ttl=2)
    rt.set("long", 2, ttl=60)
    rt["forever"] = 3
    assert 0 < rt.ttl("short") <= 2
    assert 59 < rt.ttl("long") <= 60
    assert rt.ttl("forever") is None
    with pytest.raises(KeyError):
        rt.ttl("absent")
    wait_until(lambda: "short" not in rt, 10, "short-lived entry to expire")
    assert rt.get("short") is None
    assert len(rt) == 2
    assert rt.expire("long", None) is True and rt.ttl("long") is None
    assert rt.expire("absent", 1) is False
    rt.update_counter("c", ttl=0.2)
    wait_until(lambda: "c" not in rt, 10, "counter to expire")
    assert rt.update_counter("c") == 1            # starts again from the default
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError):
            rt.set("x", 1, ttl=bad)
    rt.set("gone", 1, ttl=0.1)
    wait_until(lambda: rt.get("gone") is None, 10, "expiry")
    assert rt.purge_expired() >= 0 and "gone" not in rt.keys()


def test_select_by_prefix_and_owner(rt):
    for i in range(5):
        rt[f"job:{i}"] = i
        rt[f"user:{i}"] = -i
    rt[b"job:\xff\xff"] = "bytes key"
    rt.set("job:owned", "mine", owned=True)
    assert sorted(k for k, _ in rt.select(prefix="job:")) == sorted(
        [f"job:{i}" for i in range(5)] + ["job:owned"])
    assert list(rt.select(prefix=b"job:")) == [(b"job:\xff\xff", "bytes key")]
    assert list(rt.select(prefix="nothing")) == []
    assert list(rt.select(owner=os.getpid())) == [("job:owned", "mine")]
    assert rt.owner("job:owned") == os.getpid() and rt.owner("job:1") is None
    with pytest.raises(TypeError):
        list(rt.select(prefix=1))


def test_create_open_unlink_and_list(url):
    name = unique_name("life")
    with pytest.raises(shmreg.TableNotFoundError):
        shmreg.Table.open(name, url=url)
    t = shmreg.Table.create(name, url=url)
    try:
        with pytest.raises(shmreg.TableExistsError):
            shmreg.Table.create(name, url=url)
        t["k"] = 1
        assert name in list_tables(url)
        with shmreg.Table.open(name, url=url) as t2:
            assert t2["k"] == 1
        assert t2.closed
        with pytest.raises(ValueError):
            t2["k"]
        assert pickle.loads(pickle.dumps(t))["k"] == 1
    finally:
        t.unlink()
        t.close()
    assert name not in list_tables(url)


# -- bad input ---------------------------------------------------------------------

def test_bad_input_gives_clear_errors(rt, url):
    with pytest.raises(TypeError):
        rt[1.5] = 1
    with pytest.raises(TypeError):
        rt.get([1])
    with pytest.raises(ValueError):
        shmreg.Table("../x", url=url)
    with pytest.raises(ValueError):
        shmreg.Table("x", url="http://localhost/")
    with pytest.raises(ValueError):
        shmreg.Table("x", url=url, lease_ttl=0)
    with pytest.raises(ValueError):
        shmreg.Table("x", url=url, clock=time.monotonic)


def test_garbage_on_the_server_is_a_clear_error(redis_server):
    rt = shmreg.Table(unique_name("junk"), url=redis_server.url)
    c = redis_server.client()
    p = f"{{shmreg:{rt.name}}}"
    for garbage in (b"", b"\x09junk", b"12x", b"\x04short", b"\x07not a pickle", b"\x06\xff\xfe"):
        c.set(p + ":k:sbad", garbage)
        with pytest.raises(shmreg.CorruptTableError):
            rt["bad"]
    c.set(p + ":k:sbad", encode_value("fine"))
    assert rt["bad"] == "fine"
    c.zadd(p + ":idx", {p + ":k:zforeign": 0})
    c.set(p + ":k:zforeign", b"1")
    with pytest.raises(shmreg.CorruptTableError):
        rt.keys()
    c.close()
    rt.unlink()
    rt.close()


def test_pickles_from_the_server_need_unpickle(url):
    name = unique_name("pk")
    with shmreg.Table(name, url=url) as w, shmreg.Table(name, url=url, unpickle=False) as r:
        w["obj"] = {"a": 1}
        got = r["obj"]
        assert isinstance(got, shmreg.PickledValue) and pickle.loads(got) == {"a": 1}
        assert r["obj"] != {"a": 1}
        w.unlink()


def test_eviction_policy_other_than_noeviction_warns():
    s = Server(extra=("--maxmemory-policy", "allkeys-lru")).start()
    try:
        with pytest.warns(shmreg.EvictionPolicyWarning, match="noeviction"):
            t = shmreg.Table(unique_name("ev"), url=s.url)
        t.unlink()
        t.close()
    finally:
        s.cleanup()


# -- Registry and Cache ----------------------------------------------------------------

def test_registry(url):
    reg = shmreg.Registry(unique_name("reg"), url=url, lease_ttl=5)
    try:
        reg.register("worker:1", {"port": 8001})
        with pytest.raises(shmreg.AlreadyRegisteredError) as e:
            reg.register("worker:1")
        assert e.value.pid == os.getpid()
        assert reg.whereis("worker:1") == os.getpid()
        assert reg.lookup("worker:1") == shmreg.Registration(os.getpid(), {"port": 8001})
        assert reg.lookup("nobody") is None and reg.whereis("nobody") is None
        assert reg.keys() == ["worker:1"] and reg.count() == 1
        assert reg.items() == [("worker:1", shmreg.Registration(os.getpid(), {"port": 8001}))]
        assert reg.unregister("worker:1") is True and reg.unregister("worker:1") is False
        assert reg.count() == 0
    finally:
        reg.table.unlink()
        reg.close()


def test_registration_of_a_process_that_dies_is_taken_over(url):
    name = unique_name("reg")
    p = child("""
        import sys, shmreg
        reg = shmreg.Registry(sys.argv[1], url=sys.argv[2], lease_ttl=5)
        reg.register("leader", "child")
        print("ok", flush=True)
        import time; time.sleep(60)
        """, name, url)
    try:
        assert p.stdout.readline().strip() == "ok"
        with shmreg.Registry(name, url=url, lease_ttl=5) as reg:
            assert reg.whereis("leader") == p.pid
            with pytest.raises(shmreg.AlreadyRegisteredError) as e:
                reg.register("leader")
            assert e.value.pid == p.pid
            os.kill(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
            # No watcher runs: the child's lease expires (lease_ttl), then
            # the key is free.
            wait_until(lambda: reg.whereis("leader") is None, 15, "lease expiry")
            reg.register("leader", "parent")
            assert reg.lookup("leader").value == "parent"
            reg.table.unlink()
    finally:
        if p.poll() is None:
            p.kill()
        p.communicate(timeout=10)


def test_cache_get_or_set_and_memoize(url):
    cache = shmreg.Cache(unique_name("cache"), url=url, ttl=60)
    try:
        calls = []
        assert cache.get_or_set("k", lambda: calls.append(1) or 42) == 42
        assert cache.get_or_set("k", lambda: calls.append(1) or 43) == 42
        assert calls == [1] and cache["k"] == 42 and "k" in cache

        def boom():
            raise RuntimeError("factory failed")
        with pytest.raises(RuntimeError):
            cache.get_or_set("bad", boom)
        assert cache.get_or_set("bad", lambda: "recovered") == "recovered"   # not poisoned

        @cache.memoize(ttl=30)
        def square(x):
            calls.append(x)
            return x * x
        assert square(4) == 16 and square(4) == 16 and calls.count(4) == 1
        assert square.cache_clear() == 1
        assert square(4) == 16 and calls.count(4) == 2
        assert cache.add("k", 1) is False and cache.delete("k") is True
        assert cache.touch("absent") is False
        s = cache.stats()
        assert s["hits"] >= 2 and s["misses"] >= 3 and s["entries"] >= 1
    finally:
        cache.unlink()
        cache.close()


def test_single_flight_across_processes(url):
    """Four processes ask for one missing key at once: one factory call."""
    name = unique_name("sf")
    code = """
        import sys, time, shmreg
        name, url = sys.argv[1], sys.argv[2]
        cache = shmreg.Cache(name, url=url, ttl=60, lease_ttl=5)
        calls = shmreg.Table(name + "-calls", url=url)
        def compute():
            calls.update_counter("factory")
            time.sleep(0.5)
            return "value"
        print(cache.get_or_set("key", compute, timeout=30))
        """
    procs = [child(code, name, url) for _ in range(4)]
    try:
        assert [finish(p).strip() for p in procs] == ["value"] * 4
        with shmreg.Table(name + "-calls", url=url) as calls:
            assert calls["factory"] == 1
            calls.unlink()
    finally:
        kill_all(procs)
        shmreg.Cache(name, url=url).unlink()


# -- races across processes --------------------------------------------------------------

def test_insert_new_one_winner_and_exact_counters(url):
    name = unique_name("race")
    code = """
        import sys, shmreg
        t = shmreg.Table(sys.argv[1], url=sys.argv[2])
        won = sum(t.insert_new(f"slot:{i}", sys.argv[3]) for i in range(50))
        for _ in range(300):
            t.update_counter("hits")
        print(won)
        """
    procs = [child(code, name, url, str(i), env={"SHMREG_HOST_ID": "host-" + "AB"[i % 2]})
             for i in range(4)]
    try:
        wins = [int(finish(p)) for p in procs]
        assert sum(wins) == 50                         # each slot: exactly one winner
        with shmreg.Table(name, url=url) as t:
            assert t["hits"] == 4 * 300                # exact
            assert len(t.select(prefix="slot:").__next__()) == 2
            assert len(list(t.select(prefix="slot:"))) == 50
            t.unlink()
    finally:
        kill_all(procs)


# Python >= 3.12 warns when forking a multi-threaded process (the heartbeat
# thread); the fork is the point.
@pytest.mark.filterwarnings("ignore:.*multi-threaded.*fork:DeprecationWarning")
def test_forked_child_takes_its_own_lease(rt):
    """A forked child is another owner: its owned entries are its own, and
    the parent's stay the parent's after the child is gone."""
    rt.set("parent", 1, owned=True)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child: report, and leave without atexit (as a crash would)
        try:
            rt.set("child", 2, owned=True)
            os.write(w, f"{rt.owner('child')} {rt.owner('parent')}".encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        child_view = f.read()
    os.waitpid(pid, 0)
    assert child_view == f"{pid} {os.getpid()}"
    assert rt.owner("parent") == os.getpid()
    rt.set("parent", 3, owned=True)          # the parent's lease was not disturbed
    assert rt["parent"] == 3


def test_sentinel_url_finds_the_master(redis_server, tmp_path):
    """``redis+sentinel://host:port/service``: a real Sentinel process
    monitoring the session's server names it as the master."""
    from _redis_servers import free_port, server_binary

    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
                    f"sentinel monitor shmreg-test 127.0.0.1 {redis_server.port} 1\n")
    proc = subprocess.Popen([server_binary(), str(conf), "--sentinel"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        sentinel = redis.Redis(host="127.0.0.1", port=port)
        wait_until(lambda: _sentinel_ready(sentinel), 15, "sentinel to answer")
        sentinel.close()
        # Two Sentinels named (the second is down): the first one answers.
        url = f"redis+sentinel://127.0.0.1:{port},127.0.0.1:{free_port()}/shmreg-test/0"
        with shmreg.Table(unique_name("sent"), url=url) as t:
            t["k"] = "through sentinel"
            with shmreg.Table(t.name, url=redis_server.url) as direct:
                assert direct["k"] == "through sentinel"
            t.unlink()
        # A near cache finds the master through the Sentinels too (its agent
        # once parsed the URL as one host:port and stopped on the list).
        c = shmreg.Cache(unique_name("sent-near"), url=url, near=True, ttl=60)
        try:
            c.set("n", 1)
            wait_until(lambda: c.table.near_stats()["near_state"] == "ready", 20, "the near cache")
            wait_until(lambda: c.get("n") == 1 and c.table.near.get("n") == 1, 10, "a fill")
            c.set("n", 2)                       # the write drops the local copy
            assert c.get("n") == 2
        finally:
            c.unlink()
            c.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _sentinel_ready(client) -> bool:
    try:
        return client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "shmreg-test") is not None
    except redis.exceptions.ConnectionError:
        return False


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_keys = st.one_of(st.text(max_size=4), st.binary(max_size=4), st.integers(-3, 3))
_values = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=False),
                    st.text(max_size=8), st.binary(max_size=8), st.lists(st.integers(), max_size=3))
_ops = st.lists(st.tuples(st.sampled_from(["set", "del", "insert_new", "take", "counter", "setdefault"]),
                          _keys, _values), max_size=20)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_ops)
def test_model_against_a_dict(redis_server, ops):
    """Random operation sequences leave the Redis table equal to a dict."""
    t = shmreg.Table(unique_name("model"), url=redis_server.url)
    model: dict = {}
    try:
        for op, k, v in ops:
            if op == "set":
                t[k] = v
                model[k] = v
            elif op == "del":
                assert t.delete(k) == (k in model)
                model.pop(k, None)
            elif op == "insert_new":
                assert t.insert_new(k, v) == (k not in model)
                model.setdefault(k, v)
            elif op == "take":
                assert t.take(k, "absent") == model.pop(k, "absent")
            elif op == "setdefault":
                assert t.setdefault(k, v) == model.setdefault(k, v)
            elif isinstance(model.get(k, 0), int) and not isinstance(model.get(k, 0), bool) \
                    and abs(model.get(k, 0)) < 2**62:
                assert t.update_counter(k, 2) == model.get(k, 0) + 2
                model[k] = model.get(k, 0) + 2
            assert len(t) == len(model)
        assert sorted(map(repr, t.items())) == sorted(map(repr, model.items()))
    finally:
        t.unlink()
        t.close()
