"""Integration tests for wsproxy.

These run against an already running wsproxy and Redis; nothing is started
here. Run from the repository root with:

    uv run test_wsproxy.py            # every test
    uv run test_wsproxy.py fanout     # only tests whose name contains "fanout"

Environment:
    WSPROXY_URL             default ws://127.0.0.1:8080
    REDIS_URL               default redis://127.0.0.1:6379
    AUTH_GRACE_PERIOD_SECS  expected TTL after a successful connect (default 10800);
                            set it if the server was started with a different value
    WS_MAX_MESSAGE_BYTES    expected inbound size limit (default 1 MiB)
    RELIABLE_SESSIONS       true if the server was started with reliable sessions
                            (the wsproxy.v1 tests then run; otherwise they check
                            that the subprotocol is not selected)
    REDIS_CLUSTER_NODES     set (comma-separated redis://host:port seeds, as the
                            server's) when the server runs on a Redis Cluster:
                            REDIS_URL is then ignored, names carry hash tags
                            (session:{<id>}:auth, ...) and the suite publishes and
                            subscribes as REDIS_CLUSTER_PUBSUB says
    REDIS_CLUSTER_PUBSUB    sharded (the default: SPUBLISH/SSUBSCRIBE) or classic
                            (PUBLISH/SUBSCRIBE), as the server was started with

Every test works on fresh uuid4 session ids, so concurrent or repeated runs
against the same Redis do not interfere, and every auth key a test creates is
deleted afterwards. The process exits non-zero if any test fails.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable, Union

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, RedisCluster
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

WSPROXY_URL = os.environ.get("WSPROXY_URL", "ws://127.0.0.1:8080").rstrip("/")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
GRACE_PERIOD = int(os.environ.get("AUTH_GRACE_PERIOD_SECS", "10800"))
MAX_MESSAGE_BYTES = int(os.environ.get("WS_MAX_MESSAGE_BYTES", str(1024 * 1024)))
RELIABLE = os.environ.get("RELIABLE_SESSIONS", "false").lower() in ("1", "true", "yes", "on")
RELIABLE_PROTOCOL = "wsproxy.v1"
CLUSTER_NODES = [n.strip() for n in os.environ.get("REDIS_CLUSTER_NODES", "").split(",") if n.strip()]
CLUSTER = bool(CLUSTER_NODES)
CLUSTER_PUBSUB = os.environ.get("REDIS_CLUSTER_PUBSUB", "sharded").strip().lower() or "sharded"
if CLUSTER_PUBSUB not in ("sharded", "classic"):
    sys.exit(f"REDIS_CLUSTER_PUBSUB must be sharded or classic, not {CLUSTER_PUBSUB!r}")
# SPUBLISH/SSUBSCRIBE instead of PUBLISH/SUBSCRIBE.
SHARDED = CLUSTER and CLUSTER_PUBSUB == "sharded"

Redis = Union[aioredis.Redis, RedisCluster]

# Upper bound for a whole test, so a hung server fails one test instead of
# stalling the suite.
TEST_TIMEOUT = 10.0
# Upper bound for a single expected event (frame, pub/sub message) inside a test;
# shorter than TEST_TIMEOUT so the failure reason says what was missing.
STEP_TIMEOUT = 5.0
# How long "nothing arrives" is observed before it is believed.
QUIET_PERIOD = 0.5
N_MESSAGES = 20


class TestFailure(Exception):
    """An expectation about the server's behaviour did not hold."""


class Skipped(Exception):
    """The test does not apply to how the server was started."""


def needs_reliable() -> None:
    if not RELIABLE:
        raise Skipped("RELIABLE_SESSIONS is not set")


def needs_cluster() -> None:
    if not CLUSTER:
        raise Skipped("not on a Redis Cluster (REDIS_CLUSTER_NODES is not set)")


def expect(condition: bool, reason: str) -> None:
    # Not `assert`: the suite must keep checking even under `python -O`.
    if not condition:
        raise TestFailure(reason)


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def new_id(prefix: str = "") -> str:
    return prefix + uuid.uuid4().hex


def tag(session_id: str) -> str:
    """A session id as it goes into a name: itself, or on a cluster a hash tag
    (so all of a session's names share one slot)."""
    return f"{{{session_id}}}" if CLUSTER else session_id


def auth_key(session_id: str) -> str:
    return f"session:{tag(session_id)}:auth"


def down_channel(session_id: str) -> str:
    return f"session:{tag(session_id)}:down"


def up_channel(session_id: str) -> str:
    return f"session:{tag(session_id)}:up"


