"""Fixtures: a private redis-server and a private wsproxy, started once per test run.

``WSPROXY_BIN`` names the wsproxy binary (default: the repository's debug
build, ``../../target/debug/wsproxy`` from this package). The wsproxy runs
with reliable sessions on, three client-message shards (so reading several
``wsproxy:up:{n}`` streams is exercised), and lifecycle events, presence and
the per-session event channel on: a binary that does not know those settings
ignores them, and the tests that need them are skipped (see
``needs_events``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from wsproxy_backend import Wsproxy

HERE = Path(__file__).resolve().parent
DEFAULT_BIN = HERE.parent.parent.parent / "target" / "debug" / "wsproxy"
UP_SHARDS = 3

# Settings of the test wsproxy; the caller's environment must not change them.
_CONFIG_VARS = (
    "HOST PORT REDIS_URL AUTH_TIMEOUT_SECS AUTH_GRACE_PERIOD_SECS WS_PING_INTERVAL_SECS WS_PING_TIMEOUT_SECS "
    "SHUTDOWN_GRACE_PERIOD_SECS WS_MAX_MESSAGE_BYTES WS_OUTBOUND_QUEUE WS_CLIENT_MESSAGE_RATE WS_CLIENT_MESSAGE_BURST MAX_CONNECTIONS LOG_FORMAT JWT_SECRET "
    "USERS_FILE ROUTES_FILE TLS_CERT_FILE TLS_KEY_FILE WS_ALLOWED_ORIGINS METRICS_TOKEN RELIABLE_SESSIONS "
    "HISTORY_MAX_LEN HISTORY_TTL_SECS UP_STREAM_SHARDS UP_STREAM_MAX_LEN UP_DEDUPE_SECS LIFECYCLE_EVENTS "
    "EVENTS_MAX_LEN EVENTS_SESSION_CHANNEL EVENTS_QUERY_PARAMS PRESENCE PROCESS_HEARTBEAT_SECS "
    "REDIS_CLUSTER_NODES REDIS_CLUSTER_PUBSUB"
).split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wsproxy_bin() -> Path:
    path = Path(os.environ.get("WSPROXY_BIN", DEFAULT_BIN))
    if not path.is_file():
        pytest.exit(f"no wsproxy binary at {path}: build it (cargo build --bin wsproxy) or set WSPROXY_BIN", 2)
    return path


def _help_text() -> str:
    try:
        return subprocess.run([str(wsproxy_bin()), "--help"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


HELP = _help_text() if Path(os.environ.get("WSPROXY_BIN", DEFAULT_BIN)).is_file() else ""
#: Whether this wsproxy has issue 14's lifecycle events, presence and control.
HAS_EVENTS = "LIFECYCLE_EVENTS" in HELP
HAS_PRESENCE = "PRESENCE" in HELP and HAS_EVENTS

needs_events = pytest.mark.skipif(
    not HAS_EVENTS, reason="this wsproxy has no LIFECYCLE_EVENTS (lifecycle events, presence and control not built yet)"
)
needs_presence = pytest.mark.skipif(not HAS_PRESENCE, reason="this wsproxy has no PRESENCE setting")


def _wait_for(probe, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if probe():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what} not ready within {timeout} s")


@dataclass
class RedisServer:
    port: int
    proc: subprocess.Popen

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


@dataclass
class WsproxyProcess:
    port: int
    proc: subprocess.Popen
    log: Path

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="wsproxy-pytest-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def start_redis(workdir: Path, port: int) -> RedisServer:
    """Starts a redis-server without persistence on ``port`` and waits for its PONG."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.exit("redis-server is not installed (apt-get install redis-server)", 2)
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--logfile", str(workdir / f"redis-{port}.log")],
        stdout=subprocess.DEVNULL,
    )
    server = RedisServer(port, proc)

    def ping() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")

    try:
        _wait_for(ping, "redis-server")
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def redis_server(workdir: Path) -> Iterator[RedisServer]:
    server = start_redis(workdir, free_port())
    try:
        yield server
    finally:
        server.stop()


