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
    "SHUTDOWN_GRACE_PERIOD_SECS WS_MAX_MESSAGE_BYTES WS_OUTBOUND_QUEUE MAX_CONNECTIONS LOG_FORMAT JWT_SECRET "
    "USERS_FILE ROUTES_FILE TLS_CERT_FILE TLS_KEY_FILE WS_ALLOWED_ORIGINS METRICS_TOKEN RELIABLE_SESSIONS "
    "HISTORY_MAX_LEN HISTORY_TTL_SECS UP_STREAM_SHARDS UP_STREAM_MAX_LEN UP_DEDUPE_SECS LIFECYCLE_EVENTS "
    "EVENTS_MAX_LEN EVENTS_SESSION_CHANNEL EVENTS_QUERY_PARAMS PRESENCE PROCESS_HEARTBEAT_SECS"
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


def start_wsproxy(redis: RedisServer, workdir: Path, **extra: str) -> WsproxyProcess:
    """Starts a wsproxy on a free port and waits until ``/ready`` says 200."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in _CONFIG_VARS}
    env.update(
        HOST="127.0.0.1",
        PORT=str(port),
        REDIS_URL=redis.url,
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
