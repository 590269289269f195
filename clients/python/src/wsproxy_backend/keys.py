"""The Redis names wsproxy uses, and the id rule (the same as ``src/keys.rs``).

>>> auth_key("s1")
'session:s1:auth'
>>> up_stream(0)
'wsproxy:up:0'
>>> up_shard("anything", 1)
0
"""

from __future__ import annotations

import re

#: Longest agent or session id wsproxy accepts.
MAX_ID_LEN = 128

#: The stream lifecycle events are appended to.
EVENTS_STREAM = "wsproxy:events"

#: The channel every wsproxy process listens to for control messages.
CONTROL_CHANNEL = "wsproxy:control"

#: The subprotocol a reliable client asks for.
RELIABLE_PROTOCOL = "wsproxy.v1"

_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


def valid_id(value: str) -> bool:
    """True for an id wsproxy accepts: 1-128 of ``A-Z a-z 0-9 - _ .``.

    >>> valid_id("chat-42.a_b"), valid_id("a:b"), valid_id("")
    (True, False, False)
    """
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def check_id(value: str, what: str = "session id") -> str:
    """Returns ``value`` if it is a valid id, else raises ``ValueError``.

    An id with ``:``, ``*`` or a space could address another session's keys,
    so nothing with one ever reaches Redis.
    """
    if not valid_id(value):
        raise ValueError(f"invalid {what} {value!r}: expected 1-128 of A-Z a-z 0-9 - _ .")
    return value


def auth_key(session_id: str) -> str:
    """The key holding a session's token (``SETEX``)."""
    return f"session:{check_id(session_id)}:auth"


def down_channel(session_id: str) -> str:
    """The channel plain messages to a session are published on."""
    return f"session:{check_id(session_id)}:down"


def up_channel(session_id: str) -> str:
    """The channel wsproxy publishes a plain client's messages on."""
    return f"session:{check_id(session_id)}:up"


def history_key(session_id: str) -> str:
    """The history stream ``FCALL wsproxy_publish`` takes as its key."""
    return f"session:{check_id(session_id)}:history"


def presence_key(session_id: str) -> str:
    """The hash of a session's open connections (``PRESENCE=true``)."""
    return f"session:{check_id(session_id)}:presence"


def events_channel(session_id: str) -> str:
    """The channel a session's events are also published on (``EVENTS_SESSION_CHANNEL=true``)."""
    return f"session:{check_id(session_id)}:events"


def up_stream(shard: int) -> str:
    """The stream of reliable client messages of shard ``shard``."""
    return f"wsproxy:up:{shard}"


def up_streams(shards: int) -> list[str]:
    """Every client-message stream of a wsproxy with ``UP_STREAM_SHARDS=shards``.

    >>> up_streams(3)
    ['wsproxy:up:0', 'wsproxy:up:1', 'wsproxy:up:2']
    """
    if shards < 1:
        raise ValueError("shards must be at least 1")
    return [up_stream(n) for n in range(shards)]


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


_SESSION_CHANNEL = re.compile(r"session:([A-Za-z0-9._-]{1,128}):(up|down|events)")


def session_of_channel(channel: str) -> str | None:
    """The session id in a ``session:{id}:up`` (or ``:down``, ``:events``) channel name.

    >>> session_of_channel("session:abc:up"), session_of_channel("other")
    ('abc', None)
    """
    m = _SESSION_CHANNEL.fullmatch(channel)
    return m.group(1) if m else None
