"""The session bridge as a FastAPI user would write it: the peer of
wsproxy's plain session bridge in the benchmark (issue 25).

Same wire interface as wsproxy's `GET /{agent_id}/ws/{session_id}`:

* the token comes in `Authorization: Bearer <token>` or, for browsers,
  `?access_token=<token>` (the header wins), and must equal the string at
  `session:{session_id}:auth` (GET, constant-time compare); otherwise the
  upgrade is refused (403) before the WebSocket is accepted;
* every message published on `session:{session_id}:down` reaches the client
  as a text frame, in order;
* every client text frame that is JSON is published on
  `session:{session_id}:up`; anything else gets an error frame back.

Per worker process: ONE shared redis-py asyncio pub/sub connection. A
session subscribes its down channel when its first client connects and
unsubscribes when its last one leaves. A dispatcher task reads the pub/sub
connection and puts each message into the bounded queue of every connection
of that session; a writer task per connection sends them. A connection
whose queue is full is a slow consumer: it is closed with 1008, as wsproxy
closes one.

The subscription is confirmed before the WebSocket is accepted: the handler
sends SUBSCRIBE on the shared connection and waits until the dispatcher has
read Redis' `subscribe` reply for that channel, so nothing published after
the accept is lost (the same guarantee wsproxy gives before its 101).

Run it as production users run uvicorn:
`uvicorn app:app --workers 2 --no-access-log --log-level warning
 --loop uvloop --http httptools --ws websockets`.
Configuration: REDIS_URL (default redis://127.0.0.1:6379), QUEUE_SIZE
X
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import re
from collections import deque
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
QUEUE_SIZE = int(os.environ.get("QUEUE_SIZE", "1024"))
SUBSCRIBE_TIMEOUT = 5.0
SLOW_CONSUMER = 1008  # policy, as wsproxy closes a slow consumer
VALID_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")

log = logging.getLogger("bridge")


class Hub:
    """One worker's shared pub/sub connection and who listens on what."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self.pubsub = client.pubsub()
        # channel -> the queues of its connections
        self.listeners: dict[str, set[asyncio.Queue]] = {}
        # channel -> one future per SUBSCRIBE sent and not yet confirmed, in
        # order: Redis answers a connection's commands in the order sent,
        # so each `subscribe` reply resolves the oldest.
        self.confirming: dict[str, deque[asyncio.Future]] = {}
        self.dispatcher: asyncio.Task | None = None

    async def start(self) -> None:
        # redis-py's listen() ends when nothing is subscribed, so each
        # worker keeps one channel of its own subscribed for its lifetime.
        await self.pubsub.subscribe(f"bridge:worker:{os.getpid()}")
        self.dispatcher = asyncio.create_task(self.dispatch())
        self.dispatcher.add_done_callback(self.dispatcher_ended)

    @staticmethod
    def dispatcher_ended(task: asyncio.Task) -> None:
        # Not restarted (see README.md): say so, at least.
        if not task.cancelled() and task.exception() is not None:
            log.error("pub/sub dispatcher died, no more deliveries: %r", task.exception())

    async def stop(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.dispatcher
        await self.pubsub.aclose()
        await self.client.aclose()
        await self.client.connection_pool.disconnect()

    async def dispatch(self) -> None:
        async for msg in self.pubsub.listen():
            kind, channel = msg["type"], msg["channel"]
            if kind == "message":
                for q in tuple(self.listeners.get(channel, ())):
                    try:
                        q.put_nowait(msg["data"])
                    except asyncio.QueueFull:
                        self.evict(channel, q)
            elif kind == "subscribe":
                pending = self.confirming.get(channel)
                if pending:
                    fut = pending.popleft()
                    if not pending:
                        del self.confirming[channel]
                    if not fut.done():
                        fut.set_result(None)

    def evict(self, channel: str, q: asyncio.Queue) -> None:
        """A slow consumer: drop what it has queued and tell its writer to
        close the connection; it gets nothing more."""
        self.listeners.get(channel, set()).discard(q)
        while not q.empty():
            q.get_nowait()
        q.put_nowait(None)

    async def join(self, channel: str, q: asyncio.Queue) -> None:
        """Adds a connection's queue; returns once Redis has confirmed the
        channel's subscription."""
        queues = self.listeners.setdefault(channel, set())
        queues.add(q)
        if len(queues) == 1:
            fut = asyncio.get_running_loop().create_future()
            self.confirming.setdefault(channel, deque()).append(fut)
            # the reply may be read (and fut resolved) before this returns
            await self.pubsub.subscribe(channel)
        else:
            # the latest SUBSCRIBE: once it is confirmed, the channel is live
            pending = self.confirming.get(channel)
            fut = pending[-1] if pending else None
        if fut is not None:
            # shield: one waiter timing out must not cancel the others' wait
            await asyncio.wait_for(asyncio.shield(fut), SUBSCRIBE_TIMEOUT)

    async def leave(self, channel: str, q: asyncio.Queue) -> None:
        queues = self.listeners.get(channel)
        if queues is None:
            return
        queues.discard(q)
        if not queues:
            del self.listeners[channel]
            await self.pubsub.unsubscribe(channel)


@asynccontextmanager
async def lifespan(app: FastAPI):
    # redis-py has no pipelining across tasks: each command in flight holds
    # a pooled connection. The default pool raises MaxConnectionsError past
    # 100; a blocking pool waits for a free connection instead, which is
    # what a connect burst (hundreds of token GETs at once) needs.
    pool = aioredis.BlockingConnectionPool.from_url(
        REDIS_URL, max_connections=100, timeout=5, decode_responses=True
    )
    client = aioredis.Redis(connection_pool=pool)
    hub = Hub(client)
    await hub.start()
    app.state.redis = client
    app.state.hub = hub
    try:
        yield
    finally:
        await hub.stop()


app = FastAPI(lifespan=lifespan)


def bearer(ws: WebSocket, access_token: str | None) -> str | None:
    header = ws.headers.get("authorization")
    if header is not None:
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        return token if scheme.lower() == "bearer" and token else None
    return access_token or None


async def writer(ws: WebSocket, q: asyncio.Queue) -> None:
    while True:
        data = await q.get()
        if data is None:
            await ws.close(code=SLOW_CONSUMER, reason="slow consumer")
            return
        await ws.send_text(data)


@app.websocket("/{agent_id}/ws/{session_id}")
async def session(
    ws: WebSocket, agent_id: str, session_id: str, access_token: str | None = None
) -> None:
    if not VALID_ID.match(agent_id) or not VALID_ID.match(session_id):
        await ws.close(code=1008)  # before accept: the upgrade gets a 403
        return
    redis: aioredis.Redis = ws.app.state.redis
    hub: Hub = ws.app.state.hub
    token = bearer(ws, access_token)
    stored = await redis.get(f"session:{session_id}:auth")
    if token is None or stored is None or not hmac.compare_digest(stored, token):
        await ws.close(code=1008)
        return
    channel = f"session:{session_id}:down"
    up = f"session:{session_id}:up"
    q: asyncio.Queue = asyncio.Queue(maxsize=QUEUE_SIZE)
    try:
        try:
            await hub.join(channel, q)
        except (asyncio.TimeoutError, aioredis.RedisError):
            log.warning("subscribe %s failed", channel)
            await ws.close(code=1011)
            return
        await ws.accept()
        sender = asyncio.create_task(writer(ws, q))
        try:
            while True:
                text = await ws.receive_text()
                try:
                    json.loads(text)
                except ValueError:
                    await ws.send_text(
                        '{"type":"error","code":"invalid_json","message":"message is not valid JSON"}'
                    )
                    continue
                await redis.publish(up, text)
        except (WebSocketDisconnect, RuntimeError, KeyError):
            # KeyError: a binary frame (receive_text); RuntimeError: the
            # writer closed the socket (slow consumer).
            pass
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sender
    finally:
        await hub.leave(channel, q)
