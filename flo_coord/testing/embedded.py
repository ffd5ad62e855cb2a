"""Start and stop throwaway Redis servers for tests, benchmarks and demos.

Everything here runs real ``redis-server`` processes on free loopback ports, each in its own temporary directory,
so tests exercise the same code paths as production (Lua, persistence, replication, cluster redirects, Sentinel
failover) without touching any shared Redis. Processes are tracked by pid only; every object stops what it started
on ``stop()``, on garbage collection and at interpreter exit (``weakref.finalize`` registers its own atexit hook).

When no ``redis-server`` binary is available, :class:`FakeRedisTCPServer` offers an in-process stand-in speaking
the Redis protocol over TCP, so code that needs a URL can still run.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self, TypeVar

import redis
import redis.cluster
import redis.sentinel

__all__ = [
    "DEFAULT_HOST",
    "EmbeddedRedisError",
    "FakeRedisTCPServer",
    "RedisCluster",
    "RedisServer",
    "SentinelGroup",
    "SentinelServer",
    "free_port",
    "free_ports",
    "preload_scripts",
    "redis_cli_binary",
    "redis_server_binary",
    "start_embedded_redis",
]

DEFAULT_HOST = "127.0.0.1"
#: Highest port handed out, so that the cluster bus port (port + 10000) is still a valid port.
MAX_PORT = 55000
CLUSTER_BUS_OFFSET = 10000
CLUSTER_SLOTS = 16384

_T = TypeVar("_T")
_ports_lock = threading.Lock()
# Ports already handed out by this process: the kernel may offer the same free port twice before anyone binds it.
_handed_out: set[int] = set()


class EmbeddedRedisError(RuntimeError):
    """A throwaway Redis process could not be started or did not reach the expected state."""


# --------------------------------------------------------------------------------------------------------------------
# Binaries and ports
# --------------------------------------------------------------------------------------------------------------------


#: Environment variables naming the binaries to use (a path or a name looked up on PATH).
REDIS_SERVER_ENV = "FLO_REDIS_SERVER"
REDIS_CLI_ENV = "FLO_REDIS_CLI"


def redis_server_binary() -> str | None:
    """Path of the ``redis-server`` to use, or None; ``FLO_REDIS_SERVER`` (path or name) overrides the PATH lookup."""
    override = os.environ.get(REDIS_SERVER_ENV)
    return shutil.which(override) if override else shutil.which("redis-server")


def redis_cli_binary() -> str | None:
    """Path of ``redis-cli`` (``FLO_REDIS_CLI`` overrides), falling back to the directory of ``redis-server``."""
    override = os.environ.get(REDIS_CLI_ENV)
    if override:
        return shutil.which(override)
    found = shutil.which("redis-cli")
    if found:
        return found
    server = redis_server_binary()
    return shutil.which(os.path.join(os.path.dirname(server), "redis-cli")) if server else None


def _can_bind(port: int, host: str = DEFAULT_HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Same option Redis uses, so a port in TIME_WAIT counts as free, exactly as it would for Redis.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(*, attempts: int = 500) -> int:
    """A currently free loopback port <= 55000 whose cluster bus port (port + 10000) is free too.

    The kernel picks the candidate (bind to port 0); ports already returned by this process are never returned again,
    so consecutive calls give distinct ports even before anything binds them.
    """
    for _ in range(attempts):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((DEFAULT_HOST, 0))
            port: int = sock.getsockname()[1]
        if port > MAX_PORT:
            continue
        with _ports_lock:
            if port in _handed_out or port + CLUSTER_BUS_OFFSET in _handed_out:
                continue
            if not _can_bind(port + CLUSTER_BUS_OFFSET):
                continue
            _handed_out.update((port, port + CLUSTER_BUS_OFFSET))
        return port
    raise EmbeddedRedisError(f"no free port <= {MAX_PORT} (with a free bus port) after {attempts} attempts")


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports, each with a free cluster bus port."""
    return [free_port() for _ in range(count)]


