"""The Redis names wsproxy uses, and the id rule (the same as ``src/keys.rs``).

Standalone Redis (``REDIS_URL``) names have no hash tags; on a Redis
Cluster (``REDIS_CLUSTER_NODES``) the session id, a topic's session and an
up-stream shard go in braces, so that all of a session's names share one
slot. :class:`Names` spells both; the module-level functions are the
standalone spelling.

>>> auth_key("s1")
'session:s1:auth'
>>> up_stream(0)
'wsproxy:up:0'
>>> CLUSTER.auth_key("s1"), CLUSTER.up_stream(0)
('session:{s1}:auth', 'wsproxy:up:{0}')
>>> up_shard("anything", 1)
0
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: Longest agent or session id wsproxy accepts.
MAX_ID_LEN = 128

#: The stream lifecycle events are appended to.
EVENTS_STREAM = "wsproxy:events"

#: The stream of control commands every wsproxy process reads
#: (``FCALL wsproxy_control 1 wsproxy:control:log <json>``); on a cluster
#: ``{wsproxy:control}:log`` (see :meth:`Names.control_stream`).
CONTROL_STREAM = "wsproxy:control:log"

#: The channel ``wsproxy_control`` wakes the processes up on (with the new
#: entry's id). Publishing a command itself here is the old, deprecated way:
#: live only, best effort.
CONTROL_CHANNEL = "wsproxy:control"

#: The subprotocol a reliable client asks for.
RELIABLE_PROTOCOL = "wsproxy.v1"

_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


def valid_id(value: str) -> bool:
    """True for an id wsproxy accepts: 1-128 of ``A-Z a-z 0-9 - _ .``.

    >>> valid_id("chat-42.a_b"), valid_id("a:b"), valid_id(""), valid_id("{x}")
    (True, False, False, False)
    """
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def check_id(value: str, what: str = "session id") -> str:
    """Returns ``value`` if it is a valid id, else raises ``ValueError``.

    An id with ``:``, ``*``, a brace or a space could address another
    session's keys (or slot), so nothing with one ever reaches Redis.
    """
    if not valid_id(value):
        raise ValueError(f"invalid {what} {value!r}: expected 1-128 of A-Z a-z 0-9 - _ .")
    return value


@dataclass(frozen=True)
class Names:
    """How one Redis deployment spells wsproxy's names: :data:`STANDALONE`
    (``session:42:auth``) or :data:`CLUSTER` (``session:{42}:auth``, the id
    as a hash tag).

    >>> STANDALONE.down_channel("42"), CLUSTER.down_channel("42")
    ('session:42:down', 'session:{42}:down')
    >>> CLUSTER.history_key("42"), CLUSTER.up_streams(2)
    ('session:{42}:history', ['wsproxy:up:{0}', 'wsproxy:up:{1}'])
    """

    #: True on a Redis Cluster: ids go into names as hash tags.
    cluster: bool = False

    def tag(self, value: str) -> str:
        """``value`` as it goes into a name: itself, or ``{value}`` on a cluster."""
        return f"{{{value}}}" if self.cluster else value

    def _session(self, session_id: str, suffix: str) -> str:
        return f"session:{self.tag(check_id(session_id))}:{suffix}"

    def auth_key(self, session_id: str) -> str:
        """The key holding a session's token (``SETEX``)."""
        return self._session(session_id, "auth")

    def down_channel(self, session_id: str) -> str:
        """The channel plain messages to a session are published on."""
        return self._session(session_id, "down")

    def up_channel(self, session_id: str) -> str:
        """The channel wsproxy publishes a plain client's messages on."""
        return self._session(session_id, "up")

    def history_key(self, session_id: str) -> str:
        """The history stream ``FCALL wsproxy_publish`` takes as its key."""
        return self._session(session_id, "history")

    def epoch_key(self, session_id: str) -> str:
        """The hash holding a session history's epoch."""
        return self._session(session_id, "epoch")

    def presence_key(self, session_id: str) -> str:
        """The hash of a session's open connections (``PRESENCE=true``)."""
        return self._session(session_id, "presence")

    def events_channel(self, session_id: str) -> str:
        """The channel a session's events are also published on (``EVENTS_SESSION_CHANNEL=true``)."""
        return self._session(session_id, "events")

    def topic_channel(self, session: str, topic: str) -> str:
        """The channel of a topic in a session (topic pub/sub on ``/ws``)."""
        return f"pubsub:{self.tag(check_id(session, 'session'))}:{check_id(topic, 'topic')}"

    def anonymous_topic_channel(self, session: str, topic: str) -> str:
        """The channel of a topic in a session of anonymous ``/ws`` clients on a
        wsproxy that also takes tokens (``JWT_SECRET`` and
        ``PUBSUB_ALLOW_ANONYMOUS=true``): apart from token holders' sessions."""
        return f"pubsub:anon:{self.tag(check_id(session, 'session'))}:{check_id(topic, 'topic')}"

    def up_stream(self, shard: int) -> str:
        """The stream of reliable client messages of shard ``shard``."""
        return f"wsproxy:up:{self.tag(str(int(shard)))}"

    def up_streams(self, shards: int) -> list[str]:
        """Every client-message stream of a wsproxy with ``UP_STREAM_SHARDS=shards``."""
        if shards < 1:
            raise ValueError("shards must be at least 1")
        return [self.up_stream(n) for n in range(shards)]

    def control_stream(self) -> str:
        """The control stream ``FCALL wsproxy_control`` takes as its key: on a
        cluster in the slot of ``wsproxy:control``, so the function can wake
        the processes up in the same call."""
        return "{wsproxy:control}:log" if self.cluster else CONTROL_STREAM

    def all_up_channels(self) -> str:
        """The pattern of every session's up channel (``PSUBSCRIBE``; classic pub/sub only)."""
        return "session:{*}:up" if self.cluster else "session:*:up"


