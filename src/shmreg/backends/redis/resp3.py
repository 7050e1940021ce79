"""A minimal RESP3 connection for the near-cache agent's tracking link.

Why not redis-py: the agent must keep reading invalidation pushes while one
of its own commands (the heartbeat ``SET``) is held up by the server
(``CLIENT PAUSE``), and must see every push in order on the one connection
that holds ``CLIENT TRACKING``.  redis-py reads pushes only inside its own
command calls.  This module speaks just what the agent needs: ``HELLO 3``,
commands as arrays of bulk strings, and every RESP3 reply type, with a
timeout on each read.
"""

from __future__ import annotations

import socket
import ssl
import time
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["Push", "RespConnection", "RespError", "endpoint_of_url"]


class RespError(Exception):
    """An error reply (``-ERR ...``, ``-MOVED ...``) from the server."""


class Push(list):
    """A RESP3 out-of-band push (``>``): ``[b"invalidate", [keys] or None]``."""


_TLS_OPTIONS = ("ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile", "ssl_password",
                "ssl_cert_reqs", "ssl_check_hostname")


def endpoint_of_url(url: str) -> dict:
    """``host``/``port`` or ``path``, ``username``, ``password`` and ``tls``
    (None, or the URL's ``ssl_*`` options as redis-py reads them) of a
    ``redis://``, ``rediss://`` or ``unix://`` URL."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower().split("+")[0]
    query = parse_qs(parts.query)
    tls = ({k: query[k][0] for k in _TLS_OPTIONS if k in query}
           if scheme == "rediss" else None)
    ep: dict[str, Any] = {"username": unquote(parts.username) if parts.username else None,
                          "password": unquote(parts.password) if parts.password else None,
                          "tls": tls}
    if scheme == "unix":
        ep["path"] = unquote(parts.path)
        if "password" in query and not ep["password"]:
            ep["password"] = query["password"][0]
    else:
        ep["host"] = parts.hostname or "localhost"
        ep["port"] = parts.port or 6379
    return ep


def tls_context(options: dict) -> ssl.SSLContext:
    """An SSL context from redis-py's ``ssl_*`` URL options, with redis-py's
    meaning: certificates verified against ``ssl_ca_certs``/``ssl_ca_path``
    (else the system's), ``ssl_cert_reqs`` none|optional|required, the host
    name checked unless ``ssl_check_hostname`` is false, a client
    certificate from ``ssl_certfile``/``ssl_keyfile``."""
    ctx = ssl.create_default_context(cafile=options.get("ssl_ca_certs"),
                                     capath=options.get("ssl_ca_path"))
    reqs = str(options.get("ssl_cert_reqs", "required")).lower()
    modes = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
    if reqs not in modes:
        raise ValueError(f"ssl_cert_reqs must be none, optional or required, not {reqs!r}")
    check = str(options.get("ssl_check_hostname", "true")).lower() not in ("false", "0", "no")
    ctx.check_hostname = check and reqs != "none"
    ctx.verify_mode = modes[reqs]
    if options.get("ssl_certfile"):
        ctx.load_cert_chain(options["ssl_certfile"], options.get("ssl_keyfile"),
                            options.get("ssl_password"))
    return ctx


class RespConnection:
    """One RESP3 connection: :meth:`send` commands, :meth:`read` replies and
    pushes (each read bounded by a timeout)."""

    def __init__(self, *, host: str | None = None, port: int | None = None,
                 path: str | None = None, username: str | None = None,
                 password: str | None = None, tls: dict | None = None,
                 connect_timeout: float = 2.0, name: str | None = None) -> None:
        if path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(connect_timeout)
            sock.connect(path)
        else:
            sock = socket.create_connection((host, port), timeout=connect_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls is not None:
                sock = tls_context(tls).wrap_socket(sock, server_hostname=host)
        self._sock = sock
        self._buf = bytearray()
        self.closed = False
        hello: list = ["HELLO", "3"]
        if password is not None:
            hello += ["AUTH", username or "default", password]
        if name:
            hello += ["SETNAME", name]
        self.send(*hello)
        reply = self.read(connect_timeout)
        if isinstance(reply, RespError):
            self.close()
            raise reply

    def close(self) -> None:
        """Close the socket (idempotent)."""
        if not self.closed:
            self.closed = True
            try:
                self._sock.close()
            except OSError:
                pass

    def send(self, *args: Any) -> None:
        """Send one command (str/bytes/int arguments)."""
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            b = a if isinstance(a, bytes) else str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(b), b))
        self._sock.sendall(b"".join(out))

    # -- reading -------------------------------------------------------------------

    def _fill(self, deadline: float) -> bool:
        """Read more bytes before ``deadline``; False on timeout.
        :raises ConnectionError: the server closed the connection."""
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        self._sock.settimeout(left)
        try:
            data = self._sock.recv(65536)
        except (socket.timeout, ssl.SSLWantReadError):
            return False
        if not data:
            raise ConnectionError("the server closed the connection")
        self._buf += data
        return True

    def read(self, timeout: float) -> Any:
        """The next reply or :class:`Push`, or ``None`` on timeout.  An error
        reply comes back as a :class:`RespError` (not raised).

        :raises ConnectionError: connection lost (or a malformed stream).
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                value, end = _parse(self._buf, 0)
            except _Incomplete:
                if not self._fill(deadline):
                    return None
                continue
            del self._buf[:end]
            return value


class _Incomplete(Exception):
    pass


def _line(buf: bytearray, i: int) -> tuple[bytes, int]:
    j = buf.find(b"\r\n", i)
    if j < 0:
        raise _Incomplete
    return bytes(buf[i:j]), j + 2


def _parse(buf: bytearray, i: int) -> tuple[Any, int]:
    """One RESP2/RESP3 value starting at ``buf[i]``: ``(value, end)``."""
    if i >= len(buf):
        raise _Incomplete
    kind = buf[i:i + 1]
    line, i = _line(buf, i + 1)
    if kind == b"+":
        return line, i
    if kind == b"-":
        return RespError(line.decode("utf-8", "replace")), i
    if kind == b":" or kind == b"(":
        return int(line), i
    if kind == b",":
        return float(line), i
    if kind == b"#":
        return line == b"t", i
    if kind == b"_":
        return None, i
    if kind in (b"$", b"=", b"!"):
        n = int(line)
        if n < 0:
            return None, i
        if len(buf) < i + n + 2:
            raise _Incomplete
        data = bytes(buf[i:i + n])
        if kind == b"!":
            return RespError(data.decode("utf-8", "replace")), i + n + 2
        return data, i + n + 2
    if kind in (b"*", b">", b"~", b"%", b"|"):
        n = int(line)
        if n < 0:
            return None, i
        count = 2 * n if kind in (b"%", b"|") else n
        items = []
        for _ in range(count):
            v, i = _parse(buf, i)
            items.append(v)
        if kind == b"|":              # attributes precede the real reply: skip them
            return _parse(buf, i)
        if kind == b">":
            return Push(items), i
        if kind == b"%":
            return dict(zip(items[::2], items[1::2])), i
        return items, i
    raise ConnectionError(f"malformed RESP stream (type byte {kind!r})")