def _wait_until(predicate: Callable[[], _T | None], timeout: float, what: str, interval: float = 0.05) -> _T:
    """Poll ``predicate`` until it returns something truthy; redis errors while polling just mean "not yet"."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = predicate()
            if result:
                return result
        except (redis.RedisError, OSError) as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise EmbeddedRedisError(f"timed out after {timeout:g}s waiting for {what}{detail}")
        time.sleep(interval)


def _tail(paths: Iterable[str], lines: int = 30) -> str:
    chunks = []
    for path in paths:
        try:
            with open(path, errors="replace") as fh:
                content = fh.read().splitlines()[-lines:]
        except OSError:
            continue
        if content:
            chunks.append(f"--- {os.path.basename(path)} ---\n" + "\n".join(content))
    return "\n".join(chunks) or "(no log output)"


# --------------------------------------------------------------------------------------------------------------------
# Single server
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _ProcessState:
    """What must be cleaned up for one server; kept apart from the server so a finalizer can own it without cycles."""

    directory: str
    proc: subprocess.Popen[bytes] | None = None
    remove_directory: bool = True
    lock: threading.Lock = field(default_factory=threading.Lock)

    def terminate(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; always reaps the child. Idempotent."""
        with self.lock:
            proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.wait()

    def kill(self) -> None:
        """SIGKILL and reap; the directory stays so the server can be restarted on its data."""
        with self.lock:
            proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()

    def cleanup(self) -> None:
        self.terminate()
        if self.remove_directory:
            shutil.rmtree(self.directory, ignore_errors=True)


