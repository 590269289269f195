"""The simulated agent: a worker that answers each prompt with a reply streamed
piece by piece, pauses a session's reply while its client is away, and
picks it up where it stopped when the client comes back.

It consumes three things at once, all from Redis through wsproxy_backend:

- reliable client messages (``wsproxy:up:{n}``, consumer group ``agents``):
  each prompt goes to one worker of the group; it is acknowledged once its
  reply has been sent in full, so a worker that dies mid-reply has the
  prompt claimed and answered by another (from the start);
- plain client messages (``PSUBSCRIBE session:*:up``): every worker gets
  them, so run one worker if you use plain sessions;
- lifecycle events (``wsproxy:events``, consumer group ``agents-events``,
  needs ``LIFECYCLE_EVENTS=true`` on wsproxy): a ``disconnect`` of a
  session's last connection pauses its reply before the next piece, a
  ``connect`` or ``resume`` lets it go on. Without events the agent never
  pauses. (With several workers, give each its own events group, e.g.
  ``--events-group agents-events-$HOSTNAME``, so every worker sees every
  session's events.)

Replies go back with ``send_reliable`` for reliable sessions (a client that
resumes gets what it missed) and ``send`` for plain ones.

A client may send ``{"type": "stop"}`` (optionally with the ``reply_to`` of
the reply it means): the session's reply in progress ends at once, before
its next piece, and the agent publishes ``{"type": "stopped", "reply_to",
"pieces", "sent"}`` in place of ``done``, so every connection of the
session sees the reply end. A stop with no reply in progress (or naming
another reply) does nothing. The stop must reach the worker that streams
the reply: with several workers, that holds for plain sessions (every
worker gets every plain message) but not for reliable ones (a stop goes to
one worker of the group).

Run it on its own with ``uv run agent.py`` (``app.py`` also runs one inside
the web server unless ``RUN_AGENT=false``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from dataclasses import dataclass, field
from typing import Any

from wsproxy_backend import ClientMessage, Event, Wsproxy

log = logging.getLogger("agent")

WORDS = (
    "This is a simulated agent. There is no model behind these words. Each one is "
    "published on its own, a moment after the last. That is how a language model "
    "streams its tokens. Leave the page and come back, and the reply carries on where "
    "it stopped."
).split()


def compose_reply(prompt: str, words: int) -> list[str]:
    """The pieces of the reply to ``prompt``: a sentence about it, then filler
    sentences, ``words`` pieces or a few more: the reply ends where a
    sentence ends.

    >>> compose_reply("hi", 6)
    ['You ', 'asked: ', '"hi". ', 'This ', 'is ', 'a ', 'simulated ', 'agent. ']
    """
    pieces = f'You asked: "{prompt}".'.split()
    i = 0
    while len(pieces) < words or not pieces[-1].endswith((".", "!", "?")):
        pieces.append(WORDS[i % len(WORDS)])
        i += 1
    return [w + " " for w in pieces]


@dataclass
class Reply:
    """A reply being streamed, and whether a client asked to stop it."""

    reply_to: str
    stop: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class SessionState:
    """What the agent knows of a session: its connections, from lifecycle
    events, and the reply it is streaming."""

    open: set[str] = field(default_factory=set)
    present: asyncio.Event = field(default_factory=asyncio.Event)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    current: Reply | None = None

    def __post_init__(self) -> None:
        self.present.set()  # until an event says otherwise, the client is there


class Agent:
    def __init__(
        self,
        wsproxy: Wsproxy,
        *,
        group: str = "agents",
        events_group: str = "agents-events",
        consumer: str | None = None,
        delay: float = 0.08,
        words: int = 40,
        plain: bool = True,
        events: bool = True,
    ) -> None:
        self.wsproxy = wsproxy
        self.group = group
        self.events_group = events_group
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.delay = delay
        self.words = words
        self.plain = plain
        self.follow_events = events
        self.sessions: dict[str, SessionState] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._handling: set[str] = set()

    def session(self, session_id: str) -> SessionState:
        return self.sessions.setdefault(session_id, SessionState())

    async def run(self) -> None:
        """Runs until cancelled. Each source is restarted if it fails (Redis
        errors are retried inside the library; anything else is logged)."""
        loops = {"client messages": self._reliable_loop}
        if self.plain:
            loops["plain client messages"] = self._plain_loop
        if self.follow_events:
            loops["events"] = self._events_loop
        log.info("agent %s: consuming (plain=%s, events=%s)", self.consumer, self.plain, self.follow_events)
        try:
            await asyncio.gather(*(self._supervised(name, loop) for name, loop in loops.items()))
        finally:
            for t in list(self._tasks):
                t.cancel()

    @staticmethod
    async def _supervised(name: str, loop: Any) -> None:
        while True:
            try:
                await loop()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("agent: %s failed; restarting in 1 s", name)
                await asyncio.sleep(1)

    # -- the three sources -------------------------------------------------------

    async def _reliable_loop(self) -> None:
        # Replies can pause for as long as a client is away: only claim prompts
        # a worker has held for 10 minutes (it is surely dead).
        async with self.wsproxy.client_messages(self.group, self.consumer, claim_idle_ms=600_000) as messages:
            async for msg in messages:
                if msg.entry_id in self._handling:
                    continue
                self._spawn(self._answer_and_ack(messages, msg))

    async def _answer_and_ack(self, messages: Any, msg: ClientMessage) -> None:
        assert msg.entry_id is not None
        self._handling.add(msg.entry_id)
        try:
            await self.answer(msg)
            await messages.ack(msg)
        finally:
            self._handling.discard(msg.entry_id)

    async def _plain_loop(self) -> None:
        async with self.wsproxy.plain_client_messages() as messages:
            async for msg in messages:
                self._spawn(self.answer(msg))

    async def _events_loop(self) -> None:
        async with self.wsproxy.events(self.events_group, self.consumer) as events:
            async for event in events:
                self.on_event(event)
                await events.ack(event)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("a reply failed", exc_info=task.exception())

    # -- presence from events ----------------------------------------------------

    def on_event(self, event: Event) -> None:
        state = self.session(event.session_id)
        if event.is_arrival:
            state.open.add(event.connection_id)
            if not state.present.is_set():
                log.info("session %s: client is back (%s), resuming", event.session_id, event.type)
            state.present.set()
        elif event.is_disconnect:
            state.open.discard(event.connection_id)
            if not state.open and state.present.is_set():
                log.info("session %s: client left (%s %s), pausing", event.session_id, event.code, event.reason)
                state.present.clear()

    # -- replies -------------------------------------------------------------------

    async def answer(self, msg: ClientMessage) -> None:
        """Handles one client message: a ``prompt`` is answered (``start``,
        one ``chunk`` per piece, then ``done``, or ``stopped`` if a ``stop``
        came meanwhile); a ``stop`` ends the session's reply in progress."""
        data = msg.data if isinstance(msg.data, dict) else {}
        if data.get("type") == "stop":
            reply_to = data.get("reply_to")
            self.stop(msg.session_id, reply_to if isinstance(reply_to, str) else None)
            return
        if data.get("type") != "prompt" or not isinstance(data.get("text"), str):
            return  # not for the agent
        reply_to = str(data.get("id") or msg.message_id or uuid.uuid4().hex)
        pieces = compose_reply(data["text"][:200], self.words)
        send = self.wsproxy.send_reliable if msg.reliable else self.wsproxy.send
        state = self.session(msg.session_id)
        async with state.lock:  # one reply at a time per session
            reply = state.current = Reply(reply_to)
            try:
                await send(msg.session_id, {"type": "start", "reply_to": reply_to, "pieces": len(pieces)})
                sent = 0
                for seq, piece in enumerate(pieces):
                    if not state.present.is_set() and not reply.stop.is_set():
                        log.info("session %s: paused before piece %d of %d", msg.session_id, seq, len(pieces))
                        await _first(state.present.wait(), reply.stop.wait())
                    if reply.stop.is_set():
                        break
                    await send(msg.session_id, {"type": "chunk", "reply_to": reply_to, "seq": seq, "text": piece})
                    sent += 1
                    # The pause between pieces, cut short by a stop.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(reply.stop.wait(), self.delay)
                # Published here, by the reply's own task, after its last
                # piece: no piece can follow the marker.
                if reply.stop.is_set():
                    log.info("session %s: reply %s stopped after %d of %d pieces", msg.session_id, reply_to, sent, len(pieces))
                    await send(msg.session_id, {"type": "stopped", "reply_to": reply_to, "pieces": len(pieces), "sent": sent})
                else:
                    await send(msg.session_id, {"type": "done", "reply_to": reply_to, "pieces": len(pieces)})
            finally:
                state.current = None

    def stop(self, session_id: str, reply_to: str | None = None) -> bool:
        """Asks the session's reply in progress to stop (only if it is
        ``reply_to``, when given). True if a reply was told to stop; a
        session with no reply under way, a reply already stopping or
        another reply named: False, and nothing is sent."""
        state = self.sessions.get(session_id)
        reply = state.current if state is not None else None
        if reply is None or reply.stop.is_set() or (reply_to is not None and reply_to != reply.reply_to):
            log.info("session %s: stop with no such reply under way (%s): ignored", session_id, reply_to)
            return False
        reply.stop.set()
        return True


async def _first(*aws: Any) -> None:
    """Waits for the first of ``aws`` and cancels the others."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()


def agent_from_env(wsproxy: Wsproxy) -> Agent:
    return Agent(
        wsproxy,
        delay=int(os.environ.get("REPLY_DELAY_MS", "80")) / 1000,
        words=int(os.environ.get("REPLY_WORDS", "40")),
        events=os.environ.get("FOLLOW_EVENTS", "true").lower() not in ("0", "false", "no", "off"),
    )


async def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    wsproxy = Wsproxy.from_url(
        os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"),
        up_shards=int(os.environ.get("UP_STREAM_SHARDS", "1")),
        decode_responses=True,
    )
    async with wsproxy:
        await agent_from_env(wsproxy).run()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