def start_wsproxy(redis: RedisServer | None, workdir: Path, **extra: str) -> WsproxyProcess:
    """Starts a wsproxy on a free port and waits until ``/ready`` says 200.

    ``redis=None`` leaves ``REDIS_URL`` unset (for ``REDIS_CLUSTER_NODES`` in ``extra``).
    """
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in _CONFIG_VARS}
    if redis is not None:
        env["REDIS_URL"] = redis.url
    env.update(
        HOST="127.0.0.1",
        PORT=str(port),
        RELIABLE_SESSIONS="true",
        UP_STREAM_SHARDS=str(UP_SHARDS),
        LIFECYCLE_EVENTS="true",
        PRESENCE="true",
        EVENTS_SESSION_CHANNEL="true",
        EVENTS_QUERY_PARAMS="lang",
        PROCESS_HEARTBEAT_SECS="1",
        SHUTDOWN_GRACE_PERIOD_SECS="2",
        RUST_LOG="info",
    )
    env.update(extra)
    log = workdir / f"wsproxy-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(wsproxy_bin())], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=workdir)
    w = WsproxyProcess(port, proc, log)

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"wsproxy exited at start-up:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{w.http}/ready", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        _wait_for(ready, "wsproxy")
    except BaseException:
        w.stop(signal.SIGKILL)
        raise
    return w


@pytest.fixture(scope="session")
def wsproxy_server(redis_server: RedisServer, workdir: Path) -> Iterator[WsproxyProcess]:
    w = start_wsproxy(redis_server, workdir)
    try:
        yield w
    finally:
        w.stop()


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def wsproxy(redis: aioredis.Redis, wsproxy_server: WsproxyProcess) -> Wsproxy:
    """The library under test, on the test Redis, with the test wsproxy running."""
    return Wsproxy(redis, up_shards=UP_SHARDS)


@pytest.fixture
def sid() -> str:
    """A fresh session id."""
    return "s-" + uuid.uuid4().hex


@pytest.fixture
def group() -> str:
    """A fresh consumer group name (groups start at "$", so tests do not see each other's entries)."""
    return "g-" + uuid.uuid4().hex[:12]


# -- Redis Cluster -------------------------------------------------------------

#: Client-message shards of the cluster wsproxy: two, so reading streams
#: that live in different slots is exercised.
CLUSTER_UP_SHARDS = 2


@dataclass
class RedisClusterProcesses:
    """A private Redis Cluster: 3 masters and 3 replicas (``redis-cli --cluster create``)."""

    ports: list[int]
    procs: list[subprocess.Popen]

    @property
    def seeds(self) -> str:
        """Seed URLs as ``REDIS_CLUSTER_NODES`` takes them."""
        return ",".join(f"redis://127.0.0.1:{p}" for p in self.ports)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _free_cluster_port(taken: set[int]) -> int:
    """A free loopback port below 32768 (the kernel's ephemeral range starts
    there) whose cluster-bus port, +10000, is free too."""
    import random

    while True:
        port = random.randrange(20_000, 22_700)
        if port in taken:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10_000))
        except OSError:
            continue
        taken.add(port)
        return port


def _cluster_info_ok(port: int) -> bool:
    out = subprocess.run(
        ["redis-cli", "-p", str(port), "cluster", "info"], capture_output=True, text=True, timeout=5
    ).stdout
    return "cluster_state:ok" in out and "cluster_slots_ok:16384" in out


def start_redis_cluster(workdir: Path, attempts: int = 3) -> RedisClusterProcesses:
    """Starts six cluster-enabled redis-servers, joins them with ``redis-cli
    --cluster create ... --cluster-replicas 1``, and waits until every node
    says ``cluster_state:ok``. Stops what it started if anything fails; a
    port taken between the check and the start (other tests share the range)
    makes it start again on other ports."""
    for attempt in range(1, attempts + 1):
        try:
            return _start_redis_cluster(workdir)
        except PortTaken:
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


