"""The backend's side of wsproxy's session bridge, as one object over a Redis client."""

from __future__ import annotations

import itertools
import json
import re
import secrets
import urllib.parse
from collections.abc import Sequence
from typing import Any, Literal, NoReturn, TypeAlias

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import ResponseError

from . import keys
from .consumers import ClientMessages, Events, PlainClientMessages, SessionEvents
from .models import PresenceEntry, WsproxyError, _text
from .stream import MAX_BATCH, ReliableStream

#: Close codes a control ``disconnect`` may carry (the spec: 1000, 1008, 3000-4999).
ALLOWED_CLOSE_CODES = frozenset({1000, 1008, *range(3000, 5000)})

#: The close code wsproxy uses when a ``disconnect`` gives none.
DEFAULT_DISCONNECT_CODE = 4000

#: How wsproxy publishes on a Redis Cluster (its ``REDIS_CLUSTER_PUBSUB``):
#: ``"sharded"`` (``SPUBLISH``/``SSUBSCRIBE``, wsproxy's default) or
#: ``"classic"`` (``PUBLISH``/``SUBSCRIBE``).
ClusterMode: TypeAlias = Literal["sharded", "classic"]

_CLUSTER_MODES = ("sharded", "classic")



def _cluster_node(seed: str | tuple[str, int]) -> tuple[ClusterNode, dict[str, str]]:
    """A seed as REDIS_CLUSTER_NODES spells it (``redis://[user:password@]host:port``),
    ``host:port`` or ``(host, port)``; returns the node and its credentials."""
    if isinstance(seed, tuple):
        return ClusterNode(seed[0], int(seed[1])), {}
    if "://" not in seed:
        seed = "redis://" + seed
    url = urllib.parse.urlsplit(seed)
    if url.scheme not in ("redis", "rediss") or not url.hostname:
        raise ValueError(f"not a redis:// seed: {seed!r}")
    creds: dict[str, str] = {}
    if url.username:
        creds["username"] = urllib.parse.unquote(url.username)
    if url.password:
        creds["password"] = urllib.parse.unquote(url.password)
    return ClusterNode(url.hostname, url.port or 6379), creds