class _StartStop:
    """``with`` starts a server (or group) and always stops it."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class RedisServer(_StartStop):
    """One ``redis-server`` process on a loopback port, with its data and logs in a private temp directory.

    Nothing persists by default (``save ""``, no AOF); ``appendonly=True`` turns on an ``appendfsync always`` AOF so
    :meth:`kill` + :meth:`restart` models a crash that loses nothing acknowledged. The debug command is enabled for
    local clients so :meth:`pause` can stall the event loop.
    """

    host: str = DEFAULT_HOST

    def __init__(
        self,
        port: int | None = None,
        *,
        appendonly: bool = False,
        password: str | None = None,
        acl_file: str | None = None,
        extra_args: list[str] | None = None,
        replicaof: tuple[str, int] | None = None,
        cluster: bool = False,
        start_timeout: float = 10.0,
        binary: str | None = None,
    ) -> None:
        resolved = binary or redis_server_binary()
        if resolved is None:
            raise EmbeddedRedisError("redis-server not found (install it or set FLO_REDIS_SERVER)")
        self.binary = resolved
        self._auto_port = port is None
        self.port = free_port() if port is None else port
        self.appendonly = appendonly
        self.password = password
        self.acl_file = acl_file
        self.extra_args = list(extra_args or [])
        self.replicaof = replicaof
        self.cluster = cluster
        self.start_timeout = start_timeout
        self.directory = tempfile.mkdtemp(prefix=f"flo-redis-{self.port}-")
        self.log_file = os.path.join(self.directory, "redis.log")
        self._stdout_file = os.path.join(self.directory, "stdout.log")
        self._state = _ProcessState(self.directory)
        # Also runs at interpreter exit, so a server a test forgot to stop does not outlive the test run.
        self._finalizer = weakref.finalize(self, self._state.cleanup)

    # -- properties ------------------------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """Pid of the running process, or None when it is not running."""
        proc = self._state.proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def url(self) -> str:
        auth = f":{urllib.parse.quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    # -- lifecycle ---------------------------------------------------------------------------------------------------

    def _command(self) -> list[str]:
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--dir", self.directory,
            "--logfile", self.log_file,
            "--daemonize", "no",
            "--protected-mode", "no",
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--enable-debug-command", "local",
            # Redis 7 waits 5 s before a diskless full sync by default; replicas should attach at once in tests.
            "--repl-diskless-sync-delay", "0",
        ]  # fmt: skip
        if self.appendonly:
            args += ["--appendfsync", "always"]
        if self.password:
            args += ["--requirepass", self.password, "--masterauth", self.password]
        if self.acl_file:
            args += ["--aclfile", self.acl_file]
        if self.replicaof:
            args += ["--replicaof", self.replicaof[0], str(self.replicaof[1])]
        if self.cluster:
            args += [
                "--cluster-enabled", "yes",
                "--cluster-config-file", os.path.join(self.directory, "nodes.conf"),
                "--cluster-node-timeout", "2000",
            ]  # fmt: skip
        return args + self.extra_args

    def start(self) -> Self:
        """Start the process and wait until it answers PING as itself (checked by pid); returns self."""
        if self.running:
            return self
        if not os.path.isdir(self.directory):  # restarted after stop(): give it a fresh directory
            self.directory = tempfile.mkdtemp(prefix=f"flo-redis-{self.port}-")
            self.log_file = os.path.join(self.directory, "redis.log")
            self._stdout_file = os.path.join(self.directory, "stdout.log")
            self._state.directory = self.directory
        for attempt in range(3):
            try:
                self._spawn_and_wait()
                return self
            except EmbeddedRedisError:
                port_taken = "Address already in use" in _tail(self._log_files())
                if not (self._auto_port and port_taken and attempt < 2):
                    raise
                self.port = free_port()  # lost a race for an auto-picked port: pick another
        raise AssertionError("unreachable")

    def _log_files(self) -> list[str]:
        return [self._stdout_file, self.log_file]

    def _spawn_and_wait(self) -> None:
        with open(self._stdout_file, "ab") as out:
            proc = subprocess.Popen(
                self._command(), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=self.directory
            )
        self._state.proc = proc

        def ready() -> bool:
            if proc.poll() is not None:
                raise EmbeddedRedisError(f"exited with code {proc.returncode}")
            with self.client(socket_connect_timeout=0.5, socket_timeout=1.0) as conn:
                info = conn.info("server")
            return int(info.get("process_id", -1)) == proc.pid  # not some other server that grabbed the port

        try:
            _wait_until(ready, self.start_timeout, f"redis-server on port {self.port}")
        except EmbeddedRedisError as exc:
            self._state.kill()
            raise EmbeddedRedisError(f"{self._describe()} failed to start: {exc}\n{_tail(self._log_files())}") from exc

    def _describe(self) -> str:
        return f"redis-server {self.host}:{self.port}"

    def stop(self, timeout: float = 5.0) -> None:
        """Graceful stop (SIGTERM, SIGKILL after ``timeout``), then remove the directory. Idempotent."""
        self._state.terminate(timeout)
        shutil.rmtree(self.directory, ignore_errors=True)

    def kill(self) -> None:
        """Crash the server (SIGKILL) but keep its directory, so :meth:`restart` reloads whatever was persisted."""
        self._state.kill()

    def restart(self) -> Self:
        """Stop if running, then start again on the same port and directory (an AOF, if enabled, is reloaded)."""
        self._state.terminate()
        self._auto_port = False  # clients hold this port; never move to another one
        return self.start()

    def pause(self, seconds: float) -> threading.Thread:
        """Freeze the whole server for ``seconds`` (``DEBUG SLEEP``), like a long GC or a stopped VM.

        The command is sent before returning, so anything issued afterwards waits for the stall; the returned thread
        collects the reply and can be joined to wait until the server is responsive again.
        """
        conn = redis.Connection(host=self.host, port=self.port, password=self.password)
        conn.send_command("DEBUG", "SLEEP", str(seconds))

        def collect() -> None:
            try:
                conn.read_response()
            finally:
                conn.disconnect()

        thread = threading.Thread(target=collect, name=f"redis-pause-{self.port}", daemon=True)
        thread.start()
        time.sleep(0.02)  # let the server pick the command up before any other client's
        return thread

    def client(self, **kwargs: Any) -> redis.Redis:
        """A ``redis.Redis`` for this server; keyword arguments are passed through (e.g. ``decode_responses=True``)."""
        kwargs.setdefault("password", self.password)
        return redis.Redis(host=self.host, port=self.port, **kwargs)

    def info(self, section: str | None = None) -> dict[str, Any]:
        """``INFO`` (one section or all) parsed into a dict, on a short-lived connection."""
        with self.client() as conn:
            result: dict[str, Any] = conn.info(section) if section else conn.info()
        return result

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.host}:{self.port} pid={self.pid}>"


class SentinelServer(RedisServer):
    """A ``redis-server --sentinel`` process monitoring one primary.

    Sentinel rewrites its config file at runtime, so every sentinel gets its own writable copy in its own directory.
    """

    def __init__(
        self,
        primary: tuple[str, int],
        *,
        service_name: str = "flo-primary",
        quorum: int = 2,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 5000,
        port: int | None = None,
        start_timeout: float = 10.0,
        binary: str | None = None,
    ) -> None:
        super().__init__(port, start_timeout=start_timeout, binary=binary)
        self.primary = primary
        self.service_name = service_name
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.config_file = os.path.join(self.directory, "sentinel.conf")

    def _command(self) -> list[str]:
        if not os.path.exists(self.config_file):  # on restart keep the config sentinel rewrote
            self.config_file = os.path.join(self.directory, "sentinel.conf")
            name, (host, port) = self.service_name, self.primary
            lines = [
                f"port {self.port}",
                f"bind {self.host}",
                "protected-mode no",
                "daemonize no",
                f"dir {self.directory}",
                f"logfile {self.log_file}",
                "sentinel resolve-hostnames no",
                f"sentinel monitor {name} {host} {port} {self.quorum}",
                f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
                f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
                f"sentinel parallel-syncs {name} 1",
            ]
            with open(self.config_file, "w") as fh:
                fh.write("\n".join(lines) + "\n")
        return [self.binary, self.config_file, "--sentinel"]

    def _describe(self) -> str:
        return f"redis sentinel {self.host}:{self.port}"

    def primary_state(self) -> dict[str, Any]:
        """``SENTINEL MASTER <name>`` as a dict (keys like ``num-slaves``, ``num-other-sentinels``, ``flags``)."""
        with self.client(decode_responses=True) as conn:
            result: dict[str, Any] = conn.sentinel_master(self.service_name)
        return result

    def primary_address(self) -> tuple[str, int]:
        """What this sentinel currently reports as the primary's address."""
        with self.client(decode_responses=True) as conn:
            host, port = conn.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service_name)
        return (host, int(port))


