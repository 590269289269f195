"""Issuing tokens and sending to sessions, checked through a real wsproxy."""

from __future__ import annotations

import asyncio

import pytest
from support import client, recv_json, welcome
from websockets.exceptions import InvalidStatus

import wsproxy_backend.client as wsproxy_client
from wsproxy_backend import Wsproxy, WsproxyError


async def test_issued_token_lets_the_client_in_and_has_the_ttl(wsproxy: Wsproxy, wsproxy_server, redis, sid):
    token = await wsproxy.issue_token(sid, ttl=30)
    assert len(token) >= 43 and token.replace("-", "").replace("_", "").isalnum()
    assert await redis.get(f"session:{sid}:auth") == token
    assert 0 < await redis.ttl(f"session:{sid}:auth") <= 30
    async with client(wsproxy_server.ws, sid, token) as ws:
        await ws.ping()
    # wsproxy extended it to the grace period on connect.
    assert await redis.ttl(f"session:{sid}:auth") > 30


async def test_tokens_are_random_and_can_be_chosen(wsproxy: Wsproxy, wsproxy_server, redis, sid):
    a, b = await wsproxy.issue_token(sid), await wsproxy.issue_token(sid)
    assert a != b
    assert await redis.get(f"session:{sid}:auth") == b  # issuing again replaces
    assert await wsproxy.issue_token(sid, token="chosen-token") == "chosen-token"
    async with client(wsproxy_server.ws, sid, "chosen-token") as ws:
        await ws.ping()


async def test_wrong_and_revoked_tokens_are_refused(wsproxy: Wsproxy, wsproxy_server, sid):
    token = await wsproxy.issue_token(sid)
    with pytest.raises(InvalidStatus) as e:
        async with client(wsproxy_server.ws, sid, token + "x"):
            pass
    assert e.value.response.status_code == 403
    assert await wsproxy.revoke_token(sid) is True
    assert await wsproxy.revoke_token(sid) is False
    with pytest.raises(InvalidStatus) as e:
        async with client(wsproxy_server.ws, sid, token):
            pass
    assert e.value.response.status_code == 403


@pytest.mark.parametrize("bad", ["a:b", "", "x" * 129, "sp ace", "star*", "{tag}"])
async def test_bad_session_ids_never_reach_redis(wsproxy: Wsproxy, bad: str):
    with pytest.raises(ValueError):
        await wsproxy.issue_token(bad)
    with pytest.raises(ValueError):
        await wsproxy.send(bad, {})
    with pytest.raises(ValueError):
        await wsproxy.send_reliable(bad, {})


async def test_bad_token_arguments(wsproxy: Wsproxy, sid):
    with pytest.raises(ValueError):
        await wsproxy.issue_token(sid, ttl=0)
    with pytest.raises(ValueError):
        await wsproxy.issue_token(sid, token="has space")


async def test_send_plain_reaches_every_connection_in_order(wsproxy: Wsproxy, wsproxy_server, sid):
    token = await wsproxy.issue_token(sid)
    async with client(wsproxy_server.ws, sid, token) as a, client(wsproxy_server.ws, sid, token) as b:
        for i in range(5):
            assert await wsproxy.send(sid, {"n": i, "text": "é"}) == 1  # one wsproxy process
        for ws in (a, b):
            assert [await recv_json(ws) for _ in range(5)] == [{"n": i, "text": "é"} for i in range(5)]
    # Nobody listens any more, once wsproxy has unsubscribed (it does so after the close).
    async with asyncio.timeout(5):
        while await wsproxy.send(sid, {"n": 99}) != 0:
            await asyncio.sleep(0.05)


async def test_send_raw_text_and_bytes(wsproxy: Wsproxy, wsproxy_server, sid):
    token = await wsproxy.issue_token(sid)
    async with client(wsproxy_server.ws, sid, token) as ws:
        await wsproxy.send_raw(sid, '{"already":"json"}')
        await wsproxy.send_raw(sid, b"\xff\x00binary")
        async with asyncio.timeout(5):
            assert await ws.recv() == '{"already":"json"}'
            assert await ws.recv() == b"\xff\x00binary"