async def publish(redis: Redis, channel: str, message: str) -> int:
    """What a backend does to reach a channel: PUBLISH, or SPUBLISH on a sharded cluster."""
    if SHARDED:
        return int(await redis.spublish(channel, message))
    return int(await redis.publish(channel, message))


def redis_client() -> Redis:
    """The suite's Redis client: one server (REDIS_URL) or a cluster (REDIS_CLUSTER_NODES)."""
    if not CLUSTER:
        return aioredis.from_url(REDIS_URL, socket_timeout=STEP_TIMEOUT)
    nodes = []
    for seed in CLUSTER_NODES:
        url = urllib.parse.urlsplit(seed if "://" in seed else "redis://" + seed)
        nodes.append(ClusterNode(url.hostname or "127.0.0.1", url.port or 6379))
    first = urllib.parse.urlsplit(CLUSTER_NODES[0] if "://" in CLUSTER_NODES[0] else "redis://" + CLUSTER_NODES[0])
    return RedisCluster(
        startup_nodes=nodes,
        username=urllib.parse.unquote(first.username) if first.username else None,
        password=urllib.parse.unquote(first.password) if first.password else None,
        socket_timeout=STEP_TIMEOUT,
    )


def ws_url(agent_id: str, session_id: str, access_token: str | None = None) -> str:
    # Ids are inserted as given: callers that want to send odd characters
    # percent-encode them themselves.
    url = f"{WSPROXY_URL}/{agent_id}/ws/{session_id}"
    if access_token is not None:
        url += "?" + urllib.parse.urlencode({"access_token": access_token})
    return url


def http_base_url() -> str:
    if WSPROXY_URL.startswith("wss://"):
        return "https://" + WSPROXY_URL[len("wss://"):]
    if WSPROXY_URL.startswith("ws://"):
        return "http://" + WSPROXY_URL[len("ws://"):]
    return WSPROXY_URL