# --------------------------------------------------------------------------------------------------------------------
# Groups of servers
# --------------------------------------------------------------------------------------------------------------------


def _stop_all(servers: Iterable[RedisServer]) -> None:
    """Stop every server even if some stop() raises; re-raise the first error afterwards."""
    first: BaseException | None = None
    for server in servers:
        try:
            server.stop()
        except BaseException as exc:
            first = first or exc
    if first is not None:
        raise first


class RedisCluster(_StartStop):
    """``masters`` cluster-enabled servers joined with ``redis-cli --cluster create`` (no replicas).

    ``start()`` returns once every node reports ``cluster_state:ok``, all 16384 slots assigned and all nodes known,
    so a cluster client connecting right after gets a consistent slot map.
    """

    def __init__(self, masters: int = 3, *, password: str | None = None, start_timeout: float = 30.0) -> None:
        if masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        self.masters = masters
        self.password = password
        self.start_timeout = start_timeout
        self.nodes: list[RedisServer] = []

    @property
    def startup_nodes(self) -> list[redis.cluster.ClusterNode]:
        return [redis.cluster.ClusterNode(node.host, node.port) for node in self.nodes]

    @property
    def url(self) -> str:
        """URL of the first node; a cluster client discovers the others from it."""
        return self.nodes[0].url

    def start(self) -> Self:
        cli = redis_cli_binary()
        if cli is None:
            raise EmbeddedRedisError("redis-cli not found (needed to create a cluster; set FLO_REDIS_CLI)")
        try:
            for _ in range(self.masters):
                self.nodes.append(RedisServer(cluster=True, password=self.password).start())
            cmd = [cli, "--cluster", "create", *(f"{n.host}:{n.port}" for n in self.nodes)]
            cmd += ["--cluster-replicas", "0", "--cluster-yes"]
            if self.password:
                cmd += ["-a", self.password, "--no-auth-warning"]
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=self.start_timeout, check=False)
            if result.returncode != 0:
                raise EmbeddedRedisError(f"redis-cli --cluster create failed:\n{result.stdout}\n{result.stderr}")
            _wait_until(self._converged, self.start_timeout, "cluster_state:ok on every node")
        except BaseException:
            self.stop()
            raise
        return self

    def _converged(self) -> bool:
        for node in self.nodes:
            with node.client(decode_responses=True) as conn:
                info = conn.cluster("INFO")
            if (
                info.get("cluster_state") != "ok"
                or int(info.get("cluster_slots_assigned", 0)) != CLUSTER_SLOTS
                or int(info.get("cluster_known_nodes", 0)) != len(self.nodes)
            ):
                return False
        return True

    def client(self, **kwargs: Any) -> redis.cluster.RedisCluster:
        """A ``redis.cluster.RedisCluster`` bootstrapped from all nodes; keyword arguments are passed through."""
        kwargs.setdefault("password", self.password)
        return redis.cluster.RedisCluster(startup_nodes=self.startup_nodes, **kwargs)

    def stop(self) -> None:
        nodes, self.nodes = self.nodes, []
        _stop_all(nodes)