async def test_send_reliable_returns_the_offset_clients_get(wsproxy: Wsproxy, wsproxy_server, sid):
    token = await wsproxy.issue_token(sid)
    async with client(wsproxy_server.ws, sid, token, reliable=True) as rel, client(wsproxy_server.ws, sid, token) as plain:
        w = await welcome(rel)
        offsets = [await wsproxy.send_reliable(sid, {"n": i}) for i in range(3)]
        assert all(isinstance(o, str) and "-" in o for o in offsets)
        got = [await recv_json(rel) for _ in range(3)]
        assert got == [{"type": "message", "offset": o, "data": {"n": i}} for i, o in enumerate(offsets)]
        assert [await recv_json(plain) for _ in range(3)] == [{"n": i} for i in range(3)]
    # A reliable client that comes back resumes from its last offset.
    await wsproxy.send_reliable(sid, {"n": 3})
    async with client(wsproxy_server.ws, sid, token, reliable=True, epoch=w["epoch"], offset=offsets[0]) as rel:
        w2 = await welcome(rel)
        assert w2["resumed"] is True and w2["replayed"] == 3
        assert [(await recv_json(rel))["data"]["n"] for _ in range(3)] == [1, 2, 3]


async def test_send_reliable_refuses_what_is_not_json(wsproxy: Wsproxy, sid):
    with pytest.raises(WsproxyError, match="JSON"):
        await wsproxy.send_reliable_raw(sid, "not json")
    with pytest.raises(ValueError):  # NaN is not JSON either; refused before Redis
        await wsproxy.send_reliable(sid, float("nan"))


async def test_send_reliable_without_the_function_says_why(workdir, sid):
    """On a Redis no wsproxy with reliable sessions has started on, the error names the fix."""
    import redis.asyncio as aioredis
    from conftest import RedisServer, free_port, start_redis

    bare: RedisServer = start_redis(workdir, free_port())
    r = aioredis.Redis.from_url(bare.url, decode_responses=True)
    try:
        with pytest.raises(WsproxyError, match="RELIABLE_SESSIONS=true"):
            await Wsproxy(r).send_reliable(sid, {"n": 1})
    finally:
        await r.aclose()
        bare.stop()


async def test_send_reliable_many_is_many_send_reliable_in_one_call(wsproxy: Wsproxy, wsproxy_server, redis, sid):
    token = await wsproxy.issue_token(sid)
    async with client(wsproxy_server.ws, sid, token, reliable=True) as rel:
        await welcome(rel)
        offsets = await wsproxy.send_reliable_many(sid, [{"n": i} for i in range(5)])
        got = [await recv_json(rel) for _ in range(5)]
        assert got == [{"type": "message", "offset": o, "data": {"n": i}} for i, o in enumerate(offsets)]
        # All or nothing, and the error names the message.
        with pytest.raises(WsproxyError, match="message 2: the message must be JSON"):
            await wsproxy.send_reliable_many_raw(sid, ['{"n":5}', "not json", '{"n":7}'])
        assert await redis.xlen(f"session:{sid}:history") == 5
        with pytest.raises(ValueError):
            await wsproxy.send_reliable_many(sid, [])


async def test_a_reliable_stream_batches_what_comes_faster_than_redis_answers(wsproxy: Wsproxy, wsproxy_server, sid):
    token = await wsproxy.issue_token(sid)
    async with client(wsproxy_server.ws, sid, token, reliable=True) as rel:
        await welcome(rel)
        async with wsproxy.reliable_stream(sid) as stream:
            futures = [stream.send({"n": i}) for i in range(300)]
        offsets = [f.result() for f in futures]
        # 300 sent without waiting: far fewer calls than messages.
        assert stream.stored == 300 and stream.calls < 10, (stream.calls, stream.stored)
        got = [await recv_json(rel) for _ in range(300)]
        assert [m["data"]["n"] for m in got] == list(range(300))
        assert [m["offset"] for m in got] == offsets
        # One at a time when each is awaited: nothing waits for a batch to fill.
        async with wsproxy.reliable_stream(sid) as stream:
            for i in range(3):
                assert await stream.send({"n": 300 + i})
        assert stream.calls == 3
        assert [(await recv_json(rel))["data"]["n"] for _ in range(3)] == [300, 301, 302]
        # A failed call ends the stream: its messages, those queued behind it
        # and every later send fail, so the reply has no gap a client cannot see.
        stream = wsproxy.reliable_stream(sid, max_batch=2)
        before = stream.send({"n": 303})
        await before
        bad = stream.send_raw("not json")
        good = stream.send({"n": 304})
        later = stream.send({"n": 305})  # queued behind the failing call
        with pytest.raises(WsproxyError, match="must be JSON"):
            await stream.flush()
        assert bad.exception() is not None and good.exception() is not None
        assert isinstance(later.exception(), WsproxyError)
        assert stream.error is bad.exception()
        with pytest.raises(WsproxyError, match="must be JSON"):
            stream.send({"n": 306})
        with pytest.raises(WsproxyError, match="must be JSON"):
            await stream.flush()  # still: the stream has ended
        assert stream.stored == 1
        assert (await recv_json(rel))["data"]["n"] == 303
        with pytest.raises(TimeoutError):
            await recv_json(rel, timeout=0.5)  # nothing after the failure was published