def ws_connect(url: str, headers: dict[str, str] | None = None, subprotocols: list[str] | None = None):
    # proxy=None: an HTTP(S)_PROXY variable must not reroute local test traffic.
    # compression=None: frames go out exactly as written, which matters for the
    # byte-identity and size-limit checks.
    return connect(
        url,
        additional_headers=headers or {},
        subprotocols=subprotocols,
        proxy=None,
        compression=None,
        open_timeout=STEP_TIMEOUT,
        close_timeout=2,
    )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class Context:
    """Per-test state: the shared Redis client and the keys to delete later."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.created_keys: set[str] = set()

    async def grant(self, session_id: str, token: str | None = None, ttl: int = 60) -> str:
        """Store an auth token the way a backend would, and return it."""
        token = token or new_id("tok-")
        key = auth_key(session_id)
        self.created_keys.add(key)
        # SET .. EX is SETEX; redis-py flags its setex() wrapper as deprecated.
        await self.redis.set(key, token, ex=ttl)
        return token

    async def publish(self, channel: str, message: str) -> int:
        return await publish(self.redis, channel, message)

    async def cleanup(self) -> None:
        if self.created_keys:
            # One DEL per key: on a cluster they live in different slots.
            for key in self.created_keys:
                await self.redis.delete(key)


@asynccontextmanager
async def subscribed(redis: Redis, channel: str) -> AsyncIterator[PubSub]:
    """Subscribe to a channel (SSUBSCRIBE on a sharded cluster, on the
    channel's shard) and only yield once Redis has confirmed it.

    Without waiting for the confirmation, frames the test sends right after
    could be published before the subscription exists and be lost.
    """
    pubsub = redis.pubsub()
    try:
        if SHARDED:
            await pubsub.ssubscribe(channel)
        else:
            await pubsub.subscribe(channel)
        deadline = time.monotonic() + STEP_TIMEOUT
        while True:
            remaining = deadline - time.monotonic()
            expect(remaining > 0, f"no subscribe confirmation for {channel}")
            msg = await next_published(pubsub, remaining)
            if msg is not None and msg["type"] in ("subscribe", "ssubscribe"):
                break
        yield pubsub
    finally:
        await pubsub.aclose()


async def next_published(pubsub: PubSub, timeout: float) -> dict[str, Any] | None:
    """The next pub/sub message or confirmation, None after `timeout` seconds."""
    if SHARDED:
        return await pubsub.get_sharded_message(timeout=timeout)  # type: ignore[attr-defined]
    return await pubsub.get_message(timeout=timeout)


async def collect_published(pubsub: PubSub, count: int, timeout: float = STEP_TIMEOUT) -> list[bytes]:
    """Gather up to `count` pub/sub payloads; returns early (short) on timeout
    so the caller can report how many actually arrived."""
    received: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(received) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        msg = await next_published(pubsub, remaining)
        if msg is not None and msg["type"] in ("message", "smessage"):
            received.append(msg["data"])
    return received


async def recv_text(ws: ClientConnection, what: str = "a message") -> str:
    try:
        frame = await asyncio.wait_for(ws.recv(), STEP_TIMEOUT)
    except asyncio.TimeoutError:
        raise TestFailure(f"timed out waiting for {what}") from None
    expect(isinstance(frame, str), f"expected a text frame for {what}, got binary {frame!r:.80}")
    return frame


async def recv_many(ws: ClientConnection, count: int) -> list[str]:
    received: list[str] = []
    for i in range(count):
        try:
            received.append(await recv_text(ws, f"message {i + 1} of {count}"))
        except TestFailure as exc:
            raise TestFailure(f"{exc} (got {len(received)} so far)") from None
    return received


async def expect_quiet(ws: ClientConnection, period: float = QUIET_PERIOD) -> None:
    try:
        frame = await asyncio.wait_for(ws.recv(), period)
    except asyncio.TimeoutError:
        return
    raise TestFailure(f"unexpected frame {frame!r:.120}")


def expect_in_order(received: list, expected: list, what: str) -> None:
    if received == expected:
        return
    expect(
        len(received) == len(expected),
        f"{what}: expected {len(expected)} messages, got {len(received)}",
    )
    first_diff = next(i for i, (r, e) in enumerate(zip(received, expected)) if r != e)
    raise TestFailure(
        f"{what}: message {first_diff} differs: expected {expected[first_diff]!r:.120}, "
        f"got {received[first_diff]!r:.120}"
    )


async def expect_rejected(
    url: str,
    headers: dict[str, str] | None,
    status: int,
    error: str,
) -> None:
    """Attempt a handshake that must fail with `status` and a JSON body whose
    "error" field is `error`."""
    try:
        async with ws_connect(url, headers):
            pass
    except InvalidStatus as exc:
        response = exc.response
        expect(
            response.status_code == status,
            f"{url}: expected HTTP {status}, got {response.status_code}",
        )
        try:
            body = json.loads(response.body or b"")
        except ValueError:
            raise TestFailure(f"{url}: error body is not JSON: {response.body!r:.120}") from None
        expect(isinstance(body, dict) and "error" in body, f"{url}: no 'error' field in {body!r:.120}")
        expect(body["error"] == error, f"{url}: expected error {error!r}, got {body['error']!r}")
        return
    raise TestFailure(f"{url}: handshake was accepted, expected HTTP {status}")


def http_get(path: str) -> tuple[int, bytes]:
    """Blocking GET that returns (status, body) for any status code."""
    # An empty ProxyHandler bypasses proxy environment variables.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(http_base_url() + path, timeout=STEP_TIMEOUT) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------


async def test_connect_with_bearer_header(ctx: Context) -> None:
    session = new_id()
    token = await ctx.grant(session)
    async with ws_connect(ws_url(new_id("agent-"), session), bearer(token)) as ws:
        # Round-trip one message so "connected" means usable, not just upgraded.
        await ctx.publish(down_channel(session), '{"hello":"header"}')
        expect(await recv_text(ws) == '{"hello":"header"}', "downstream message mismatch")


async def test_connect_with_query_token(ctx: Context) -> None:
    session = new_id()
    token = await ctx.grant(session)
    async with ws_connect(ws_url(new_id("agent-"), session, access_token=token)) as ws:
        await ctx.publish(down_channel(session), '{"hello":"query"}')
        expect(await recv_text(ws) == '{"hello":"query"}', "downstream message mismatch")


async def test_missing_or_malformed_credentials_401(ctx: Context) -> None:
    session = new_id()
    token = await ctx.grant(session)
    url = ws_url(new_id("agent-"), session)
    # A valid token exists, so a 401 here can only come from how it is presented.
    for headers in (
        None,
        {"Authorization": f"Basic {token}"},
        {"Authorization": "Bearer "},
        {"Authorization": "Bearer"},
        {"Authorization": token},
    ):
        try:
            await expect_rejected(url, headers, 401, "missing_token")
        except TestFailure as exc:
            raise TestFailure(f"headers={headers}: {exc}") from None


async def test_wrong_token_403(ctx: Context) -> None:
    session = new_id()
    await ctx.grant(session)
    agent = new_id("agent-")
    wrong = new_id("wrong-")
    await expect_rejected(ws_url(agent, session), bearer(wrong), 403, "invalid_token")
    await expect_rejected(ws_url(agent, session, access_token=wrong), None, 403, "invalid_token")


async def test_absent_key_403(ctx: Context) -> None:
    session = new_id()  # no auth key is ever stored for this session
    await expect_rejected(ws_url(new_id("agent-"), session), bearer(new_id("tok-")), 403, "invalid_token")


async def test_expired_key_403(ctx: Context) -> None:
    session = new_id()
    token = new_id("tok-")
    key = auth_key(session)
    ctx.created_keys.add(key)
    await ctx.redis.set(key, token, px=200)
    await asyncio.sleep(0.5)
    await expect_rejected(ws_url(new_id("agent-"), session), bearer(token), 403, "invalid_token")


async def test_invalid_ids_400(ctx: Context) -> None:
    agent = new_id("agent-")
    token = new_id("tok-")
    bad_sessions = (
        "bad%3A" + new_id(),  # ':' would let a client address other key spaces
        "bad%2A" + new_id(),  # '*' is a Redis glob character
        "bad%20" + new_id(),
        "a" * 129,            # one over the length limit
    )
    for session in bad_sessions:
        await expect_rejected(ws_url(agent, session), bearer(token), 400, "invalid_id")
    # The agent id is held to the same rules.
    await expect_rejected(ws_url("bad%2A" + agent, new_id()), bearer(token), 400, "invalid_id")


async def test_ttl_reset_and_reconnect(ctx: Context) -> None:
    session = new_id()
    agent = new_id("agent-")
    token = await ctx.grant(session, ttl=5)
    key = auth_key(session)
    # Allow a few seconds of slack for clock granularity and test latency.
    low, high = max(GRACE_PERIOD - 5, 0), GRACE_PERIOD

    async with ws_connect(ws_url(agent, session), bearer(token)):
        # The contract does not say whether the TTL is extended before or just
        # after the 101, so poll briefly rather than reading it once.
        deadline = time.monotonic() + 2
        ttl = await ctx.redis.ttl(key)
        while not (low <= ttl <= high) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            ttl = await ctx.redis.ttl(key)
        expect(ttl > 5, f"TTL was not extended: {ttl}")
        expect(low <= ttl <= high, f"TTL {ttl} not within [{low}, {high}] (AUTH_GRACE_PERIOD_SECS={GRACE_PERIOD})")

    # Stateless reconnection: the same token must keep working.
    async with ws_connect(ws_url(agent, session), bearer(token)) as ws:
        await ctx.publish(down_channel(session), '"after-reconnect"')
        expect(await recv_text(ws) == '"after-reconnect"', "reconnected socket did not get messages")
    ttl = await ctx.redis.ttl(key)
    expect(low <= ttl <= high, f"TTL {ttl} after reconnect not within [{low}, {high}]")


async def test_redis_to_websocket(ctx: Context) -> None:
    session = new_id()
    token = await ctx.grant(session)
    messages = [json.dumps({"type": "data", "seq": i, "payload": f"down #{i}"}) for i in range(N_MESSAGES)]
    async with ws_connect(ws_url(new_id("agent-"), session), bearer(token)) as ws:
        # Published immediately after the handshake: the contract promises the
        # server is already subscribed when the 101 arrives.
        for i, msg in enumerate(messages):
            receivers = await ctx.publish(down_channel(session), msg)
            # Classic PUBLISH on a cluster counts the publishing node's
            # subscribers only (the cluster bus carries it to the others).
            if i == 0 and not (CLUSTER and not SHARDED):
                expect(receivers >= 1, "no subscriber on the down channel right after connect")
        received = await recv_many(ws, N_MESSAGES)
    expect_in_order(received, messages, "downstream")


async def test_websocket_to_redis(ctx: Context) -> None:
    session = new_id()
    token = await ctx.grant(session)
    # Varied shapes and formatting: the server must accept any JSON value and
    # forward the exact bytes, not a re-serialisation.
    messages = [
        json.dumps({"type": "ping", "seq": i}) if i % 5 else f'{{ "seq" : {i},  "spaced" :true }}'
        for i in range(N_MESSAGES - 4)
    ] + ["42", '"just a string"', '[1, 2, {"nested": null}]', '{"unicode":"héllo ✓ 日本"}']

    async with subscribed(ctx.redis, up_channel(session)) as pubsub:
        async with ws_connect(ws_url(new_id("agent-"), session), bearer(token)) as ws:
            for msg in messages:
                await ws.send(msg)
            received = await collect_published(pubsub, len(messages))
    expect_in_order(received, [m.encode() for m in messages], "upstream")


async def test_bidirectional(ctx: Context) -> None:
    session = new_id()
    token = await ctx.grant(session)
    down = [json.dumps({"dir": "down", "seq": i}) for i in range(N_MESSAGES)]
    up = [json.dumps({"dir": "up", "seq": i}) for i in range(N_MESSAGES)]

    async with subscribed(ctx.redis, up_channel(session)) as pubsub:
        async with ws_connect(ws_url(new_id("agent-"), session), bearer(token)) as ws:

            async def send_up() -> None:
                for msg in up:
                    await ws.send(msg)
                    await asyncio.sleep(0)  # interleave with the other direction

            async def publish_down() -> None:
                for msg in down:
                    await ctx.publish(down_channel(session), msg)
                    await asyncio.sleep(0)

            _, _, got_down, got_up = await asyncio.gather(
                send_up(),
                publish_down(),
                recv_many(ws, len(down)),
                collect_published(pubsub, len(up)),
            )
    expect_in_order(got_down, down, "downstream")
    expect_in_order(got_up, [m.encode() for m in up], "upstream")


async def test_invalid_json_rejected(ctx: Context) -> None:
    session = new_id()
    token = await ctx.grant(session)
    async with subscribed(ctx.redis, up_channel(session)) as pubsub:
        async with ws_connect(ws_url(new_id("agent-"), session), bearer(token)) as ws:
            await ws.send('{"unterminated": ')
            reply = json.loads(await recv_text(ws, "the invalid_json error"))
            expect(reply.get("type") == "error", f"error frame has wrong type: {reply}")
            expect(reply.get("error") == "invalid_json", f"wrong error code: {reply}")
            expect(isinstance(reply.get("message"), str), f"error frame lacks a message: {reply}")

            # The socket must survive, and the first thing published on :up
            # must be this valid message, proving the bad one was dropped.
            await ws.send('{"after":"invalid"}')
            received = await collect_published(pubsub, 1)
            expect(received == [b'{"after":"invalid"}'], f"unexpected upstream traffic: {received}")


async def test_binary_frame_rejected(ctx: Context) -> None:
    session = new_id()
    token = await ctx.grant(session)
    async with subscribed(ctx.redis, up_channel(session)) as pubsub:
        async with ws_connect(ws_url(new_id("agent-"), session), bearer(token)) as ws:
            await ws.send(b'{"binary": true}')
            reply = json.loads(await recv_text(ws, "the binary_not_supported error"))
            expect(reply.get("type") == "error", f"error frame has wrong type: {reply}")
            expect(reply.get("error") == "binary_not_supported", f"wrong error code: {reply}")

            await ws.send('{"after":"binary"}')
            received = await collect_published(pubsub, 1)
            expect(received == [b'{"after":"binary"}'], f"unexpected upstream traffic: {received}")


async def test_fanout_and_session_isolation(ctx: Context) -> None:
    session, other = new_id(), new_id()
    token, other_token = await ctx.grant(session), await ctx.grant(other)
    messages = [json.dumps({"fanout": i}) for i in range(N_MESSAGES)]

    async with (
        ws_connect(ws_url(new_id("agent-"), session), bearer(token)) as first,
        ws_connect(ws_url(new_id("agent-"), session), bearer(token)) as second,
        ws_connect(ws_url(new_id("agent-"), other), bearer(other_token)) as outsider,
    ):
        for msg in messages:
            await ctx.publish(down_channel(session), msg)
        got_first, got_second = await asyncio.gather(
            recv_many(first, N_MESSAGES), recv_many(second, N_MESSAGES)
        )
        expect_in_order(got_first, messages, "first connection")
        expect_in_order(got_second, messages, "second connection")

        # The outsider's first frame must be its own sentinel; anything else
        # means traffic leaked across sessions. The quiet check afterwards
        # catches a leak that is merely late.
        await ctx.publish(down_channel(other), '"sentinel"')
        first_seen = await recv_text(outsider, "the other session's sentinel")
        expect(first_seen == '"sentinel"', f"other session received foreign message {first_seen!r:.120}")
        await expect_quiet(outsider)


async def test_oversized_message_closes_1009(ctx: Context) -> None:
    session = new_id()
    token = await ctx.grant(session)
    # Valid JSON, so only the size can be the reason for closing.
    payload = '"' + "a" * MAX_MESSAGE_BYTES + '"'
    async with ws_connect(ws_url(new_id("agent-"), session), bearer(token)) as ws:
        try:
            await ws.send(payload)
        except ConnectionClosed:
            pass  # the server may close while the frame is still being written
        try:
            await asyncio.wait_for(ws.wait_closed(), STEP_TIMEOUT)
        except asyncio.TimeoutError:
            raise TestFailure(f"connection still open after a {len(payload)}-byte message") from None
        expect(ws.close_code == 1009, f"expected close code 1009, got {ws.close_code}")


async def test_health_and_ready(ctx: Context) -> None:
    for path, expected in (("/health", {"status": "healthy"}), ("/ready", {"status": "ready"})):
        status, body = await asyncio.to_thread(http_get, path)
        expect(status == 200, f"GET {path}: HTTP {status}, body {body!r:.120}")
        try:
            doc = json.loads(body)
        except ValueError:
            raise TestFailure(f"GET {path}: body is not JSON: {body!r:.120}") from None
        expect(
            isinstance(doc, dict) and doc.get("status") == expected["status"],
            f"GET {path}: expected {expected}, got {doc}",
        )


async def test_metrics_endpoint(ctx: Context) -> None:
    status, body = await asyncio.to_thread(http_get, "/metrics")
    expect(status == 200, f"GET /metrics: HTTP {status}, body {body!r:.120}")


# --------------------------------------------------------------------------
# Reliable sessions (wsproxy.v1)
# --------------------------------------------------------------------------


def history_key(session_id: str) -> str:
    return f"session:{tag(session_id)}:history"


async def reliable_publish(ctx: Context, session_id: str, message: dict) -> str:
    """What a backend does: FCALL wsproxy_publish; returns the offset."""
    ctx.created_keys.update({history_key(session_id), f"session:{tag(session_id)}:epoch"})
    offset = await ctx.redis.fcall("wsproxy_publish", 1, history_key(session_id), json.dumps(message))
    return offset.decode() if isinstance(offset, bytes) else str(offset)


async def recv_json(ws: ClientConnection, what: str) -> dict:
    text = await recv_text(ws, what)
    try:
        return json.loads(text)
    except ValueError:
        raise TestFailure(f"{what} is not JSON: {text!r:.120}") from None


async def test_reliable_subprotocol_selected_or_refused(ctx: Context) -> None:
    session = new_id()
    token = await ctx.grant(session)
    url = ws_url(new_id("agent-"), session)
    if not RELIABLE:
        try:
            async with ws_connect(url, bearer(token), [RELIABLE_PROTOCOL]):
                raise TestFailure("wsproxy.v1 accepted with reliable sessions off")
        except InvalidStatus as exc:
            status = exc.response.status_code
            body = json.loads(exc.response.body or b"{}")
            expect(
                status == 400 and body.get("error") == "reliable_sessions_off",
                f"expected 400 reliable_sessions_off, got {status} {body}",
            )
        return
    async with ws_connect(url, bearer(token), [RELIABLE_PROTOCOL]) as ws:
        expect(ws.subprotocol == RELIABLE_PROTOCOL, f"subprotocol {ws.subprotocol!r}")
        welcome = await recv_json(ws, "the welcome")
        expect(welcome.get("type") == "welcome" and "epoch" in welcome, f"welcome: {welcome}")


async def test_reliable_resume_after_missed_messages(ctx: Context) -> None:
    needs_reliable()
    session = new_id()
    token = await ctx.grant(session)
    url = ws_url(new_id("agent-"), session)
    async with ws_connect(url, bearer(token), [RELIABLE_PROTOCOL]) as ws:
        welcome = await recv_json(ws, "the welcome")
        epoch = welcome["epoch"]
        for i in range(3):
            await reliable_publish(ctx, session, {"n": i})
        last = None
        for i in range(3):
            m = await recv_json(ws, f"message {i}")
            expect(m.get("type") == "message" and m["data"] == {"n": i}, f"message {i}: {m}")
            last = m["offset"]
    for i in range(3, 3 + N_MESSAGES):
        await reliable_publish(ctx, session, {"n": i})
    query = urllib.parse.urlencode({"epoch": epoch, "offset": last})
    async with ws_connect(f"{url}?{query}", bearer(token), [RELIABLE_PROTOCOL]) as ws:
        welcome = await recv_json(ws, "the resume's welcome")
        expect(welcome.get("resumed") is True, f"not resumed: {welcome}")
        expect(welcome.get("replayed") == N_MESSAGES, f"replayed: {welcome}")
        got = [(await recv_json(ws, f"replayed message {i}"))["data"]["n"] for i in range(N_MESSAGES)]
        expect_in_order(got, list(range(3, 3 + N_MESSAGES)), "replayed messages")
        await expect_quiet(ws)
    # An offset this history never gave out: told, not skipped.
    async with ws_connect(
        f"{url}?" + urllib.parse.urlencode({"epoch": epoch, "offset": "99999999999999-0"}),
        bearer(token),
        [RELIABLE_PROTOCOL],
    ) as ws:
        welcome = await recv_json(ws, "the welcome")
        expect(
            welcome.get("resumed") is False and welcome.get("reason") == "unknown_offset",
            f"expected an explicit failure: {welcome}",
        )


async def test_reliable_client_messages_acked_and_stored_once(ctx: Context) -> None:
    needs_reliable()
    session = new_id()
    token = await ctx.grant(session)
    url = ws_url(new_id("agent-"), session)
    msg_id = new_id("m-")
    frame = json.dumps({"type": "message", "id": msg_id, "data": {"text": "hi"}})
    offsets = []
    for attempt in range(2):
        async with ws_connect(url, bearer(token), [RELIABLE_PROTOCOL]) as ws:
            await recv_json(ws, "the welcome")
            await ws.send(frame)
            ack = await recv_json(ws, "the ack")
            expect(ack.get("type") == "ack" and ack.get("id") == msg_id, f"ack: {ack}")
            expect(bool(ack.get("duplicate")) == (attempt == 1), f"duplicate flag on attempt {attempt}: {ack}")
            offsets.append(ack["offset"])
    expect(offsets[0] == offsets[1], f"the resend got another offset: {offsets}")
    # Find the stream it went to (one of the shards: wsproxy:up:<n>, on a
    # cluster wsproxy:up:{<n>}, scanned on every master) and count the copies.
    copies = 0
    async for key in ctx.redis.scan_iter(match="wsproxy:up:*", _type="stream"):
        for _, fields in await ctx.redis.xrange(key, min=offsets[0], max=offsets[0]):
            if fields.get(b"id") == msg_id.encode():
                copies += 1
                expect(fields.get(b"session") == session.encode(), f"session field: {fields}")
                expect(json.loads(fields[b"data"]) == {"text": "hi"}, f"data field: {fields}")
    expect(copies == 1, f"stored {copies} times")


async def test_plain_client_gets_replayable_messages_unchanged(ctx: Context) -> None:
    needs_reliable()
    session = new_id()
    token = await ctx.grant(session)
    async with ws_connect(ws_url(new_id("agent-"), session), bearer(token)) as ws:
        await reliable_publish(ctx, session, {"to": "plain"})
        expect(json.loads(await recv_text(ws)) == {"to": "plain"}, "plain clients get the message as it is")


# --------------------------------------------------------------------------
# Control, and what a Redis Cluster changes
# --------------------------------------------------------------------------


async def wait_close(ws: ClientConnection) -> None:
    try:
        await asyncio.wait_for(ws.wait_closed(), STEP_TIMEOUT)
    except asyncio.TimeoutError:
        raise TestFailure("the connection was not closed") from None


async def test_control_disconnect_closes_every_connection(ctx: Context) -> None:
    session = new_id()
    token = await ctx.grant(session)
    url = ws_url(new_id("agent-"), session)
    subprotocols = [RELIABLE_PROTOCOL] if RELIABLE else None
    async with ws_connect(url, bearer(token)) as plain, ws_connect(url, bearer(token), subprotocols) as second:
        if RELIABLE:
            await recv_json(second, "the welcome")
        # The documented command: FCALL wsproxy_control on the control
        # stream (on a cluster in the slot of wsproxy:control).
        message = json.dumps({"type": "disconnect", "session_id": session, "code": 4001, "reason": "suite"})
        stream = "{wsproxy:control}:log" if CLUSTER else "wsproxy:control:log"
        await ctx.redis.fcall("wsproxy_control", 1, stream, message)
        for ws in (plain, second):
            await wait_close(ws)
            expect(
                ws.close_code == 4001 and ws.close_reason == "suite",
                f"closed with {ws.close_code} {ws.close_reason!r}, expected 4001 'suite'",
            )


async def test_cluster_untagged_names_are_not_used(ctx: Context) -> None:
    """On a cluster a token under the standalone name (session:<id>:auth, no
    hash tag) lets nobody in, and an untagged publish reaches nobody."""
    needs_cluster()
    session = new_id()
    token = new_id("tok-")
    untagged = f"session:{session}:auth"
    ctx.created_keys.add(untagged)
    await ctx.redis.set(untagged, token, ex=60)
    await expect_rejected(ws_url(new_id("agent-"), session), bearer(token), 403, "invalid_token")
    token = await ctx.grant(session)
    async with ws_connect(ws_url(new_id("agent-"), session), bearer(token)) as ws:
        await ctx.publish(f"session:{session}:down", '"untagged"')
        await ctx.publish(down_channel(session), '"tagged"')
        expect(await recv_text(ws) == '"tagged"', "the untagged channel reached the client")


async def test_cluster_a_sessions_names_share_a_slot(ctx: Context) -> None:
    needs_cluster()
    session = new_id()
    names = [auth_key(session), down_channel(session), up_channel(session), history_key(session)]
    slots = {name: int(await ctx.redis.cluster_keyslot(name)) for name in names}
    expect(len(set(slots.values())) == 1, f"slots differ: {slots}")


TESTS: list[Callable[[Context], Awaitable[None]]] = [
    test_connect_with_bearer_header,
    test_connect_with_query_token,
    test_missing_or_malformed_credentials_401,
    test_wrong_token_403,
    test_absent_key_403,
    test_expired_key_403,
    test_invalid_ids_400,
    test_ttl_reset_and_reconnect,
    test_redis_to_websocket,
    test_websocket_to_redis,
    test_bidirectional,
    test_invalid_json_rejected,
    test_binary_frame_rejected,
    test_fanout_and_session_isolation,
    test_oversized_message_closes_1009,
    test_health_and_ready,
    test_metrics_endpoint,
    test_reliable_subprotocol_selected_or_refused,
    test_reliable_resume_after_missed_messages,
    test_reliable_client_messages_acked_and_stored_once,
    test_plain_client_gets_replayable_messages_unchanged,
    test_control_disconnect_closes_every_connection,
    test_cluster_untagged_names_are_not_used,
    test_cluster_a_sessions_names_share_a_slot,
]


# --------------------------------------------------------------------------
# Runner
# --------------------------------------------------------------------------


async def run_one(redis: Redis, test: Callable[[Context], Awaitable[None]]) -> str | None:
    """Run one test; return None on success or the failure reason (raises
    Skipped when it does not apply)."""
    ctx = Context(redis)
    started = time.monotonic()
    try:
        await asyncio.wait_for(test(ctx), TEST_TIMEOUT)
        return None
    except Skipped:
        raise
    except (asyncio.TimeoutError, TimeoutError):
        # Either the whole test hit TEST_TIMEOUT or a single step (handshake,
        # HTTP request) hit its own shorter limit; the elapsed time tells which.
        return f"timed out after {time.monotonic() - started:.1f}s (test limit {TEST_TIMEOUT:g}s)"
    except TestFailure as exc:
        return str(exc)
    except Exception as exc:  # a crash is a failure too, not a reason to stop the suite
        return f"{type(exc).__name__}: {exc}"
    finally:
        try:
            await asyncio.wait_for(ctx.cleanup(), STEP_TIMEOUT)
        except Exception as exc:
            print(f"  warning: could not delete {sorted(ctx.created_keys)}: {exc}")


async def main(filters: list[str]) -> int:
    selected = [t for t in TESTS if not filters or any(f in t.__name__ for f in filters)]
    if not selected:
        print(f"no test matches {filters}")
        return 2
    if CLUSTER:
        print(f"wsproxy: {WSPROXY_URL}   redis cluster ({CLUSTER_PUBSUB} pub/sub): {','.join(CLUSTER_NODES)}\n")
    else:
        print(f"wsproxy: {WSPROXY_URL}   redis: {REDIS_URL}\n")

    redis = redis_client()
    failures: list[tuple[str, str]] = []
    skipped = 0
    try:
        for test in selected:
            started = time.monotonic()
            try:
                reason = await run_one(redis, test)
            except Skipped as why:
                print(f"SKIP  {test.__name__}: {why}")
                skipped += 1
                continue
            elapsed = time.monotonic() - started
            if reason is None:
                print(f"PASS  {test.__name__}  ({elapsed:.2f}s)")
            else:
                print(f"FAIL  {test.__name__}  ({elapsed:.2f}s): {reason}")
                failures.append((test.__name__, reason))
    finally:
        await redis.aclose()

    passed = len(selected) - len(failures) - skipped
    print(f"\n{passed} passed, {len(failures)} failed, {skipped} skipped, {len(selected)} total")
    for name, reason in failures:
        print(f"  {name}: {reason}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