class SentinelGroup(_StartStop):
    """A primary, one replica and three sentinels (quorum 2), tuned to fail over within a few seconds.

    ``start()`` returns once the replica is in sync and every sentinel knows the replica and the two other sentinels,
    so :meth:`kill_primary` reliably leads to a failover to the replica.
    """

    def __init__(self, service_name: str = "flo-primary", *, sentinels: int = 3, start_timeout: float = 20.0) -> None:
        self.service_name = service_name
        self.sentinel_count = sentinels
        self.start_timeout = start_timeout
        self.primary: RedisServer | None = None
        self.replica: RedisServer | None = None
        self.sentinels: list[SentinelServer] = []
        self._initial_primary: tuple[str, int] | None = None

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        return [s.address for s in self.sentinels]

    def start(self) -> Self:
        try:
            primary = self.primary = RedisServer().start()
            replica = self.replica = RedisServer(replicaof=primary.address).start()
            _wait_until(
                lambda: replica.info("replication").get("master_link_status") == "up",
                self.start_timeout,
                "the replica to sync with the primary",
            )
            self._initial_primary = primary.address
            for _ in range(self.sentinel_count):
                self.sentinels.append(SentinelServer(primary.address, service_name=self.service_name).start())
            _wait_until(self._sentinels_ready, self.start_timeout, "sentinels to discover the replica and each other")
        except BaseException:
            self.stop()
            raise
        return self

    def _sentinels_ready(self) -> bool:
        for sentinel in self.sentinels:
            state = sentinel.primary_state()
            if (
                int(state.get("num-slaves", 0)) < 1
                or int(state.get("num-other-sentinels", 0)) < len(self.sentinels) - 1
            ):
                return False
        return True

    def primary_address(self) -> tuple[str, int]:
        """The primary's address according to the first sentinel that answers."""
        last: Exception | None = None
        for sentinel in self.sentinels:
            try:
                return sentinel.primary_address()
            except (redis.RedisError, OSError) as exc:
                last = exc
        raise EmbeddedRedisError(f"no sentinel answered: {last!r}")

    def kill_primary(self) -> None:
        """SIGKILL the current primary (the original one, or whichever server sentinels now report)."""
        address = self.primary_address()
        for server in (self.primary, self.replica):
            if server is not None and server.address == address:
                self._initial_primary = address
                server.kill()
                return
        raise EmbeddedRedisError(f"current primary {address} is not a server of this group")

    def wait_for_failover(self, timeout: float = 30.0) -> tuple[str, int]:
        """Wait until every sentinel reports the same new primary and it acts as one; return its address."""
        before = self._initial_primary

        def new_primary() -> tuple[str, int] | None:
            # every sentinel, not the first that answers: a client asking a sentinel that still
            # names the old primary would write to it once it restarts (empty, without persistence)
            seen = set()
            for sentinel in self.sentinels:
                try:
                    seen.add(sentinel.primary_address())
                except (redis.RedisError, OSError):
                    return None
            return next(iter(seen)) if len(seen) == 1 and before not in seen else None

        address = _wait_until(new_primary, timeout, f"sentinels to fail over from {before}", interval=0.1)

        def promoted() -> bool:
            with redis.Redis(host=address[0], port=address[1], socket_timeout=1.0) as conn:
                return bool(conn.info("replication").get("role") == "master")

        _wait_until(promoted, timeout, f"{address} to become a primary", interval=0.1)
        self._initial_primary = address
        return address

    def sentinel_client(self, **kwargs: Any) -> redis.sentinel.Sentinel:
        """A ``redis.sentinel.Sentinel`` over this group's sentinels (use ``.master_for(group.service_name)``)."""
        return redis.sentinel.Sentinel(self.sentinel_addresses, **kwargs)

    def stop(self) -> None:
        """Stop sentinels first (so they do not react to the servers going away), then replica, then primary."""
        servers: list[RedisServer] = [*self.sentinels]
        servers += [s for s in (self.replica, self.primary) if s is not None]
        self.sentinels, self.replica, self.primary = [], None, None
        _stop_all(servers)


