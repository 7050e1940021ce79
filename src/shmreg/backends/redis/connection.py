"""One place that turns a URL into a redis-py client and runs scripts on it.

URLs (what redis-py parses, plus two schemes for topologies it does not
name in a URL):

- ``redis://[user:password@]host:port/db``, ``rediss://...`` (TLS; the
  ``ssl_*`` query options of redis-py), ``unix:///path/to.sock?db=0``;
- ``redis+cluster://host:port`` / ``rediss+cluster://...``: a Cluster, any
  node as the seed;
- ``redis+sentinel://[user:password@]host:port[,host:port...]/service[/db]``:
  the master of ``service`` as the Sentinels name it.

Clients are shared per process and URL (a connection pool each); redis-py
makes a forked child open its own connections.  redis-py's automatic
retries are off: a script that failed with a connection error may or may
not have run, and retrying a non-idempotent one (a counter) could apply it
twice; the caller gets :class:`~shmreg.BackendUnavailableError` instead.
"""

from __future__ import annotations

import re
import threading
import warnings
from typing import Any
from urllib.parse import unquote, urlsplit

from shmreg.errors import AccessDeniedError, BackendUnavailableError, Error, EvictionPolicyWarning

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
except ImportError:  # pragma: no cover - exercised only without the extra
    redis = None

from shmreg.backends.redis import scripts

# The server refusing this user: redis-py's names for WRONGPASS/NOAUTH
# (a ConnectionError subclass) and NOPERM (a ResponseError), where it has them.
DENIED = tuple(getattr(redis.exceptions, n) for n in
               ("AuthenticationError", "AuthorizationError", "NoPermissionError",
                "AuthenticationWrongNumberOfArgsError")
               if redis is not None and hasattr(redis.exceptions, n))


def redact(url: str) -> str:
    """``url`` without its password, to show in messages and logs
    (``redis://user:***@host/0``; ``password=`` query options too)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<a malformed URL>"
    netloc = parts.netloc
    if parts.password is not None:
        user, _, host = netloc.rpartition("@")
        netloc = user.split(":", 1)[0] + ":***@" + host
    query = re.sub(r"(?i)(^|&)(password|ssl_password)=[^&]*", r"\1\2=***", parts.query)
    return (f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")
            + (f"#{parts.fragment}" if parts.fragment else ""))


def unavailable(url: str, e: BaseException) -> Error:
    """The shmreg error for a redis-py error that is not about the table: the
    server refusing this user (:class:`~shmreg.AccessDeniedError`), else the
    server being away (:class:`~shmreg.BackendUnavailableError`)."""
    if isinstance(e, DENIED) or str(e).startswith(("NOPERM", "WRONGPASS", "NOAUTH")):
        # (redis-py strips the error code from the message: name it again.)
        code = ("NOPERM" if type(e).__name__ == "NoPermissionError" or str(e).startswith("NOPERM")
                else "WRONGPASS")
        return AccessDeniedError(f"{redact(url)}: the server refused this user: {code} "
                                 f"{str(e).removeprefix(code).strip()} (see docs/redis.md, ACL users)")
    return BackendUnavailableError(f"{redact(url)}: {e}")


_clients: dict[str, Any] = {}
_lock = threading.Lock()
_checked_policy: set[str] = set()


def require_redis() -> None:
    """:raises ImportError: redis-py is not installed (with the fix)."""
    if redis is None:
        raise ImportError("a Redis/Valkey table needs redis-py: pip install 'shmreg[redis]'")


def _no_retry() -> Any:
    return Retry(NoBackoff(), 0)


def _sentinel_master(url: str, **options: Any) -> Any:
    parts = urlsplit(url)
    hosts = []
    for hp in parts.netloc.rsplit("@", 1)[-1].split(","):
        host, _, port = hp.rpartition(":")
        hosts.append((host or hp, int(port or 26379)))
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise ValueError(f"sentinel URL needs a service name: {redact(url)!r}")
    kwargs: dict[str, Any] = dict(options)
    if parts.username:
        kwargs["username"] = unquote(parts.username)
    if parts.password:
        kwargs["password"] = unquote(parts.password)
    if len(path) > 1:
        kwargs["db"] = int(path[1])
    from redis.sentinel import Sentinel

    sentinel = Sentinel(hosts, sentinel_kwargs={}, **kwargs)
    return sentinel.master_for(path[0])


def connect(url: str) -> Any:
    """The shared client of this process for ``url`` (see the module docstring).

    :raises ValueError: a URL scheme redis-py does not know.
    :raises ImportError: redis-py is missing.
    """
    require_redis()
    if not isinstance(url, str):
        raise TypeError(f"url must be a str, not {type(url).__name__}")
    client = _clients.get(url)
    if client is not None:
        return client
    with _lock:
        client = _clients.get(url)
        if client is None:
            client = _make(url)
            _clients[url] = client  # noqa: SHM101 - per-process connection pools
    return client


def _make(url: str) -> Any:
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in ("redis+cluster", "rediss+cluster"):
        from redis.cluster import RedisCluster

        return RedisCluster.from_url(scheme.split("+")[0] + url[len(scheme):], retry=_no_retry())
    if scheme == "redis+sentinel":
        return _sentinel_master(url, retry=_no_retry())
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"not a Redis/Valkey URL: {redact(url)!r} (redis://, rediss://, unix://, "
                         "redis+cluster://, redis+sentinel://)")
    return redis.Redis.from_url(url, retry=_no_retry())


def check_eviction_policy(client: Any, url: str) -> None:
    """Warn (:class:`~shmreg.EvictionPolicyWarning`) once per URL when the
    server may evict keys: a table needs ``maxmemory-policy noeviction``
    (evicting a lease, or the index, would lose entries silently).  A server
    that does not let us read its config (ACL) is not warned about."""
    if url in _checked_policy:
        return
    _checked_policy.add(url)  # noqa: SHM101 - a per-process warn-once
    try:
        policies = client.config_get("maxmemory-policy")
    except redis.exceptions.ResponseError:
        return
    except redis.exceptions.ConnectionError as e:
        _checked_policy.discard(url)  # noqa: SHM101 - a per-process warn-once
        raise unavailable(url, e) from e
    # A cluster client answers per node: {node: {...}} or a merged dict.
    values = []
    for v in policies.values() if isinstance(policies, dict) else ():
        values.extend(v.values() if isinstance(v, dict) else [v])
    bad = sorted({str(v, "ascii", "replace") if isinstance(v, bytes) else str(v)
                  for v in values} - {"noeviction"})
    if bad:
        warnings.warn(EvictionPolicyWarning(
            f"{redact(url)}: maxmemory-policy is {', '.join(bad)}; shmreg tables need noeviction "
            "(an evicted lease or index entry loses entries silently): "
            "CONFIG SET maxmemory-policy noeviction"), stacklevel=4)


class Scripts:
    """The table scripts registered on one client (loaded on first use, and
    again after a server restart forgot them)."""

    def __init__(self, client: Any) -> None:
        for name, body in scripts.ALL.items():
            setattr(self, name.lower(), client.register_script(body))


_scripts: dict[int, Scripts] = {}


def scripts_for(client: Any) -> Scripts:
    """The :class:`Scripts` of ``client`` (one set per client)."""
    s = _scripts.get(id(client))
    if s is None:
        s = _scripts[id(client)] = Scripts(client)  # noqa: SHM101 - per-process handles
    return s
