"""Reading what wsproxy writes: client messages and lifecycle events.

Two kinds of source:

- **streams** read with a consumer group (reliable client messages in
  ``wsproxy:up:{n}``, events in ``wsproxy:events``): each entry goes to one
  consumer of the group and stays pending until acknowledged; entries a
  dead consumer held are claimed by another (``XPENDING ... IDLE``, ``XCLAIM``). See
  :class:`GroupConsumer`.
- **channels** (plain client messages on ``session:{id}:up``, a session's
  events on ``session:{id}:events``): every subscriber gets every message
  published while it listens, and nothing else. See :class:`Subscription`.

Both work on a Redis Cluster too (a ``RedisCluster`` client): each stream
is read on its own node, and channels are sharded (``SSUBSCRIBE``) or
classic.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any, Generic, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import keys
from .models import ClientMessage, Event, _loads, _text

log = logging.getLogger("wsproxy_backend")

# Where a group that disappeared is created again: every entry a stream
# holds then came after the loss (a Redis restarted without persistence
# lost the streams with their groups), and "$" would skip them.
LOST_GROUP_START = "0"

T = TypeVar("T", ClientMessage, Event)

Entry = tuple[str, str, "dict[str, str] | None"]  # stream, entry id, fields (None: deleted)

#: A Redis client: one server or a cluster.
AnyRedis = aioredis.Redis | RedisCluster


def _fields(raw: Any) -> dict[str, str] | None:
    if raw is None:
        return None
    if isinstance(raw, dict):
        return {_text(k): _text(v) for k, v in raw.items()}
    # A flat [k, v, k, v] list (a client without the stream response callbacks).
    items = list(raw)
    return {_text(items[i]): _text(items[i + 1]) for i in range(0, len(items) - 1, 2)}


def socket_timeout(redis: AnyRedis) -> float | None:
    """The read timeout (seconds) of the client's connections, ``None`` for none.

    redis-py 6 and later give connections a 5 s timeout unless told
    otherwise; a blocking read longer than that would fail.
    """
    if isinstance(redis, RedisCluster):
        kwargs = redis.connection_kwargs
    else:
        kwargs = redis.connection_pool.connection_kwargs
    if "socket_timeout" in kwargs:
        t = kwargs["socket_timeout"]
        return float(t) if t else None
    try:
        from redis._defaults import DEFAULT_SOCKET_TIMEOUT  # redis-py >= 6

        return float(DEFAULT_SOCKET_TIMEOUT) if DEFAULT_SOCKET_TIMEOUT else None
    except ImportError:  # redis-py 5: no timeout by default
        return None


def _stream_replies(reply: Any) -> list[Entry]:
    """Flattens an XREADGROUP reply (RESP2 list or RESP3 dict) into entries."""
    out: list[Entry] = []
    if not reply:
        return out
    pairs = reply.items() if isinstance(reply, dict) else reply
    for stream, entries in pairs:
        if isinstance(entries, list) and len(entries) == 1 and isinstance(entries[0], list):
            entries = entries[0]  # RESP3: redis-py wraps the entry list in a list
        for entry in entries or []:
            entry_id, fields = entry[0], entry[1] if len(entry) > 1 else None
            out.append((_text(stream), _text(entry_id), _fields(fields)))
    return out


class GroupConsumer(Generic[T]):
    """One consumer of a consumer group over one or more streams.

    Iterate it to get entries as they come: first this consumer's own
    pending entries (delivered to the same consumer name before, e.g. before
    a restart, never acknowledged), then new ones, and every
    ``claim_interval`` seconds those another consumer has left pending longer
    than ``claim_idle_ms`` (it died, say). Acknowledge each with :meth:`ack`
    once it is handled; what is not acknowledged is delivered again (to this
    consumer's next start, or to another consumer once idle long enough).
    Handling must therefore be idempotent, or quick: an entry whose handling
    takes longer than ``claim_idle_ms`` may be claimed by another consumer.
    ``claim_idle_ms`` must be positive (``ValueError``): 0 would claim what
    the other consumers are handling right now. ``None`` turns claiming off.

    Leaving the iteration (the handler raised, ``break``) releases what it
    handed out and was not acknowledged, the rest of its batch included:
    iterating the same object again gives those entries again, first. (A
    loop left by an exception or ``break`` is closed by asyncio soon after,
    not at once; ``contextlib.aclosing`` closes it at once.) An entry this
    consumer holds is never claimed by this consumer itself, so a handler
    that hangs does not keep it from the others.

    The group is created on first use (``XGROUP CREATE ... MKSTREAM``) at
    ``start``: ``"$"`` (the default) delivers what is added from then on,
    ``"0"`` everything the stream holds. An existing group is left as it is.
    If the group disappears (Redis restarted without persistence) it is
    created again at ``"0"``, whatever ``start`` was: what wsproxy added to
    a stream after the group was lost is read, not skipped (if only the
    group was destroyed, the entries before it come again: handling is
    idempotent anyway).

    On a Redis Cluster the streams live in different slots, and one
    ``XREADGROUP`` cannot name two of them: each stream then has a blocking
    read of its own, and :meth:`read` returns what the first of them brings
    (the others keep waiting, for the next call).
    """

    def __init__(
        self,
        redis: AnyRedis,
        streams: Sequence[str],
        group: str,
        consumer: str,
        *,
        start: str = "$",
        count: int = 100,
        block_ms: int = 2000,
        claim_idle_ms: int | None = 60_000,
        claim_interval: float | None = None,
    ) -> None:
        if not streams:
            raise ValueError("at least one stream")
        if not group or not consumer:
            raise ValueError("group and consumer names must not be empty")
        if claim_idle_ms is not None and claim_idle_ms <= 0:
            # Every entry handed out is pending with some idle time: 0 would
            # have each claim() take what live consumers are handling now.
            raise ValueError(f"claim_idle_ms must be positive (milliseconds), or None for no claims, not {claim_idle_ms!r}")
        self.redis = redis
        self.streams = list(streams)
        self.group = group
        self.consumer = consumer
        self.start = start
        self.count = count
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        self.claim_interval = (
            claim_interval if claim_interval is not None else max((claim_idle_ms or 0) / 2000, 1.0)
        )
        self._groups_ready = False
        # A blocking read may last at most half the socket timeout: longer,
        # and redis-py gives up on it while Redis may still answer.
        timeout = socket_timeout(redis)
        self._max_block_ms = max(50, int(timeout * 500)) if timeout else None
        # A read timed out: Redis may have delivered entries nobody saw, which
        # wait in this consumer's pending list.
        self._recheck_pending = False
        # (stream, entry id) handed out and not yet acknowledged, with the
        # iteration that handed it out (None: a direct read/pending/claim).
        self._outstanding: dict[tuple[str, str], object | None] = {}
        self._last_claim = 0.0
        # On a cluster with several streams: each stream's blocking read.
        self._per_stream = isinstance(redis, RedisCluster) and len(self.streams) > 1
        self._reads: dict[str, asyncio.Task[list[Entry]]] = {}

    # -- what subclasses define -------------------------------------------

    def _convert(self, stream: str, entry_id: str, fields: dict[str, str], redelivered: bool) -> T:
        raise NotImplementedError

    # -- group management ----------------------------------------------------

    async def ensure_group(self, start: str | None = None) -> None:
        """Creates the group on every stream that lacks it (``XGROUP CREATE ... MKSTREAM``),
        at ``start`` (this consumer's ``start`` unless given)."""
        for stream in self.streams:
            try:
                await self.redis.xgroup_create(stream, self.group, id=start or self.start, mkstream=True)
            except ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise
        self._groups_ready = True

    async def __aenter__(self) -> GroupConsumer[T]:
        await self.ensure_group()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stops the reads still waiting (a cluster's per-stream reads). What
        Redis delivered to them stays pending for this consumer: its next
        start reads it first."""
        reads, self._reads = self._reads, {}
        for task in reads.values():
            task.cancel()
        for task in reads.values():
            try:
                await task
            except BaseException:  # cancelled, or failed: nothing to hand out now
                pass
        if reads:
            self._recheck_pending = True

    # -- reading -------------------------------------------------------------

    async def _xreadgroup(self, ids: str, count: int, block_ms: int | None) -> list[Entry]:
        if not self._groups_ready:
            await self.ensure_group()
        if block_ms is not None and self._max_block_ms is not None:
            block_ms = min(block_ms, self._max_block_ms)
        if self._per_stream:
            return await self._xreadgroup_per_stream(ids, count, block_ms)
        return await self._xreadgroup_on(self.streams, ids, count, block_ms)

    async def _xreadgroup_per_stream(self, ids: str, count: int, block_ms: int | None) -> list[Entry]:
        """One XREADGROUP per stream (a cluster's streams are in different slots)."""
        if ids != ">" or block_ms is None:
            out: list[Entry] = []
            for stream in self.streams:
                out += await self._xreadgroup_on([stream], ids, count, block_ms)
            return out
        for stream in self.streams:
            if stream not in self._reads:
                self._reads[stream] = asyncio.ensure_future(self._xreadgroup_on([stream], ids, count, block_ms))
        # Each read ends by itself within block_ms; the margin covers the round trip.
        await asyncio.wait(
            list(self._reads.values()), timeout=block_ms / 1000 + 1.0, return_when=asyncio.FIRST_COMPLETED
        )
        out = []
        errors: list[tuple[str, Exception]] = []
        for stream, task in list(self._reads.items()):
            if not task.done():
                continue
            del self._reads[stream]
            try:
                out += task.result()
            except Exception as e:  # every finished read is collected before an error is raised
                errors.append((stream, e))
        if errors and not out:
            raise errors[0][1]
        for stream, e in errors:  # the entries others brought go out first; this stream is read again next time
            log.warning("%s: reading %s failed: %s", self.group, stream, e)
        return out

    async def _xreadgroup_on(self, stream_names: list[str], ids: str, count: int, block_ms: int | None) -> list[Entry]:
        streams: dict[Any, Any] = {s: ids for s in stream_names}
        try:
            try:
                reply = await self.redis.xreadgroup(self.group, self.consumer, streams, count=count, block=block_ms)
            except ResponseError as e:
                if "NOGROUP" not in str(e):
                    raise
                log.warning(
                    "consumer group %s is gone (Redis restarted?); creating it again, from the start of the streams",
                    self.group,
                )
                await self.ensure_group(LOST_GROUP_START)
                reply = await self.redis.xreadgroup(self.group, self.consumer, streams, count=count, block=block_ms)
        except RedisTimeoutError:
            if ids != ">":
                raise
            self._recheck_pending = True
            return []
        return _stream_replies(reply)

    async def _build(self, entries: Iterable[Entry], redelivered: bool) -> list[T]:
        out: list[T] = []
        gone: list[tuple[str, str]] = []
        for stream, entry_id, fields in entries:
            if (stream, entry_id) in self._outstanding:
                continue  # handed out already, and not acknowledged yet: being handled
            if fields is None:  # trimmed or deleted while pending: nothing to handle
                gone.append((stream, entry_id))
                continue
            try:
                item = self._convert(stream, entry_id, fields, redelivered)
            except (ValueError, KeyError, TypeError) as e:
                log.warning("acknowledging malformed entry %s %s: %s", stream, entry_id, e)
                gone.append((stream, entry_id))
                continue
            self._outstanding[(stream, entry_id)] = None
            out.append(item)
        for stream, entry_id in gone:
            await self.redis.xack(stream, self.group, entry_id)
        return out

    async def read(self, count: int | None = None, block_ms: int | None = None) -> list[T]:
        """New entries (``XREADGROUP ... >``), waiting up to ``block_ms`` for the first.

        Returns an empty list when nothing came in time. The wait is cut to
        half the Redis client's socket timeout, if it has one (redis-py's
        default is 5 s). If a read times out all the same, the next one
        first looks at this consumer's pending entries, where anything Redis
        delivered meanwhile waits.
        """
        if self._recheck_pending:
            self._recheck_pending = False
            missed = await self.pending(count)
            if missed:
                return missed
        block = self.block_ms if block_ms is None else block_ms
        entries = await self._xreadgroup(">", count or self.count, block)
        return await self._build(entries, redelivered=False)

    async def pending(self, count: int | None = None) -> list[T]:
        """This consumer's own unacknowledged entries, from the oldest (``XREADGROUP ... 0``),
        except those it has handed out already."""
        entries = await self._xreadgroup("0", count or self.count, None)
        return await self._build(entries, redelivered=True)

    async def claim(self, min_idle_ms: int | None = None, count: int | None = None) -> list[T]:
        """Takes over entries pending longer than ``min_idle_ms`` in any consumer
        of the group (``XCLAIM``), e.g. those of a worker that died.

        Entries this consumer has handed out and not acknowledged are left
        alone (neither claimed, which would reset their idle time and keep
        them from the others, nor returned again): finds the idle entries
        with ``XPENDING ... IDLE``, then claims the others (``XCLAIM``, which
        checks the idle time again).
        """
        idle = min_idle_ms if min_idle_ms is not None else (self.claim_idle_ms or 0)
        want = count or self.count
        if not self._groups_ready:
            await self.ensure_group()
        entries: list[Entry] = []
        for stream in self.streams:
            ids: list[str] = []
            start = "-"
            while len(entries) + len(ids) < want:
                try:
                    rows = await self.redis.xpending_range(stream, self.group, start, "+", want, idle=idle)
                except ResponseError as e:
                    if "NOGROUP" not in str(e):
                        raise
                    await self.ensure_group(LOST_GROUP_START)
                    break
                for row in rows:
                    entry_id = _text(row["message_id"])
                    if (stream, entry_id) not in self._outstanding and len(entries) + len(ids) < want:
                        ids.append(entry_id)
                if len(rows) < want:
                    break
                start = "(" + _text(rows[-1]["message_id"])
            if not ids:
                continue
            reply = await self.redis.xclaim(stream, self.group, self.consumer, idle, ids)
            for entry in reply or []:
                if entry is None or entry[0] is None:
                    continue  # Redis < 7: an entry deleted meanwhile
                fields = _fields(entry[1]) if len(entry) > 1 else None
                entries.append((stream, _text(entry[0]), fields))
        self._last_claim = time.monotonic()
        return await self._build(entries, redelivered=True)

    async def ack(self, *items: T) -> int:
        """Acknowledges handled entries (``XACK``); returns how many were pending."""
        by_stream: dict[str, list[str]] = collections.defaultdict(list)
        for item in items:
            if item.stream is None or item.entry_id is None:
                continue
            by_stream[item.stream].append(item.entry_id)
        acked = 0
        for stream, ids in by_stream.items():
            acked += int(await self.redis.xack(stream, self.group, *ids))
            for i in ids:
                self._outstanding.pop((stream, i), None)
        return acked

    async def __aiter__(self) -> AsyncIterator[T]:
        """Own pending entries, then new ones and claimed ones, for ever.

        Redis errors (it is restarting, say) are logged and retried with a
        growing delay (up to 5 s); the iteration does not end on them.

        Leaving it releases what it handed out and was not acknowledged (the
        whole batch's rest included): the next iteration gives that again.
        """
        delay = 0.1
        start = True
        me = object()  # this iteration, owner of what it hands out
        try:
            while True:
                try:
                    if start:
                        batch = self._own(await self.pending(), me)
                        start = len(batch) >= self.count
                        for item in batch:
                            yield item
                        continue
                    if self.claim_idle_ms is not None and time.monotonic() - self._last_claim >= self.claim_interval:
                        for item in self._own(await self.claim(), me):
                            yield item
                    block = self.block_ms
                    if self.claim_idle_ms is not None:
                        block = max(1, min(block, int(self.claim_interval * 1000)))
                    for item in self._own(await self.read(block_ms=block), me):
                        yield item
                    delay = 0.1
                except (RedisConnectionError, RedisTimeoutError, OSError) as e:
                    log.warning("%s: Redis error, retrying in %.1f s: %s", self.group, delay, e)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
        finally:
            # Left (the handler raised, break, aclose): what this iteration
            # handed out and nobody acknowledged is this consumer's pending
            # entry again, for its next iteration (or another's claim).
            for key in [k for k, owner in self._outstanding.items() if owner is me]:
                del self._outstanding[key]
                self._recheck_pending = True

    def _own(self, items: list[T], owner: object) -> list[T]:
        """Marks ``items`` (just handed out) as handed out by the iteration ``owner``."""
        for item in items:
            key = (item.stream or "", item.entry_id or "")
            if key in self._outstanding:
                self._outstanding[key] = owner
        return items


class ClientMessages(GroupConsumer[ClientMessage]):
    """Reliable client messages (the ``wsproxy:up:{n}`` streams) for one consumer of a group.

    Example::

        async def worker(wsproxy):
            async with wsproxy.client_messages("agents", "worker-1") as messages:
                async for msg in messages:
                    await wsproxy.send_reliable(msg.session_id, {"echo": msg.data})
                    await messages.ack(msg)
    """

    def _convert(self, stream: str, entry_id: str, fields: dict[str, str], redelivered: bool) -> ClientMessage:
        if "session" not in fields or "data" not in fields:
            raise ValueError("not a client message (no session or data field)")
        return ClientMessage.from_stream(stream, entry_id, fields, redelivered=redelivered)


class Events(GroupConsumer[Event]):
    """Lifecycle events (the ``wsproxy:events`` stream) for one consumer of a group.

    Example::

        async def watch(wsproxy):
            async with wsproxy.events("presence-tracker", "tracker-1") as events:
                async for event in events:
                    print(event.type, event.session_id, event.reason)
                    await events.ack(event)
    """

    def _convert(self, stream: str, entry_id: str, fields: dict[str, str], redelivered: bool) -> Event:
        return Event.from_json(fields["event"], stream=stream, entry_id=entry_id, redelivered=redelivered)


class Subscription(Generic[T]):
    """A Redis Pub/Sub subscription, used as ``async with`` and iterated.

    Entering it returns once Redis has confirmed every subscription, so
    whatever is published after that is received. Leaving it unsubscribes
    and releases the connection.

    ``sharded=True`` (a Redis Cluster with sharded pub/sub) subscribes with
    ``SSUBSCRIBE``, each channel on its slot's node; it takes no patterns.
    """

    def __init__(
        self,
        redis: AnyRedis,
        channels: Sequence[str] = (),
        patterns: Sequence[str] = (),
        *,
        sharded: bool = False,
    ) -> None:
        if not channels and not patterns:
            raise ValueError("nothing to subscribe to")
        if sharded and patterns:
            raise ValueError("sharded pub/sub has no patterns")
        if sharded and not isinstance(redis, RedisCluster):
            raise ValueError("sharded pub/sub needs a RedisCluster client")
        self.redis = redis
        self.channels = list(channels)
        self.patterns = list(patterns)
        self.sharded = sharded
        self._pubsub: Any = None
        self._early: collections.deque[Any] = collections.deque()

    def _convert(self, channel: str, data: Any) -> T | None:
        raise NotImplementedError

    async def __aenter__(self) -> Subscription[T]:
        pubsub = self.redis.pubsub()
        self._pubsub = pubsub
        try:
            if self.sharded:
                await pubsub.ssubscribe(*self.channels)
            elif self.channels:
                await pubsub.subscribe(*self.channels)
            if self.patterns:
                await pubsub.psubscribe(*self.patterns)
            confirmations = len(set(self.channels)) + len(set(self.patterns))
            async with asyncio.timeout(10):
                while confirmations:
                    msg = await self._next(pubsub, 1.0)
                    if msg is None:
                        continue
                    if msg["type"] in ("subscribe", "psubscribe", "ssubscribe"):
                        confirmations -= 1
                    else:
                        self._early.append(msg)
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._close()

    async def _next(self, pubsub: Any, timeout: float) -> Any:
        if self.sharded:
            return await pubsub.get_sharded_message(timeout=timeout)
        return await pubsub.get_message(timeout=timeout)

    async def _close(self) -> None:
        if self._pubsub is not None:
            pubsub, self._pubsub = self._pubsub, None
            try:
                await pubsub.aclose()
            except Exception:  # the connection may be gone already
                pass

    async def get(self, timeout: float | None = None) -> T | None:
        """The next message, or ``None`` if none arrives within ``timeout`` seconds."""
        if self._pubsub is None:
            raise RuntimeError("use the subscription in `async with` first")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._early:
                msg = self._early.popleft()
            else:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                msg = await self._next(self._pubsub, left if left is not None else 1.0)
                if msg is None:
                    continue
            if msg.get("type") not in ("message", "pmessage", "smessage"):
                continue
            item = self._convert(_text(msg["channel"]), msg["data"])
            if item is not None:
                return item

    async def __aiter__(self) -> AsyncIterator[T]:
        while True:
            item = await self.get()
            if item is not None:
                yield item


class PlainClientMessages(Subscription[ClientMessage]):
    """Plain client messages, from ``session:{id}:up`` of some sessions or of all
    (``session:*:up``; on a cluster ``session:{<id>}:up``, sharded or classic).

    Example::

        async def echo(wsproxy):
            async with wsproxy.plain_client_messages() as messages:  # every session
                async for msg in messages:
                    await wsproxy.send(msg.session_id, {"echo": msg.data})
    """

    def _convert(self, channel: str, data: Any) -> ClientMessage | None:
        session = keys.session_of_channel(channel)
        if session is None:
            return None
        raw = _text(data)
        return ClientMessage(session_id=session, data=_loads(raw), raw=raw)


class SessionEvents(Subscription[Event]):
    """The events of some sessions as wsproxy publishes them on
    ``session:{id}:events`` (``EVENTS_SESSION_CHANNEL=true``): no group, no
    acknowledgement, only while subscribed."""

    def _convert(self, channel: str, data: Any) -> Event | None:
        try:
            return Event.from_json(_text(data))
        except ValueError as e:
            log.warning("ignoring malformed event on %s: %s", channel, e)
            return None