def _json(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


#: How deep Redis' cjson nests arrays and objects (its decode_max_depth).
_CJSON_MAX_DEPTH = 1000
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _unfit(payload: str | bytes) -> str | None:
    r"""Why ``wsproxy_publish`` would refuse ``payload``, or None: the
    library's checks (``rejected`` in src/session/history.rs), so that the
    fallback of :meth:`Wsproxy.send_reliable_many_raw` can refuse a whole
    batch before any of it is published.

    >>> [_unfit(p) for p in ['{"a":[1]}', '{"a":NaN}', '"\\ud800"', '"\x01"']]
    [None, 'the message must be JSON', 'the message must be JSON', 'the message must be JSON']
    """
    try:
        text = payload.decode("utf-8") if isinstance(payload, bytes) else payload
        text.encode("utf-8")  # a lone surrogate
    except UnicodeError:
        return "the message must be valid UTF-8"
    try:
        # Like the library, json refuses control characters in strings, and
        # NaN and Infinity with parse_constant. An escaped lone surrogate
        # ("\ud800") json takes and cjson does not: the encode refuses it.
        json.dumps(json.loads(text, parse_constant=_no_constant), ensure_ascii=False).encode("utf-8")
    except (ValueError, UnicodeError):
        return "the message must be JSON"
    except RecursionError:
        # Nested deeper than Python recurses (a little under cjson's 1000):
        # only the depth is told here; Redis checks the rest.
        bare = _JSON_STRING.sub('""', text)
        if max(itertools.accumulate((c in "[{") - (c in "]}") for c in bare)) > _CJSON_MAX_DEPTH:
            return "the message must be JSON"
    return None


def new_token(nbytes: int = 32) -> str:
    """A random URL-safe session token (``secrets.token_urlsafe``), 43 characters by default.

    >>> len(new_token()), new_token() != new_token()
    (43, True)
    """
    return secrets.token_urlsafe(nbytes)


def session_url(base_url: str, agent_id: str, session_id: str, token: str | None = None, **query: str) -> str:
    """The WebSocket URL a client connects to: ``{base}/{agent}/ws/{session}?access_token=...``.

    >>> session_url("wss://gw.example.com", "web", "s1", "tok")
    'wss://gw.example.com/web/ws/s1?access_token=tok'
    >>> session_url("http://127.0.0.1:8080/", "web", "s1")
    'ws://127.0.0.1:8080/web/ws/s1'
    """
    base = base_url.rstrip("/")
    for http, ws in (("http://", "ws://"), ("https://", "wss://")):
        if base.startswith(http):
            base = ws + base[len(http):]
    url = f"{base}/{keys.check_id(agent_id, 'agent id')}/ws/{keys.check_id(session_id)}"
    params = dict(query)
    if token is not None:
        params = {"access_token": token, **params}
    return url + ("?" + urllib.parse.urlencode(params) if params else "")


def disconnect_message(session_id: str, code: int | None = None, reason: str | None = None) -> str:
    """The control message that closes every connection of a session, checked
    against the spec's limits (``ValueError`` otherwise).

    >>> disconnect_message("s1", 4001, "revoked")
    '{"type":"disconnect","session_id":"s1","code":4001,"reason":"revoked"}'
    >>> disconnect_message("s1", 1001)
    Traceback (most recent call last):
    ...
    ValueError: close code 1001 is not allowed: use 1000, 1008 or 3000-4999
    """
    msg: dict[str, Any] = {"type": "disconnect", "session_id": keys.check_id(session_id)}
    if code is not None:
        if isinstance(code, bool) or not isinstance(code, int) or code not in ALLOWED_CLOSE_CODES:
            raise ValueError(f"close code {code!r} is not allowed: use 1000, 1008 or 3000-4999")
        msg["code"] = code
    if reason is not None:
        if len(reason.encode("utf-8")) > 123:
            raise ValueError("a close reason is at most 123 bytes of UTF-8")
        msg["reason"] = reason
    return _json(msg)


class Wsproxy:
    """Everything a backend does with wsproxy, through Redis.

    It holds a ``redis.asyncio.Redis`` client (``decode_responses`` either
    way) and never a socket of its own.

    Example::

        async def main():
            wsproxy = Wsproxy.from_url("redis://127.0.0.1:6379")
            token = await wsproxy.issue_token("s1", ttl=60)        # give it to the client
            await wsproxy.send("s1", {"type": "hello"})              # plain PUBLISH
            offset = await wsproxy.send_reliable("s1", {"n": 1})     # replayable
            print(await wsproxy.presence("s1"))                      # open connections
            await wsproxy.disconnect("s1", code=4001, reason="bye", revoke_token=True)
            await wsproxy.aclose()

    ``up_shards`` must be wsproxy's ``UP_STREAM_SHARDS``: it says which
    ``wsproxy:up:{n}`` streams :meth:`client_messages` reads.

    **Redis Cluster**: pass a ``redis.asyncio.cluster.RedisCluster`` (or use
    :meth:`from_cluster`, or :meth:`from_url` with ``cluster=``). Names then
    carry hash tags (``session:{id}:auth``, ``wsproxy:up:{n}``: see
    :class:`~wsproxy_backend.keys.Names`), and ``cluster`` must match
    wsproxy's ``REDIS_CLUSTER_PUBSUB``: ``"sharded"`` (the default:
    ``SPUBLISH``/``SSUBSCRIBE``) or ``"classic"`` (``PUBLISH``/``SUBSCRIBE``).
    Lifecycle events and presence work there too::

        wsproxy = Wsproxy.from_cluster(["redis://10.0.0.1:7000", "redis://10.0.0.2:7000"])
        await wsproxy.send("s1", {"type": "hello"})                  # SPUBLISH session:{s1}:down
    """

    def __init__(
        self,
        redis: aioredis.Redis | RedisCluster,
        *,
        up_shards: int = 1,
        events_stream: str = keys.EVENTS_STREAM,
        cluster: ClusterMode | None = None,
    ) -> None:
        if up_shards < 1:
            raise ValueError("up_shards must be at least 1")
        is_cluster = isinstance(redis, RedisCluster)
        if cluster is not None and cluster not in _CLUSTER_MODES:
            raise ValueError(f"cluster must be 'sharded', 'classic' or None, not {cluster!r}")
        if cluster is not None and not is_cluster:
            raise ValueError("cluster= needs a redis.asyncio.cluster.RedisCluster client")
        self.redis = redis
        self.up_shards = up_shards
        self.events_stream = events_stream
        #: ``None`` on one Redis server, else ``"sharded"`` or ``"classic"``
        #: (a ``RedisCluster`` without ``cluster=`` is sharded: wsproxy's default).
        self.cluster: ClusterMode | None = (cluster or "sharded") if is_cluster else None
        #: How this deployment spells names.
        self.names: keys.Names = keys.CLUSTER if is_cluster else keys.STANDALONE
        self._owns_redis = False
        # True once Redis said wsproxy_publish_batch is not there.
        self._batch_missing = False

    @property
    def sharded(self) -> bool:
        """True when channels are sharded (``SPUBLISH``/``SSUBSCRIBE``)."""
        return self.cluster == "sharded"

    @classmethod
    def from_url(
        cls,
        url: str = "redis://127.0.0.1:6379",
        *,
        up_shards: int = 1,
        cluster: ClusterMode | None = None,
        **redis_kwargs: Any,
    ) -> Wsproxy:
        """A client on its own Redis connection pool; :meth:`aclose` closes it.

        With ``cluster="sharded"`` or ``"classic"``, ``url`` is one node of a
        Redis Cluster (a ``RedisCluster``; it learns the others).
        """
        redis: aioredis.Redis | RedisCluster
        if cluster is not None:
            redis = RedisCluster.from_url(url, **redis_kwargs)
        else:
            redis = aioredis.Redis.from_url(url, **redis_kwargs)
        w = cls(redis, up_shards=up_shards, cluster=cluster)
        w._owns_redis = True
        return w

    @classmethod
    def from_cluster(
        cls,
        nodes: Sequence[str | tuple[str, int]] | str,
        *,
        pubsub: ClusterMode = "sharded",
        up_shards: int = 1,
        **redis_kwargs: Any,
    ) -> Wsproxy:
        """A client on a Redis Cluster, from seed nodes as wsproxy's
        ``REDIS_CLUSTER_NODES`` lists them (a comma-separated string or a list
        of ``redis://[user:password@]host:port``, ``host:port`` or ``(host,
        port)``); ``pubsub`` must be wsproxy's ``REDIS_CLUSTER_PUBSUB``.
        :meth:`aclose` closes the client.

        Example::

            wsproxy = Wsproxy.from_cluster(os.environ["REDIS_CLUSTER_NODES"], decode_responses=True)
        """
        if isinstance(nodes, str):
            nodes = [n.strip() for n in nodes.split(",") if n.strip()]
        if not nodes:
            raise ValueError("at least one seed node")
        startup: list[ClusterNode] = []
        for seed in nodes:
            node, creds = _cluster_node(seed)
            startup.append(node)
            for k, v in creds.items():
                redis_kwargs.setdefault(k, v)
        w = cls(RedisCluster(startup_nodes=startup, **redis_kwargs), up_shards=up_shards, cluster=pubsub)
        w._owns_redis = True
        return w

    async def aclose(self) -> None:
        """Closes the Redis client if :meth:`from_url` made it."""
        if self._owns_redis:
            await self.redis.aclose()

    async def __aenter__(self) -> Wsproxy:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- tokens ----------------------------------------------------------------

    async def issue_token(self, session_id: str, *, ttl: int = 60, token: str | None = None) -> str:
        """Stores a token for a session (``SETEX session:{id}:auth ttl token``) and returns it.

        The client must connect within ``ttl`` seconds; each successful
        connect makes wsproxy keep the token ``AUTH_GRACE_PERIOD_SECS`` (3
        hours by default) for reconnects. The default token is 32 random
        bytes, URL-safe. Issuing again replaces the session's token.

        Example::

            token = await wsproxy.issue_token("s1")
            url = session_url("ws://127.0.0.1:8080", "web", "s1", token)
        """
        if ttl < 1:
            raise ValueError("ttl must be at least 1 second")
        token = new_token() if token is None else token
        if not token or any(c.isspace() for c in token):
            raise ValueError("a token must be non-empty and have no whitespace")
        await self.redis.setex(self.names.auth_key(session_id), ttl, token)
        return token

    async def revoke_token(self, session_id: str) -> bool:
        """Deletes a session's token: nobody can connect (or reconnect) with it.
        Open connections stay open; see :meth:`disconnect`. True if there was one."""
        return bool(await self.redis.delete(self.names.auth_key(session_id)))

    # -- sending -----------------------------------------------------------------

    async def send(self, session_id: str, data: Any) -> int:
        """Sends ``data`` (as JSON) to a session's plain connections
        (``PUBLISH session:{id}:down``; on a cluster ``SPUBLISH
        session:{id}:down``, or ``PUBLISH`` in classic mode). Returns how many
        wsproxy processes got it (0: no plain connection of the session is
        open anywhere; reliable connections, on another channel, are not
        counted; in classic mode on a cluster, only the subscribers of the
        node it was published on are counted). Nothing is kept: a client not
        connected now never gets it.

        Example::

            await wsproxy.send("s1", {"type": "data", "payload": "hi"})  # 1
        """
        return await self.send_raw(session_id, _json(data))

    async def send_raw(self, session_id: str, payload: str | bytes) -> int:
        """Publishes ``payload`` unchanged on ``session:{id}:down`` (text that is
        not UTF-8 reaches the client as a binary frame)."""
        return await self._publish(self.names.down_channel(session_id), payload)

    async def _publish(self, channel: str, payload: str | bytes) -> int:
        if self.sharded:
            return int(await self.redis.spublish(channel, payload))
        return int(await self.redis.publish(channel, payload))

    async def send_reliable(self, session_id: str, data: Any) -> str:
        """Sends ``data`` (as JSON) through the session's history
        (``FCALL wsproxy_publish``): reliable clients get it once, in order,
        also after a reconnect; plain ones get it as :meth:`send` would.
        Returns the message's offset.

        Needs a wsproxy with ``RELIABLE_SESSIONS=true`` on this Redis (it
        loads the function); :class:`WsproxyError` otherwise.

        A :class:`WsproxyError` means nothing was stored. A connection error
        or a timeout does not say: Redis may have run the call before the
        answer was lost, so the message may be stored and delivered, and
        sending it again may deliver it twice, under a new offset (check the
        session's history, ``XREVRANGE session:<id>:history + - COUNT 10``,
        or make the message's data say whether it is a repeat).

        Example::

            await wsproxy.send_reliable("s1", {"n": 1})  # '1764600000000-0'
        """
        return await self.send_reliable_raw(session_id, _json(data))

    async def send_reliable_raw(self, session_id: str, payload: str) -> str:
        """:meth:`send_reliable` for a payload that is JSON text already."""
        try:
            offset = await self.redis.fcall("wsproxy_publish", 1, self.names.history_key(session_id), payload)
        except ResponseError as e:
            if "Function not found" in str(e):
                raise WsproxyError(
                    "wsproxy_publish is not loaded in this Redis: start a wsproxy with RELIABLE_SESSIONS=true on it"
                ) from e
            raise WsproxyError(str(e)) from e
        return _text(offset)

    async def send_reliable_many(self, session_id: str, items: Sequence[Any]) -> list[str]:
        """Sends each of ``items`` (as JSON) as :meth:`send_reliable` would, in
        order, in one call (``FCALL wsproxy_publish_batch``): far cheaper for
        Redis per message. All or nothing: when one item is not fit, none is
        stored and :class:`WsproxyError` names it. Returns the offsets.

        Example::

            await wsproxy.send_reliable_many("s1", [{"t": "Hel"}, {"t": "lo"}])  # ['...-0', '...-1']
        """
        return await self.send_reliable_many_raw(session_id, [_json(item) for item in items])

    async def send_reliable_many_raw(self, session_id: str, payloads: Sequence[str]) -> list[str]:
        """:meth:`send_reliable_many` for payloads that are JSON text already
        (1 to 1,000 of them).

        Against a wsproxy whose library has no ``wsproxy_publish_batch`` (an
        older version loaded it last), it sends one ``wsproxy_publish`` a
        message instead, still all or nothing: each message is first checked
        as the library would, and an unfit one fails the batch before any is
        sent; then all go in one ``MULTI``/``EXEC``, which Redis runs
        together or not at all (a connection lost midway publishes none).
        ``EXEC`` does not undo what ran when one call in it fails, so a
        message the library refuses although the check passed it (none is
        known) leaves the others published: the :class:`WsproxyError` then
        says which, and their offsets."""
        if not 1 <= len(payloads) <= MAX_BATCH:
            raise ValueError(f"send 1 to {MAX_BATCH} messages a call, not {len(payloads)}")
        if not self._batch_missing:
            try:
                offsets = await self.redis.fcall(
                    "wsproxy_publish_batch", 1, self.names.history_key(session_id), *payloads
                )
                return [_text(o) for o in offsets]
            except ResponseError as e:
                if "Function not found" not in str(e):
                    raise WsproxyError(str(e)) from e
                self._batch_missing = True
        for i, payload in enumerate(payloads, 1):
            why = _unfit(payload)
            if why:
                raise WsproxyError(f"wsproxy_publish: message {i}: {why} (nothing was published)")
        history = self.names.history_key(session_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            for payload in payloads:
                pipe.fcall("wsproxy_publish", 1, history, payload)
            replies = await pipe.execute(raise_on_error=False)
        failed = [(i, r) for i, r in enumerate(replies, 1) if isinstance(r, Exception)]
        if not failed:
            return [_text(r) for r in replies]
        i, error = failed[0]
        if "Function not found" in str(error):
            raise WsproxyError(
                "wsproxy_publish is not loaded in this Redis: start a wsproxy with RELIABLE_SESSIONS=true on it"
            ) from error
        stored = [f"{k}: {_text(r)}" for k, r in enumerate(replies, 1) if not isinstance(r, Exception)]
        raise WsproxyError(
            f"{error} (message {i}); published nevertheless: {', '.join(stored) or 'none'}"
        ) from error

    def reliable_stream(self, session_id: str, *, max_batch: int = MAX_BATCH) -> ReliableStream:
        """A :class:`~wsproxy_backend.stream.ReliableStream` of ``session_id``:
        :meth:`send_reliable` for a reply streamed piece by piece, batching
        what comes faster than Redis answers (see there).

        Example::

            async with wsproxy.reliable_stream("s1") as stream:
                for token in tokens:
                    stream.send({"type": "token", "text": token})
        """
        return ReliableStream(
            lambda payloads: self.send_reliable_many_raw(session_id, payloads), _json, max_batch=max_batch
        )

    # -- consuming ---------------------------------------------------------------

    def up_shard(self, session_id: str) -> int:
        """The shard (``wsproxy:up:<n>``, ``wsproxy:up:{<n>}`` on a cluster) of a session's reliable client messages."""
        return keys.up_shard(session_id, self.up_shards)

    def client_messages(
        self,
        group: str,
        consumer: str,
        *,
        start: str = "$",
        count: int = 100,
        block_ms: int = 2000,
        claim_idle_ms: int | None = 60_000,
        claim_interval: float | None = None,
    ) -> ClientMessages:
        """Reliable client messages of every session, for consumer ``consumer``
        of group ``group`` (one group per kind of worker; each message goes to
        one consumer of it). See :class:`~wsproxy_backend.consumers.GroupConsumer`.

        Example::

            async with wsproxy.client_messages("agents", "worker-1") as messages:
                async for msg in messages:
                    print(msg.session_id, msg.message_id, msg.data)
                    await messages.ack(msg)
        """
        return ClientMessages(
            self.redis,
            self.names.up_streams(self.up_shards),
            group,
            consumer,
            start=start,
            count=count,
            block_ms=block_ms,
            claim_idle_ms=claim_idle_ms,
            claim_interval=claim_interval,
        )

    def plain_client_messages(self, *session_ids: str) -> PlainClientMessages:
        """Plain client messages of the given sessions (``SUBSCRIBE session:{id}:up``),
        or of every session when none is given (``PSUBSCRIBE session:*:up``).
        Every subscriber gets every message; none is kept for later.

        On a cluster with sharded pub/sub it is ``SSUBSCRIBE session:{id}:up``
        (on each channel's shard), and sessions must be named: sharded pub/sub
        has no patterns (``ValueError``).

        Example::

            async with wsproxy.plain_client_messages("s1") as messages:
                msg = await messages.get(timeout=5)
        """
        if session_ids:
            return PlainClientMessages(
                self.redis, channels=[self.names.up_channel(s) for s in session_ids], sharded=self.sharded
            )
        if self.sharded:
            raise ValueError(
                "sharded pub/sub has no patterns: name the sessions, or run wsproxy with REDIS_CLUSTER_PUBSUB=classic"
            )
        return PlainClientMessages(self.redis, patterns=[self.names.all_up_channels()])

    def events(
        self,
        group: str,
        consumer: str,
        *,
        start: str = "$",
        count: int = 100,
        block_ms: int = 2000,
        claim_idle_ms: int | None = 60_000,
        claim_interval: float | None = None,
    ) -> Events:
        """Lifecycle events (``wsproxy:events``, ``LIFECYCLE_EVENTS=true``) for
        consumer ``consumer`` of group ``group``.

        Example::

            async with wsproxy.events("trackers", "tracker-1") as events:
                async for event in events:
                    if event.type == "disconnect":
                        print(event.session_id, event.code, event.reason)
                    await events.ack(event)

        On a Redis Cluster the stream keeps its name (it is one key).
        """
        return Events(
            self.redis,
            [self.events_stream],
            group,
            consumer,
            start=start,
            count=count,
            block_ms=block_ms,
            claim_idle_ms=claim_idle_ms,
            claim_interval=claim_interval,
        )

    def session_events(self, *session_ids: str) -> SessionEvents:
        """The events of these sessions as they happen (``SUBSCRIBE session:{id}:events``,
        ``EVENTS_SESSION_CHANNEL=true``): no acknowledgement, nothing kept.
        On a cluster with sharded pub/sub: ``SSUBSCRIBE session:{<id>}:events``."""
        if not session_ids:
            raise ValueError("name at least one session")
        return SessionEvents(
            self.redis, channels=[self.names.events_channel(s) for s in session_ids], sharded=self.sharded
        )

    # -- presence ----------------------------------------------------------------

    async def presence(self, session_id: str) -> list[PresenceEntry]:
        """The session's open connections, oldest first (``HGETALL
        session:{id}:presence``, ``PRESENCE=true``).

        Example::

            [p.connection_id for p in await wsproxy.presence("s1")]  # ['host-1:17']

        On a Redis Cluster: ``session:{<id>}:presence``.
        """
        raw = await self.redis.hgetall(self.names.presence_key(session_id))
        entries = [PresenceEntry.from_json(k, v) for k, v in raw.items()]
        return sorted(entries, key=lambda p: (p.since, p.connection_id))

    async def connection_count(self, session_id: str) -> int:
        """How many connections the session has open (``HLEN session:{id}:presence``)."""
        return int(await self.redis.hlen(self.names.presence_key(session_id)))

    # -- control -----------------------------------------------------------------

    async def disconnect(
        self,
        session_id: str,
        *,
        code: int | None = DEFAULT_DISCONNECT_CODE,
        reason: str | None = None,
        revoke_token: bool = False,
    ) -> str:
        """Closes every connection of a session, plain and reliable, on every
        wsproxy process, with ``code`` (1000, 1008 or 3000-4999) and
        ``reason`` (at most 123 bytes), with ``FCALL wsproxy_control 1
        wsproxy:control:log <json>``: the command goes into the control
        stream every process reads from its own position, so a burst or a
        process's outage loses none. Returns the command's stream entry id.

        With ``revoke_token=True`` the token is deleted in the same
        ``MULTI``/``EXEC``, so the client cannot reconnect with it either.
        On a cluster the key is ``{wsproxy:control}:log``, and a revoked
        token is deleted just before, not in one transaction (the two names
        live in different slots).

        Needs a wsproxy of this release or later on this Redis (it loads the
        function); :class:`WsproxyError` otherwise. (Until then this
        published on ``wsproxy:control`` and returned how many processes
        got it.)

        Example::

            await wsproxy.disconnect("s1", code=4001, reason="revoked", revoke_token=True)  # '1764600000000-0'
        """
        message = disconnect_message(session_id, code, reason)
        stream = self.names.control_stream()
        try:
            if self.cluster is not None or not revoke_token:
                if revoke_token:
                    await self.redis.delete(self.names.auth_key(session_id))
                entry = await self.redis.fcall("wsproxy_control", 1, stream, message)
            else:
                async with self.redis.pipeline(transaction=True) as pipe:
                    pipe.delete(self.names.auth_key(session_id))
                    pipe.fcall("wsproxy_control", 1, stream, message)
                    _, entry = await pipe.execute()
        except ResponseError as e:
            if "Function not found" in str(e):
                raise WsproxyError(
                    "wsproxy_control is not loaded in this Redis: start a wsproxy of this release on it"
                ) from e
            raise WsproxyError(str(e)) from e
        return _text(entry)


__all__: Sequence[str] = [
    "ALLOWED_CLOSE_CODES",
    "ClusterMode",
    "DEFAULT_DISCONNECT_CODE",
    "Wsproxy",
    "disconnect_message",
    "new_token",
    "session_url",
]
