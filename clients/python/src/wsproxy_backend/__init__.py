"""wsproxy_backend: the backend's side of wsproxy's session bridge, over Redis.

Clients hold WebSockets to wsproxy; the backend only talks to Redis. This
package does that talking with ``redis.asyncio``:

Example::

    from wsproxy_backend import Wsproxy

    async def main():
        async with Wsproxy.from_url("redis://127.0.0.1:6379") as wsproxy:
            token = await wsproxy.issue_token("s1")
            async with wsproxy.client_messages("agents", "worker-1") as messages:
                async for msg in messages:
                    await wsproxy.send_reliable(msg.session_id, {"echo": msg.data})
                    await messages.ack(msg)

On a Redis Cluster: ``Wsproxy.from_cluster(["redis://host:7000", ...])``
(sharded pub/sub, as wsproxy's ``REDIS_CLUSTER_PUBSUB`` defaults to), or
``Wsproxy(RedisCluster(...), cluster="classic")``.
"""

from .client import (
    ALLOWED_CLOSE_CODES,
    DEFAULT_DISCONNECT_CODE,
    ClusterMode,
    Wsproxy,
    disconnect_message,
    new_token,
    session_url,
)
from .consumers import ClientMessages, Events, GroupConsumer, PlainClientMessages, SessionEvents, Subscription
from .keys import RELIABLE_PROTOCOL, Names, up_shard, valid_id
from .models import ClientMessage, Event, PresenceEntry, WsproxyError
from .stream import ReliableStream

__all__ = [
    "ALLOWED_CLOSE_CODES",
    "DEFAULT_DISCONNECT_CODE",
    "RELIABLE_PROTOCOL",
    "ClientMessage",
    "ClientMessages",
    "ClusterMode",
    "Event",
    "Events",
    "GroupConsumer",
    "Names",
    "PlainClientMessages",
    "PresenceEntry",
    "ReliableStream",
    "SessionEvents",
    "Subscription",
    "Wsproxy",
    "WsproxyError",
    "disconnect_message",
    "new_token",
    "session_url",
    "up_shard",
    "valid_id",
]
__version__ = "0.1.0"