#: Names on one Redis server (``REDIS_URL``).
STANDALONE = Names(cluster=False)
#: Names on a Redis Cluster (``REDIS_CLUSTER_NODES``).
CLUSTER = Names(cluster=True)


def auth_key(session_id: str) -> str:
    """The key holding a session's token (``SETEX``), standalone spelling."""
    return STANDALONE.auth_key(session_id)


def down_channel(session_id: str) -> str:
    """The channel plain messages to a session are published on, standalone spelling."""
    return STANDALONE.down_channel(session_id)


def up_channel(session_id: str) -> str:
    """The channel wsproxy publishes a plain client's messages on, standalone spelling."""
    return STANDALONE.up_channel(session_id)


def history_key(session_id: str) -> str:
    """The history stream ``FCALL wsproxy_publish`` takes as its key, standalone spelling."""
    return STANDALONE.history_key(session_id)


def presence_key(session_id: str) -> str:
    """The hash of a session's open connections (``PRESENCE=true``)."""
    return STANDALONE.presence_key(session_id)


def events_channel(session_id: str) -> str:
    """The channel a session's events are also published on (``EVENTS_SESSION_CHANNEL=true``)."""
    return STANDALONE.events_channel(session_id)


def up_stream(shard: int) -> str:
    """The stream of reliable client messages of shard ``shard``, standalone spelling."""
    return STANDALONE.up_stream(shard)


def up_streams(shards: int) -> list[str]:
    """Every client-message stream of a wsproxy with ``UP_STREAM_SHARDS=shards``.

    >>> up_streams(3)
    ['wsproxy:up:0', 'wsproxy:up:1', 'wsproxy:up:2']
    """
    return STANDALONE.up_streams(shards)


def up_shard(session_id: str, shards: int) -> int:
    """The shard of a session's client messages: FNV-1a-64 of the id modulo ``shards``.

    The same function as wsproxy's, so a backend knows which stream a
    session's messages land in.

    >>> up_shard("s7", 4) == up_shard("s7", 4) < 4
    True
    """
    h = 0xCBF29CE484222325
    for b in session_id.encode():
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h % max(shards, 1)


_SESSION_CHANNEL = re.compile(r"session:(?:\{([A-Za-z0-9._-]{1,128})\}|([A-Za-z0-9._-]{1,128})):(up|down|events)")


def session_of_channel(channel: str) -> str | None:
    """The session id in a ``session:<id>:up`` (or ``:down``, ``:events``)
    channel name, in either spelling.

    >>> session_of_channel("session:abc:up"), session_of_channel("session:{abc}:up"), session_of_channel("other")
    ('abc', 'abc', None)
    """
    m = _SESSION_CHANNEL.fullmatch(channel)
    return (m.group(1) or m.group(2)) if m else None