class PortTaken(RuntimeError):
    """A cluster node could not bind its port."""


def _start_redis_cluster(workdir: Path) -> RedisClusterProcesses:
    exe = shutil.which("redis-server")
    if exe is None or shutil.which("redis-cli") is None:
        pytest.exit("redis-server and redis-cli must be installed (apt-get install redis-server)", 2)
    taken: set[int] = set()
    ports = [_free_cluster_port(taken) for _ in range(6)]
    cdir = Path(tempfile.mkdtemp(prefix="cluster-", dir=workdir))
    procs: list[subprocess.Popen] = []
    cluster = RedisClusterProcesses(ports, procs)
    try:
        for port in ports:
            procs.append(
                subprocess.Popen(
                    [exe, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                     "--cluster-config-file", str(cdir / f"nodes-{port}.conf"), "--cluster-node-timeout", "2000",
                     "--dir", str(cdir), "--save", "", "--appendonly", "no",
                     "--logfile", str(cdir / f"redis-{port}.log")],
                    stdout=subprocess.DEVNULL,
                )
            )
        for port, proc in zip(ports, procs):

            def ping(port: int = port, proc: subprocess.Popen = proc) -> bool:
                if proc.poll() is not None:
                    raise PortTaken(f"redis-server on {port} exited (port taken?)")
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    return s.recv(16).startswith(b"+PONG")

            _wait_for(ping, f"redis-server on {port}")
        create = subprocess.run(
            ["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports],
             "--cluster-replicas", "1", "--cluster-yes"],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )
        if create.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{create.stdout}\n{create.stderr}")
        _wait_for(lambda: all(_cluster_info_ok(p) for p in ports), "cluster_state:ok on every node", timeout=30)
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="session")
def redis_cluster(workdir: Path) -> Iterator[RedisClusterProcesses]:
    """A 3+3 Redis Cluster for the whole run, stopped at its end."""
    cluster = start_redis_cluster(workdir)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def cluster_wsproxy_server(redis_cluster: RedisClusterProcesses, workdir: Path) -> Iterator[WsproxyProcess]:
    """A wsproxy on the cluster (``REDIS_CLUSTER_NODES``, ``REDIS_URL`` unset), sharded pub/sub."""
    w = start_wsproxy(
        None,
        workdir,
        REDIS_CLUSTER_NODES=redis_cluster.seeds,
        REDIS_CLUSTER_PUBSUB="sharded",
        UP_STREAM_SHARDS=str(CLUSTER_UP_SHARDS),
        LIFECYCLE_EVENTS="true",
        PRESENCE="true",
        EVENTS_SESSION_CHANNEL="true",
    )
    try:
        yield w
    finally:
        w.stop()


@pytest.fixture
async def cluster_wsproxy(
    redis_cluster: RedisClusterProcesses, cluster_wsproxy_server: WsproxyProcess
) -> AsyncIterator[Wsproxy]:
    """The library under test on the cluster (``Wsproxy.from_cluster``, sharded)."""
    w = Wsproxy.from_cluster(redis_cluster.seeds, up_shards=CLUSTER_UP_SHARDS, decode_responses=True)
    try:
        yield w
    finally:
        await w.aclose()


@pytest.fixture(scope="session")
def classic_cluster_wsproxy_server(redis_cluster: RedisClusterProcesses, workdir: Path) -> Iterator[WsproxyProcess]:
    """A second wsproxy on the same cluster, with classic pub/sub (``REDIS_CLUSTER_PUBSUB=classic``)."""
    w = start_wsproxy(
        None,
        workdir,
        REDIS_CLUSTER_NODES=redis_cluster.seeds,
        REDIS_CLUSTER_PUBSUB="classic",
        LIFECYCLE_EVENTS="false",
        PRESENCE="false",
        EVENTS_SESSION_CHANNEL="false",
    )
    try:
        yield w
    finally:
        w.stop()