async def test_a_reliable_stream_falls_back_to_one_publish_a_message_on_an_older_library(
    wsproxy: Wsproxy, wsproxy_server, redis, sid
):
    """During a rolling upgrade an older wsproxy may have loaded its library (no batch function) last."""
    lib = await redis.function_list(library="wsproxy", withcode=True)
    entry = dict(zip(lib[0][::2], lib[0][1::2], strict=True))
    code = entry["library_code"]
    older = code.replace("register_function('wsproxy_publish_batch'", "register_function('not_wsproxy_publish_batch'")
    assert older != code
    token = await wsproxy.issue_token(sid)
    try:
        await redis.function_load(older, replace=True)
        fresh = Wsproxy(wsproxy.redis)
        async with client(wsproxy_server.ws, sid, token, reliable=True) as rel:
            await welcome(rel)
            offsets = await fresh.send_reliable_many(sid, [{"n": 1}, {"n": 2}])
            assert [await recv_json(rel) for _ in range(2)] == [
                {"type": "message", "offset": o, "data": {"n": n}} for n, o in zip([1, 2], offsets, strict=True)
            ]
    finally:
        await redis.function_load(code, replace=True)


async def test_the_fallback_for_an_older_library_is_all_or_nothing(
    wsproxy: Wsproxy, wsproxy_server, redis, sid, monkeypatch
):
    """Without wsproxy_publish_batch, a batch with one unfit message publishes none of it, as the batch function."""
    lib = await redis.function_list(library="wsproxy", withcode=True)
    entry = dict(zip(lib[0][::2], lib[0][1::2], strict=True))
    code = entry["library_code"]
    older = code.replace("register_function('wsproxy_publish_batch'", "register_function('not_wsproxy_publish_batch'")
    history = f"session:{sid}:history"
    token = await wsproxy.issue_token(sid)
    try:
        await redis.function_load(older, replace=True)
        fresh = Wsproxy(wsproxy.redis)
        async with client(wsproxy_server.ws, sid, token, reliable=True) as rel:
            await welcome(rel)
            # Each unfit kind the library refuses, as the last of three: the first two stay unpublished.
            too_deep = "[" * 1001 + "]" * 1001  # cjson nests 1000 levels, Python's json fewer
            for bad in ["not json", '{"n":NaN}', '"\x01"', '"\\ud800"', "\ud800", too_deep]:
                with pytest.raises(WsproxyError, match=r"message 3: .*\(nothing was published\)"):
                    await fresh.send_reliable_many_raw(sid, ['{"n":1}', '{"n":2}', bad])
            assert fresh._batch_missing
            assert await redis.xlen(history) == 0
            with pytest.raises(TimeoutError):
                await recv_json(rel, timeout=0.5)
            # What the library takes goes out in order, in one transaction.
            deep = "[" * 1000 + "]" * 1000
            offsets = await fresh.send_reliable_many_raw(sid, ['{"n":1}', '{"t":"é\\n"}', deep])
            assert [await recv_json(rel) for _ in range(2)] == [
                {"type": "message", "offset": o, "data": d} for d, o in zip([{"n": 1}, {"t": "é\n"}], offsets[:2], strict=True)
            ]
            # (Too deep for the test's own json.loads: read from the history.)
            assert [(i, f["d"]) for i, f in await redis.xrange(history)][2] == (offsets[2], deep)
            # EXEC undoes nothing: a message the check passes and the library
            # refuses (none is known; simulated) leaves the others published,
            # and the error says which.
            monkeypatch.setattr(wsproxy_client, "_unfit", lambda payload: None)
            with pytest.raises(WsproxyError, match=r"must be JSON \(message 2\); published nevertheless: 1: \S+, 3: \S+$"):
                await fresh.send_reliable_many_raw(sid, ['{"n":4}', "not json", '{"n":5}'])
            assert await redis.xlen(history) == 5
    finally:
        await redis.function_load(code, replace=True)
