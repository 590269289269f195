"""What the library hands out: client messages, lifecycle events, presence entries."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

EventType = Literal["connect", "resume", "disconnect"]


class WsproxyError(Exception):
    """Redis refused something wsproxy's formats need (e.g. ``wsproxy_publish``
    is not loaded because no wsproxy with ``RELIABLE_SESSIONS=true`` has
    started on this Redis)."""


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _opt_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(frozen=True, slots=True)
class ClientMessage:
    """A message a client sent on its WebSocket.

    Plain sessions (``reliable`` false) come from ``session:{id}:up``: only
    ``session_id``, ``data`` and ``raw`` are known. Reliable ones come from
    a ``wsproxy:up:{n}`` stream and also carry the connection's agent id, the
    client's message id, and where the entry is (to acknowledge it).

    >>> m = ClientMessage(session_id="s1", data={"text": "hi"}, raw='{"text":"hi"}')
    >>> m.data["text"], m.reliable
    ('hi', False)
    """

    session_id: str
    #: The client's JSON, parsed. ``None`` also when ``raw`` was not JSON.
    data: Any
    #: The client's JSON as wsproxy stored or published it.
    raw: str
    agent_id: str | None = None
    #: The id the client gave the message (reliable sessions; a resend has the same).
    message_id: str | None = None
    #: The stream (``wsproxy:up:{n}``) and entry id, for ``XACK``.
    stream: str | None = None
    entry_id: str | None = None
    #: True when it was claimed from another consumer (``XCLAIM``) or
    #: re-read from this consumer's own pending entries.
    redelivered: bool = False

    @property
    def reliable(self) -> bool:
        """True for a message of a reliable session (it has a stream entry to acknowledge)."""
        return self.entry_id is not None

    @classmethod
    def from_stream(cls, stream: str, entry_id: str, fields: dict[str, str], *, redelivered: bool = False) -> ClientMessage:
        """Builds one from a ``wsproxy:up:{n}`` entry (fields ``session``, ``agent``, ``id``, ``data``)."""
        raw = fields.get("data", "")
        return cls(
            session_id=fields.get("session", ""),
            data=_loads(raw),
            raw=raw,
            agent_id=fields.get("agent"),
            message_id=fields.get("id"),
            stream=stream,
            entry_id=entry_id,
            redelivered=redelivered,
        )


def _loads(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class Event:
    """A lifecycle event from ``wsproxy:events`` (``LIFECYCLE_EVENTS=true``).

    Every connection has one ``connect`` or ``resume`` event, then one
    ``disconnect`` event (which another process may emit, with reason
    ``process_lost`` and ``None`` counts, when the connection's process died).

    >>> e = Event.from_json('{"type":"disconnect","session_id":"s1","agent_id":"a",'
    ...     '"connection_id":"p:1","process":"p","time":1,"code":1000,"reason":"client",'
    ...     '"duration_ms":5,"messages_in":2,"messages_out":null}')
    >>> e.type, e.code, e.reason, e.messages_in, e.messages_out
    ('disconnect', 1000, 'client', 2, None)
    """

    type: str
    session_id: str
    agent_id: str
    connection_id: str
    process: str
    #: Unix time in milliseconds.
    time: int
    # connect and resume
    reliable: bool | None = None
    remote: str | None = None
    user_agent: str | None = None
    query: dict[str, str] = field(default_factory=dict)
    # resume
    resumed: bool | None = None
    replayed: int | None = None
    # disconnect (and a failed resume's reason)
    code: int | None = None
    reason: str | None = None
    duration_ms: int | None = None
    messages_in: int | None = None
    messages_out: int | None = None
    #: The whole JSON object, with fields this version does not know.
    raw: dict[str, Any] = field(default_factory=dict)
    #: Where it came from: ``wsproxy:events`` and the entry id (``None`` for
    #: events read from a ``session:{id}:events`` channel).
    stream: str | None = None
    entry_id: str | None = None
    redelivered: bool = False

    @property
    def is_arrival(self) -> bool:
        """True for ``connect`` and ``resume``: a connection of the session opened."""
        return self.type in ("connect", "resume")

    @property
    def is_disconnect(self) -> bool:
        return self.type == "disconnect"

    @classmethod
    def from_json(cls, text: str | bytes, *, stream: str | None = None, entry_id: str | None = None, redelivered: bool = False) -> Event:
        """Parses an event's JSON; raises ``ValueError`` if it is not an event object."""
        obj = json.loads(text)
        if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
            raise ValueError("an event is a JSON object with a string type")
        query = obj.get("query")
        return cls(
            type=obj["type"],
            session_id=str(obj.get("session_id", "")),
            agent_id=str(obj.get("agent_id", "")),
            connection_id=str(obj.get("connection_id", "")),
            process=str(obj.get("process", "")),
            time=_opt_int(obj.get("time")) or 0,
            reliable=obj.get("reliable") if isinstance(obj.get("reliable"), bool) else None,
            remote=obj.get("remote") if isinstance(obj.get("remote"), str) else None,
            user_agent=obj.get("user_agent") if isinstance(obj.get("user_agent"), str) else None,
            query={str(k): str(v) for k, v in query.items()} if isinstance(query, dict) else {},
            resumed=obj.get("resumed") if isinstance(obj.get("resumed"), bool) else None,
            replayed=_opt_int(obj.get("replayed")),
            code=_opt_int(obj.get("code")),
            reason=obj.get("reason") if isinstance(obj.get("reason"), str) else None,
            duration_ms=_opt_int(obj.get("duration_ms")),
            messages_in=_opt_int(obj.get("messages_in")),
            messages_out=_opt_int(obj.get("messages_out")),
            raw=obj,
            stream=stream,
            entry_id=entry_id,
            redelivered=redelivered,
        )


@dataclass(frozen=True, slots=True)
class PresenceEntry:
    """One open connection of a session, from ``session:{id}:presence`` (``PRESENCE=true``).

    >>> p = PresenceEntry.from_json("p1:7", '{"connection_id":"p1:7","process":"p1",'
    ...     '"agent_id":"web","since":1764600000000,"reliable":true}')
    >>> p.process, p.agent_id, p.reliable
    ('p1', 'web', True)
    """

    connection_id: str
    process: str
    agent_id: str
    #: When the connection opened, unix milliseconds.
    since: int
    reliable: bool
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, connection_id: str | bytes, text: str | bytes) -> PresenceEntry:
        """Parses one hash field and value; a value that is not JSON keeps only the field."""
        cid = _text(connection_id)
        try:
            obj = json.loads(text)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            obj = {}
        process = obj.get("process")
        if not isinstance(process, str):
            process = cid.rsplit(":", 1)[0] if ":" in cid else ""
        return cls(
            connection_id=str(obj.get("connection_id", cid)),
            process=process,
            agent_id=str(obj.get("agent_id", "")),
            since=_opt_int(obj.get("since")) or 0,
            reliable=bool(obj.get("reliable", False)),
            raw=obj,
        )
