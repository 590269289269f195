"""Lifecycle events, presence and control (issue 14's wire formats).

The first group checks the library against the formats themselves, written
into Redis by hand, and passes with any wsproxy. The second checks it
against a wsproxy that has the features; it is skipped when the binary's
``--help`` does not mention ``LIFECYCLE_EVENTS``.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import uuid

import pytest
from conftest import needs_events, needs_presence, start_wsproxy
from support import AGENT, client, recv_json, send_reliable, welcome
from websockets.exceptions import ConnectionClosed, InvalidStatus

from wsproxy_backend import Event, Wsproxy, disconnect_message
from wsproxy_backend.keys import CONTROL_CHANNEL, CONTROL_STREAM, EVENTS_STREAM

CONNECT = {
    "type": "connect", "session_id": "s1", "agent_id": "a1", "connection_id": "p1:1", "process": "p1",
    "time": 1764600000000, "reliable": False, "remote": "127.0.0.1:53422", "user_agent": None,
    "query": {"lang": "fr"},
}
RESUME = {**CONNECT, "type": "resume", "connection_id": "p1:2", "reliable": True, "resumed": False,
          "replayed": 0, "reason": "trimmed"}
DISCONNECT = {
    "type": "disconnect", "session_id": "s1", "agent_id": "a1", "connection_id": "p1:1", "process": "p1",
    "time": 1764600001000, "code": 1006, "reason": "process_lost", "duration_ms": 1000,
    "messages_in": None, "messages_out": None,
}


# ---------------------------------------------------------------------------
# The formats, written by hand: these pass with any wsproxy.


async def test_events_consumer_reads_acks_and_claims_spec_events(redis, group):
    stream = "test:events:" + uuid.uuid4().hex
    w = Wsproxy(redis, events_stream=stream)
    async with w.events(group, "e1") as events:
        for e in (CONNECT, RESUME, DISCONNECT):
            await redis.xadd(stream, {"event": json.dumps(e)})
        await redis.xadd(stream, {"event": "not json"})  # acknowledged and skipped
        got = await events.read(block_ms=500)
        assert [e.type for e in got] == ["connect", "resume", "disconnect"]
        c, r, d = got
        assert (c.session_id, c.agent_id, c.connection_id, c.process, c.time) == ("s1", "a1", "p1:1", "p1", 1764600000000)
        assert c.is_arrival and c.reliable is False and c.user_agent is None and c.query == {"lang": "fr"}
        assert r.resumed is False and r.replayed == 0 and r.reason == "trimmed" and r.is_arrival
        assert d.is_disconnect and d.code == 1006 and d.reason == "process_lost"
        assert d.messages_in is None and d.messages_out is None and d.duration_ms == 1000
        assert d.raw == DISCONNECT and d.stream == stream and d.entry_id
        # Unacknowledged ones go to another consumer once idle.
        await events.ack(c, r)
        other = w.events(group, "e2")
        claimed = await other.claim(min_idle_ms=0)
        assert [e.entry_id for e in claimed] == [d.entry_id] and claimed[0].redelivered
        await other.ack(*claimed)
        assert (await redis.xpending(stream, group))["pending"] == 0


async def test_events_default_to_the_wsproxy_events_stream(wsproxy: Wsproxy):
    assert wsproxy.events("g", "c").streams == [EVENTS_STREAM] == ["wsproxy:events"]


async def test_session_events_channel_gives_events(wsproxy: Wsproxy, redis, sid):
    async with wsproxy.session_events(sid) as events:
        await redis.publish(f"session:{sid}:events", json.dumps({**CONNECT, "session_id": sid}))
        await redis.publish(f"session:{sid}:events", "garbage")
        await redis.publish(f"session:{sid}:events", json.dumps({**DISCONNECT, "session_id": sid}))
        a, b = await events.get(timeout=5), await events.get(timeout=5)
    assert isinstance(a, Event) and (a.type, a.session_id) == ("connect", sid)
    assert b is not None and b.type == "disconnect" and b.entry_id is None


async def test_presence_reads_the_spec_hash(wsproxy: Wsproxy, redis, sid):
    assert await wsproxy.presence(sid) == [] and await wsproxy.connection_count(sid) == 0
    key = f"session:{sid}:presence"
    await redis.hset(key, mapping={
        "p2:9": json.dumps({"connection_id": "p2:9", "process": "p2", "agent_id": "web", "since": 20, "reliable": True}),
        "p1:3": json.dumps({"connection_id": "p1:3", "process": "p1", "agent_id": "cli", "since": 10, "reliable": False}),
        "p3:1": "not json",
    })
    entries = await wsproxy.presence(sid)
    assert [(p.connection_id, p.process, p.agent_id, p.since, p.reliable) for p in entries] == [
        ("p3:1", "p3", "", 0, False),
        ("p1:3", "p1", "cli", 10, False),
        ("p2:9", "p2", "web", 20, True),
    ]
    assert await wsproxy.connection_count(sid) == 3
    await redis.delete(key)


async def test_disconnect_appends_the_command_to_the_control_stream_and_revokes_in_one_transaction(
    wsproxy: Wsproxy, redis, sid
):
    await wsproxy.issue_token(sid)
    async with redis.pubsub() as ps:
        await ps.subscribe(CONTROL_CHANNEL)
        assert (await ps.get_message(timeout=5))["type"] == "subscribe"
        entry = await wsproxy.disconnect(sid, code=4001, reason="revoked", revoke_token=True)
        # The command is in the stream every wsproxy process reads; the
        # channel only carries the entry's id, as a wake-up.
        [(entry_id, fields)] = await redis.xrange(CONTROL_STREAM, entry, entry)
        assert _s(entry_id) == entry
        assert json.loads(fields[b"c"] if b"c" in fields else fields["c"]) == {
            "type": "disconnect", "session_id": sid, "code": 4001, "reason": "revoked",
        }
        msg = await ps.get_message(ignore_subscribe_messages=True, timeout=5)
        assert _s(msg["data"]) == entry
        assert await redis.exists(f"session:{sid}:auth") == 0
        # Without revoking, the token stays; without a code, the command has none.
        await wsproxy.issue_token(sid)
        entry = await wsproxy.disconnect(sid, code=None)
        [(_, fields)] = await redis.xrange(CONTROL_STREAM, entry, entry)
        assert json.loads(fields[b"c"] if b"c" in fields else fields["c"]) == {"type": "disconnect", "session_id": sid}
        assert await redis.exists(f"session:{sid}:auth") == 1


def _s(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


@pytest.mark.parametrize("code", [999, 1001, 1006, 1011, 2999, 5000, True, "4000"])
def test_disconnect_refuses_codes_the_spec_does_not_allow(code):
    with pytest.raises(ValueError):
        disconnect_message("s1", code)  # type: ignore[arg-type]


def test_disconnect_reason_is_at_most_123_bytes():
    assert json.loads(disconnect_message("s1", 1000, "é" * 61 + "x"))["reason"] == "é" * 61 + "x"
    with pytest.raises(ValueError):
        disconnect_message("s1", 1000, "é" * 62)
    for code in (1000, 1008, 3000, 4999):
        assert json.loads(disconnect_message("s1", code))["code"] == code


# ---------------------------------------------------------------------------
# Against a wsproxy with LIFECYCLE_EVENTS, PRESENCE and control.


async def next_event(events, sid: str, timeout: float = 5.0) -> Event:
    """The next event of session ``sid`` (others' are acknowledged and skipped)."""
    async with asyncio.timeout(timeout):
        while True:
            for e in await events.read(block_ms=200, count=1):
                await events.ack(e)
                if e.session_id == sid:
                    return e


@needs_events
async def test_connect_and_disconnect_events(wsproxy: Wsproxy, wsproxy_server, sid, group):
    token = await wsproxy.issue_token(sid)
    async with wsproxy.events(group, "e1") as events:
        async with client(wsproxy_server.ws, sid, token, lang="fr", other="no") as ws:
            connect = await next_event(events, sid)
            await ws.send('{"a":1}')
            await ws.send('{"a":2}')
            await wsproxy.send(sid, {"down": 1})
            await recv_json(ws)
        disconnect = await next_event(events, sid)
    assert connect.type == "connect" and connect.agent_id == AGENT and connect.reliable is False
    assert connect.user_agent == "pytest-wsproxy-backend" and connect.query == {"lang": "fr"}
    assert connect.remote and connect.remote.startswith("127.0.0.1:")
    assert disconnect.type == "disconnect" and disconnect.connection_id == connect.connection_id
    assert disconnect.code == 1000 and disconnect.reason == "client"
    assert disconnect.messages_in == 2 and disconnect.messages_out == 1
    assert disconnect.duration_ms is not None and disconnect.time >= connect.time


@needs_events
async def test_resume_event_and_session_channel(wsproxy: Wsproxy, wsproxy_server, sid, group):
    token = await wsproxy.issue_token(sid)
    async with wsproxy.events(group, "e1") as events, wsproxy.session_events(sid) as channel:
        async with client(wsproxy_server.ws, sid, token, reliable=True) as ws:
            w = await welcome(ws)
        first = await wsproxy.send_reliable(sid, {"n": 1})
        await wsproxy.send_reliable(sid, {"n": 2})
        async with client(wsproxy_server.ws, sid, token, reliable=True, epoch=w["epoch"], offset=first) as ws:
            await welcome(ws)
            await recv_json(ws)
        kinds = [(await next_event(events, sid)).type for _ in range(4)]
        # A fresh reliable connection is a connect; the one that asks to resume, a resume.
        assert kinds[0] == "connect" and sorted(kinds) == ["connect", "disconnect", "disconnect", "resume"]
        published = [await channel.get(timeout=5) for _ in range(4)]
    assert sorted(e.type for e in published if e is not None) == sorted(kinds)
    resume = next(e for e in published if e is not None and e.type == "resume")
    assert resume.reliable is True and resume.session_id == sid
    assert resume.resumed is True and resume.replayed == 1


@needs_presence
async def test_presence_follows_connections(wsproxy: Wsproxy, wsproxy_server, sid):
    token = await wsproxy.issue_token(sid)
    async with client(wsproxy_server.ws, sid, token) as a, client(wsproxy_server.ws, sid, token, reliable=True) as b:
        await welcome(b)
        await a.ping()
        async with asyncio.timeout(5):
            while await wsproxy.connection_count(sid) < 2:
                await asyncio.sleep(0.05)
        entries = await wsproxy.presence(sid)
        assert len(entries) == 2 and await wsproxy.connection_count(sid) == 2
        assert sorted(p.reliable for p in entries) == [False, True]
        assert all(p.agent_id == AGENT and p.since > 0 and p.connection_id.startswith(p.process) for p in entries)
    async with asyncio.timeout(5):
        while await wsproxy.connection_count(sid):
            await asyncio.sleep(0.05)


@needs_events
async def test_disconnect_closes_every_connection_and_revokes(wsproxy: Wsproxy, wsproxy_server, sid, group):
    token = await wsproxy.issue_token(sid)
    async with wsproxy.events(group, "e1") as events:
        async with client(wsproxy_server.ws, sid, token) as plain, client(wsproxy_server.ws, sid, token, reliable=True) as rel:
            await welcome(rel)
            await send_reliable(rel, "m", 1)
            entry = await wsproxy.disconnect(sid, code=4001, reason="revoked", revoke_token=True)
            assert re.fullmatch(r"\d+-\d+", entry), entry
            for ws in (plain, rel):
                with pytest.raises(ConnectionClosed):
                    async with asyncio.timeout(5):
                        while True:
                            await ws.recv()
                assert ws.close_code == 4001 and ws.close_reason == "revoked"
        closes = [e for e in [await next_event(events, sid) for _ in range(4)] if e.is_disconnect]
    assert [e.code for e in closes] == [4001, 4001]
    with pytest.raises(InvalidStatus) as e:
        async with client(wsproxy_server.ws, sid, token):
            pass
    assert e.value.response.status_code == 403


@needs_events
async def test_a_killed_process_connections_get_process_lost(wsproxy: Wsproxy, wsproxy_server, redis_server, workdir, sid, group):
    doomed = start_wsproxy(redis_server, workdir, PROCESS_HEARTBEAT_SECS="1")
    try:
        token = await wsproxy.issue_token(sid)
        async with wsproxy.events(group, "e1") as events:
            ws = await client(doomed.ws, sid, token)
            connect = await next_event(events, sid)
            doomed.stop(signal.SIGKILL)
            lost = await next_event(events, sid, timeout=10)  # two heartbeats silent, checked every one
            await ws.close()
        assert lost.type == "disconnect" and lost.connection_id == connect.connection_id
        assert lost.reason == "process_lost" and lost.code == 1006
        assert lost.messages_in is None and lost.messages_out is None
        async with asyncio.timeout(5):  # the survivor removes the dead process's presence entries
            while await wsproxy.connection_count(sid):
                await asyncio.sleep(0.1)
    finally:
        doomed.stop(signal.SIGKILL)