# --------------------------------------------------------------------------------------------------------------------
# Fallback without a redis-server binary
# --------------------------------------------------------------------------------------------------------------------


class FakeRedisTCPServer(_StartStop):
    """``fakeredis.TcpFakeServer`` on a free loopback port, served from a daemon thread.

    A stand-in for :class:`RedisServer` when no binary is installed: same ``host``/``port``/``url``/``client()``/
    ``stop()`` surface. Lua (``EVAL``/``EVALSHA``) works through it when ``lupa`` is installed (``fakeredis[lua]``);
    without lupa the server rejects them ("unknown command 'eval'"). No persistence, replication, cluster or sentinel.
    """

    host: str = DEFAULT_HOST

    def __init__(self, server_type: str = "redis") -> None:
        import fakeredis

        # Port 0: the kernel picks the port while binding, so there is no window for another process to grab it.
        self._server = fakeredis.TcpFakeServer((self.host, 0), server_type=server_type)  # type: ignore[arg-type]
        self._server.daemon_threads = True  # a forgotten connection must not keep the interpreter alive
        self.port: int = self._server.server_address[1]
        self._thread: threading.Thread | None = None
        self._serving = threading.Event()
        self._finalizer = weakref.finalize(self, _shutdown_fake, self._server, self._serving)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def start(self) -> Self:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"fakeredis-{self.port}",
                daemon=True,
            )
            self._thread.start()
            self._serving.set()
        return self

    def client(self, **kwargs: Any) -> redis.Redis:
        return redis.Redis(host=self.host, port=self.port, **kwargs)

    def stop(self) -> None:
        """Stop serving and close the listening socket. Idempotent."""
        self._finalizer()
        if self._thread is not None:
            self._thread.join(5)


def _shutdown_fake(server: Any, serving: threading.Event) -> None:
    if serving.is_set():  # socketserver's shutdown() would wait forever for a serve_forever() that never ran
        server.shutdown()  # also sets the event that ends the per-connection handler loops
    else:
        server._shutdown_event.set()
    server.server_close()


def preload_scripts(server: RedisServer | FakeRedisTCPServer) -> None:
    """Load flo_coord's Redis Functions library (and every script, for the EVALSHA fallback) into ``server``.

    fakeredis' TCP server drops a connection after any error reply, so a "function not found" reply could never be
    followed by the FUNCTION LOAD that answers it: the fake gets the library before any client connects.
    """
    from flo_coord.store import install_functions, script_registry

    client = server.client()
    try:
        install_functions(client)
        for script in script_registry():
            client.script_load(script.source)
    finally:
        client.close()


def start_embedded_redis(**kwargs: Any) -> RedisServer | FakeRedisTCPServer:
    """A started :class:`RedisServer` (``kwargs`` go to it) when ``redis-server`` exists, else a started
    :class:`FakeRedisTCPServer` with flo_coord's scripts loaded (what ``flo-coord demo`` and the README examples
    run on). Stop it with ``stop()`` or use it as a context manager. Raises EmbeddedRedisError when a binary exists
    but does not start."""
    if redis_server_binary() is not None:
        return RedisServer(**kwargs).start()
    fake = FakeRedisTCPServer().start()
    preload_scripts(fake)
    return fake
