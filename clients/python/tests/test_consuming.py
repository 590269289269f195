"""Consuming client messages: plain (pub/sub) and reliable (streams, consumer groups)."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
import redis.asyncio as aioredis
from conftest import UP_SHARDS
from support import AGENT, client, send_reliable, welcome

from wsproxy_backend import ClientMessage, Wsproxy
from wsproxy_backend.keys import up_shard, up_stream


async def collect(consumer, n: int, timeout: float = 5.0) -> list:
    """The first ``n`` items ``consumer.read`` gives, within ``timeout``."""
    out: list = []
    async with asyncio.timeout(timeout):
        while len(out) < n:
            out += await consumer.read(block_ms=200)
    return out


async def test_plain_messages_of_one_session(wsproxy: Wsproxy, wsproxy_server, sid):
    token = await wsproxy.issue_token(sid)
    other = "s-" + uuid.uuid4().hex
    other_token = await wsproxy.issue_token(other)
    async with wsproxy.plain_client_messages(sid) as messages:
        async with client(wsproxy_server.ws, sid, token) as ws, client(wsproxy_server.ws, other, other_token) as ws2:
            await ws2.send('{"not":"mine"}')
            for i in range(3):
                await ws.send(json.dumps({"i": i}))
            got = [await messages.get(timeout=5) for _ in range(3)]
    assert [m.data for m in got] == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert all(m.session_id == sid and not m.reliable and m.entry_id is None for m in got)
    assert got[0].raw == '{"i": 0}'


async def test_plain_messages_of_every_session(wsproxy: Wsproxy, wsproxy_server):
    sessions = ["s-" + uuid.uuid4().hex for _ in range(3)]
    async with wsproxy.plain_client_messages() as messages:
        for s in sessions:
            token = await wsproxy.issue_token(s)
            async with client(wsproxy_server.ws, s, token) as ws:
                await ws.send(json.dumps({"from": s}))
                msg = await messages.get(timeout=5)
                while msg is not None and msg.session_id not in sessions:  # other tests' traffic
                    msg = await messages.get(timeout=5)
                assert msg is not None and msg.session_id == s and msg.data == {"from": s}
        assert await messages.get(timeout=0.2) is None


async def test_plain_messages_iterate(wsproxy: Wsproxy, wsproxy_server, sid):
    token = await wsproxy.issue_token(sid)
    async with wsproxy.plain_client_messages(sid) as messages:
        async with client(wsproxy_server.ws, sid, token) as ws:
            for i in range(3):
                await ws.send(json.dumps(i))
            seen = []
            async with asyncio.timeout(5):
                async for m in messages:
                    seen.append(m.data)
                    if len(seen) == 3:
                        break
    assert seen == [0, 1, 2]


async def test_reliable_messages_with_fields_and_ack(wsproxy: Wsproxy, wsproxy_server, redis, sid, group):
    token = await wsproxy.issue_token(sid)
    async with wsproxy.client_messages(group, "w1") as messages:
        async with client(wsproxy_server.ws, sid, token, reliable=True) as ws:
            await welcome(ws)
            acks = [await send_reliable(ws, f"m-{i}", {"i": i}) for i in range(3)]
        got = await collect(messages, 3)
        assert [m.data for m in got] == [{"i": 0}, {"i": 1}, {"i": 2}]
        m = got[0]
        assert m.reliable and not m.redelivered
        assert (m.session_id, m.agent_id, m.message_id) == (sid, AGENT, "m-0")
        # The library reads the stream wsproxy chose: the shards agree.
        assert m.stream == up_stream(up_shard(sid, UP_SHARDS)) == up_stream(wsproxy.up_shard(sid))
        assert [x.entry_id for x in got] == [a["offset"] for a in acks]
        assert (await redis.xpending(m.stream, group))["pending"] == 3
        assert await messages.ack(*got) == 3
        assert (await redis.xpending(m.stream, group))["pending"] == 0
        assert await messages.read(block_ms=100) == []


async def test_every_shard_is_read(wsproxy: Wsproxy, wsproxy_server, group):
    # Sessions until each of the shards has one.
    by_shard: dict[int, str] = {}
    while len(by_shard) < UP_SHARDS:
        s = "s-" + uuid.uuid4().hex
        by_shard.setdefault(wsproxy.up_shard(s), s)
    async with wsproxy.client_messages(group, "w1") as messages:
        for s in by_shard.values():
            token = await wsproxy.issue_token(s)
            async with client(wsproxy_server.ws, s, token, reliable=True) as ws:
                await welcome(ws)
                await send_reliable(ws, "only", {"s": s})
        got = await collect(messages, UP_SHARDS)
        assert {m.session_id for m in got} == set(by_shard.values())
        assert {m.stream for m in got} == {up_stream(n) for n in range(UP_SHARDS)}
        await messages.ack(*got)


async def test_a_group_shares_messages_between_consumers(wsproxy: Wsproxy, wsproxy_server, sid, group):
    token = await wsproxy.issue_token(sid)
    a = wsproxy.client_messages(group, "a", count=2)
    b = wsproxy.client_messages(group, "b", count=2)
    await a.ensure_group()
    async with client(wsproxy_server.ws, sid, token, reliable=True) as ws:
        await welcome(ws)
        for i in range(6):
            await send_reliable(ws, f"m-{i}", i)
    got_a = await a.read(block_ms=500)
    got_b = await b.read(block_ms=500)
    got_a += await a.read(block_ms=500)
    got_b += await b.read(block_ms=500)
    assert len(got_a) == 4 and len(got_b) == 2
    assert sorted(m.data for m in got_a + got_b) == list(range(6))
    await a.ack(*got_a)
    await b.ack(*got_b)


async def test_a_resent_message_is_consumed_once(wsproxy: Wsproxy, wsproxy_server, sid, group):
    token = await wsproxy.issue_token(sid)
    async with wsproxy.client_messages(group, "w1") as messages:
        async with client(wsproxy_server.ws, sid, token, reliable=True) as ws:
            await welcome(ws)
            first = await send_reliable(ws, "same-id", {"x": 1})
        async with client(wsproxy_server.ws, sid, token, reliable=True) as ws:
            await welcome(ws)
            again = await send_reliable(ws, "same-id", {"x": 1})
        assert again["duplicate"] is True and again["offset"] == first["offset"]
        got = await collect(messages, 1)
        assert await messages.read(block_ms=300) == []
        assert got[0].message_id == "same-id"
        await messages.ack(*got)


async def test_a_dead_workers_messages_are_claimed(wsproxy: Wsproxy, wsproxy_server, redis, sid, group):
    token = await wsproxy.issue_token(sid)
    dead = wsproxy.client_messages(group, "dead")
    await dead.ensure_group()
    async with client(wsproxy_server.ws, sid, token, reliable=True) as ws:
        await welcome(ws)
        for i in range(3):
            await send_reliable(ws, f"m-{i}", i)
    held = await collect(dead, 3)  # read, never acknowledged: the worker "dies"
    alive = wsproxy.client_messages(group, "alive", claim_idle_ms=1000)
    assert await alive.claim() == []  # not idle long enough yet
    await asyncio.sleep(1.1)
    claimed = await alive.claim()
    assert [m.entry_id for m in claimed] == [m.entry_id for m in held]
    assert all(m.redelivered for m in claimed)
    assert await alive.claim(min_idle_ms=0) == []  # its own, not handed out twice
    await alive.ack(*claimed)
    assert (await redis.xpending(held[0].stream, group))["pending"] == 0


async def test_iteration_gives_own_pending_then_new_then_claimed(wsproxy: Wsproxy, wsproxy_server, sid, group):
    token = await wsproxy.issue_token(sid)
    w1 = wsproxy.client_messages(group, "w1")
    await w1.ensure_group()
    async with client(wsproxy_server.ws, sid, token, reliable=True) as ws:
        await welcome(ws)
        await send_reliable(ws, "before-restart", "a")
        unacked = await collect(w1, 1)
        # w1 "restarts": a new consumer object with the same name gets its pending entry first.
        w1_again = wsproxy.client_messages(group, "w1", claim_idle_ms=1000, claim_interval=0.3, block_ms=100)
        # Another consumer takes an entry and dies with it.
        await send_reliable(ws, "taken-by-dead", "b")
        dead_held = await collect(wsproxy.client_messages(group, "dead"), 1)
        await send_reliable(ws, "new", "c")
        seen: list[ClientMessage] = []
        async with asyncio.timeout(5):
            async for m in w1_again:
                seen.append(m)
                await w1_again.ack(m)
                if len(seen) == 3:
                    break
    assert [m.message_id for m in seen] == ["before-restart", "new", "taken-by-dead"]
    assert [m.redelivered for m in seen] == [True, False, True]
    assert seen[0].entry_id == unacked[0].entry_id and seen[2].entry_id == dead_held[0].entry_id


async def test_the_group_comes_back_after_it_is_lost(wsproxy: Wsproxy, wsproxy_server, redis, sid, group):
    token = await wsproxy.issue_token(sid)
    messages = wsproxy.client_messages(group, "w1")
    await messages.ensure_group()
    stream = up_stream(wsproxy.up_shard(sid))
    # As after a Redis restart without persistence: the stream and its
    # group are gone, and wsproxy adds to a new stream before the worker
    # reads again.
    await redis.delete(stream)
    async with client(wsproxy_server.ws, sid, token, reliable=True) as ws:
        await welcome(ws)
        await send_reliable(ws, "while-gone", 1)
        # NOGROUP: made again at "0", so what came meanwhile is read, not skipped.
        got = await collect(messages, 1)
        assert [m.message_id for m in got] == ["while-gone"]
        await messages.ack(*got)
        await send_reliable(ws, "after", 2)
    got = await collect(messages, 1)
    assert [m.message_id for m in got] == ["after"]
    await messages.ack(*got)
    assert (await redis.xpending(stream, group))["pending"] == 0


async def test_malformed_entries_are_acknowledged_and_skipped(wsproxy: Wsproxy, redis, group):
    stream = up_stream(0)
    messages = wsproxy.client_messages(group, "w1")
    await messages.ensure_group()
    await redis.xadd(stream, {"junk": "1"})
    await redis.xadd(stream, {"session": "s-x", "agent": "a", "id": "i", "data": "[1]"})
    got = await collect(messages, 1)
    assert [m.data for m in got] == [[1]]
    await messages.ack(*got)
    assert (await redis.xpending(stream, group))["pending"] == 0


async def test_a_client_without_decode_responses_works_too(redis_server, wsproxy_server, sid, group):
    import redis.asyncio as aioredis

    raw = aioredis.Redis.from_url(redis_server.url)  # replies are bytes
    try:
        w = Wsproxy(raw, up_shards=UP_SHARDS)
        token = await w.issue_token(sid)
        async with w.client_messages(group, "w1") as messages, w.plain_client_messages(sid) as plain:
            async with client(wsproxy_server.ws, sid, token, reliable=True) as ws:
                await welcome(ws)
                offset = await w.send_reliable(sid, {"n": 1})
                assert isinstance(offset, str)
                await send_reliable(ws, "m", {"k": "v"})
            async with client(wsproxy_server.ws, sid, token) as ws:
                await ws.send('{"plain":true}')
                p = await plain.get(timeout=5)
            got = await collect(messages, 1)
        assert (got[0].session_id, got[0].message_id, got[0].data) == (sid, "m", {"k": "v"})
        assert p is not None and p.data == {"plain": True} and p.session_id == sid
        await messages.ack(*got)
        await raw.hset(f"session:{sid}:presence", "p:1", '{"process":"p","since":5}')
        assert [(e.connection_id, e.process, e.since) for e in await w.presence(sid)] == [("p:1", "p", 5)]
    finally:
        await raw.aclose()


async def test_blocking_reads_stay_under_the_socket_timeout(redis_server, wsproxy_server, sid, group):
    """redis-py gives connections a read timeout (5 s by default): a longer
    BLOCK must not turn into a TimeoutError that ends the worker."""
    import time

    import redis.asyncio as aioredis

    short = aioredis.Redis.from_url(redis_server.url, decode_responses=True, socket_timeout=1.0)
    try:
        w = Wsproxy(short, up_shards=UP_SHARDS)
        async with w.client_messages(group, "w1", block_ms=10_000) as messages:
            t = time.monotonic()
            assert await messages.read() == []  # no TimeoutError
            assert time.monotonic() - t < 5  # nowhere near the 10 s asked for
            got: list[ClientMessage] = []

            async def consume() -> None:
                async for m in messages:  # several empty reads before the message
                    got.append(m)
                    await messages.ack(m)
                    return

            task = asyncio.create_task(consume())
            await asyncio.sleep(2.5)  # longer than the socket timeout
            assert not task.done()
            token = await w.issue_token(sid)
            async with client(wsproxy_server.ws, sid, token, reliable=True) as ws:
                await welcome(ws)
                await send_reliable(ws, "late", 1)
            await asyncio.wait_for(task, 5)
        assert [m.message_id for m in got] == ["late"]
    finally:
        await short.aclose()


async def test_what_a_timed_out_read_was_given_is_read_again(wsproxy: Wsproxy, redis, group, monkeypatch):
    """If the client gives up on a read Redis has answered, the entries are in
    the consumer's pending list; the next read returns them."""
    from redis.exceptions import TimeoutError as RedisTimeoutError

    stream = up_stream(0)
    messages = wsproxy.client_messages(group, "w1")
    await messages.ensure_group()
    await redis.xadd(stream, {"session": "s-t", "agent": "a", "id": "lost-reply", "data": "1"})
    real = redis.xreadgroup
    calls = 0

    async def flaky(*args, **kwargs):
        nonlocal calls
        calls += 1
        reply = await real(*args, **kwargs)
        if calls == 1:
            raise RedisTimeoutError("Timeout reading from socket")  # the reply is lost
        return reply

    monkeypatch.setattr(redis, "xreadgroup", flaky)
    assert await messages.read(block_ms=100) == []
    got = await messages.read(block_ms=100)
    assert [(m.message_id, m.redelivered) for m in got] == [("lost-reply", True)]
    await messages.ack(*got)


async def test_what_a_left_iteration_did_not_acknowledge_is_handed_out_again(wsproxy: Wsproxy, redis, group):
    """A handler that raises (or a loop left with ``break``) leaves its entry
    unacknowledged: iterating the same consumer object again gives it again."""
    stream = up_stream(0)
    messages = wsproxy.client_messages(group, "w1", block_ms=100)
    await messages.ensure_group()
    await redis.xadd(stream, {"session": "s-f", "agent": "a", "id": "fails-once", "data": "1"})
    await redis.xadd(stream, {"session": "s-f", "agent": "a", "id": "same-batch", "data": "2"})

    class HandlerFailed(Exception):
        pass

    try:
        async with asyncio.timeout(5):
            async for m in messages:
                raise HandlerFailed(m.message_id)
    except HandlerFailed as e:
        assert str(e) == "fails-once"
    seen: list[ClientMessage] = []
    async with asyncio.timeout(5):
        async for m in messages:
            seen.append(m)
            break  # left again, nothing acknowledged
    async with asyncio.timeout(5):
        async for m in messages:
            seen.append(m)
            await messages.ack(m)
            if len(seen) == 3:
                break
    assert [(m.message_id, m.redelivered) for m in seen] == [
        ("fails-once", True),
        ("fails-once", True),
        ("same-batch", True),
    ]
    assert (await redis.xpending(stream, group))["pending"] == 0


async def test_a_live_consumers_unacknowledged_entry_goes_to_another_once_idle(wsproxy: Wsproxy, redis, group):
    """The holder's own claims must not keep resetting the idle time of what it
    handed out and never acknowledged (a hung handler): another consumer
    claims it after claim_idle_ms."""
    stream = up_stream(0)
    holder = wsproxy.client_messages(group, "holder", claim_idle_ms=300)
    other = wsproxy.client_messages(group, "other", claim_idle_ms=300)
    await holder.ensure_group()
    await redis.xadd(stream, {"session": "s-h", "agent": "a", "id": "held", "data": "1"})
    held = await collect(holder, 1)  # handed out, never acknowledged
    for _ in range(3):
        await asyncio.sleep(0.35)
        assert await holder.claim() == []  # not handed out twice by the holder
    claimed = await other.claim()
    assert [(m.entry_id, m.redelivered) for m in claimed] == [(held[0].entry_id, True)]
    await other.ack(*claimed)
    assert (await redis.xpending(stream, group))["pending"] == 0


@pytest.mark.parametrize("idle", [0, -1])
@pytest.mark.parametrize("kind", ["client_messages", "events"])
def test_claim_idle_ms_must_be_positive(kind: str, idle: int):
    """0 (or less) would have every claim() take what live consumers are handling."""
    wsproxy = Wsproxy(aioredis.Redis())
    with pytest.raises(ValueError, match="claim_idle_ms"):
        getattr(wsproxy, kind)("g", "c", claim_idle_ms=idle)
    # None turns claiming off; 1 ms is the shortest accepted.
    assert getattr(wsproxy, kind)("g", "c", claim_idle_ms=None).claim_idle_ms is None
    assert getattr(wsproxy, kind)("g", "c", claim_idle_ms=1).claim_idle_ms == 1
