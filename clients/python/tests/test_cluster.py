"""The library on a Redis Cluster: a private 3+3 cluster and a wsproxy with
``REDIS_CLUSTER_NODES`` and sharded pub/sub (``SPUBLISH``/``SSUBSCRIBE``),
checked through real WebSockets."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from conftest import CLUSTER_UP_SHARDS
from redis.asyncio.cluster import RedisCluster
from support import AGENT, client, recv_json, send_reliable, welcome
from websockets.exceptions import ConnectionClosed, InvalidStatus

from wsproxy_backend import Wsproxy
from wsproxy_backend.keys import CLUSTER, up_shard


def new_sid() -> str:
    return "s-" + uuid.uuid4().hex


async def test_a_cluster_client_uses_tagged_names_and_sharded_pubsub(cluster_wsproxy: Wsproxy):
    assert isinstance(cluster_wsproxy.redis, RedisCluster)
    assert cluster_wsproxy.cluster == "sharded" and cluster_wsproxy.sharded
    assert cluster_wsproxy.names.auth_key("s1") == "session:{s1}:auth"
    assert cluster_wsproxy.names.up_streams(2) == ["wsproxy:up:{0}", "wsproxy:up:{1}"]


async def test_issued_token_lets_the_client_in(cluster_wsproxy: Wsproxy, cluster_wsproxy_server):
    sid = new_sid()
    token = await cluster_wsproxy.issue_token(sid, ttl=30)
    redis = cluster_wsproxy.redis
    assert await redis.get(f"session:{{{sid}}}:auth") == token
    async with client(cluster_wsproxy_server.ws, sid, token) as ws:
        await ws.ping()
    assert await redis.ttl(f"session:{{{sid}}}:auth") > 30  # the grace period, set on connect
    assert await cluster_wsproxy.revoke_token(sid) is True
    with pytest.raises(InvalidStatus) as e:
        async with client(cluster_wsproxy_server.ws, sid, token):
            pass
    assert e.value.response.status_code == 403


async def test_send_spublishes_to_the_session(cluster_wsproxy: Wsproxy, cluster_wsproxy_server):
    # Several sessions, so more than one shard is involved.
    sessions = [new_sid() for _ in range(4)]
    tokens = [await cluster_wsproxy.issue_token(s) for s in sessions]
    for sid, token in zip(sessions, tokens):
        async with client(cluster_wsproxy_server.ws, sid, token) as ws:
            for i in range(3):
                assert await cluster_wsproxy.send(sid, {"n": i, "s": sid}) == 1
            await cluster_wsproxy.send_raw(sid, b"\xffbin")
            assert [await recv_json(ws) for _ in range(3)] == [{"n": i, "s": sid} for i in range(3)]
            async with asyncio.timeout(5):
                assert await ws.recv() == b"\xffbin"


async def test_plain_client_messages_are_ssubscribed(cluster_wsproxy: Wsproxy, cluster_wsproxy_server):
    sessions = [new_sid() for _ in range(3)]
    tokens = [await cluster_wsproxy.issue_token(s) for s in sessions]
    async with cluster_wsproxy.plain_client_messages(*sessions) as messages:
        for sid, token in zip(sessions, tokens):
            async with client(cluster_wsproxy_server.ws, sid, token) as ws:
                for i in range(2):
                    await ws.send(json.dumps({"from": sid, "i": i}))
                got = [await messages.get(timeout=5) for _ in range(2)]
            assert [(m.session_id, m.data) for m in got if m] == [(sid, {"from": sid, "i": i}) for i in range(2)]
        assert await messages.get(timeout=0.2) is None
    with pytest.raises(ValueError, match="no patterns"):
        cluster_wsproxy.plain_client_messages()


async def test_send_reliable_and_resume(cluster_wsproxy: Wsproxy, cluster_wsproxy_server):
    sid = new_sid()
    token = await cluster_wsproxy.issue_token(sid)
    ws_base = cluster_wsproxy_server.ws
    async with client(ws_base, sid, token, reliable=True) as rel, client(ws_base, sid, token) as plain:
        w = await welcome(rel)
        offsets = [await cluster_wsproxy.send_reliable(sid, {"n": i}) for i in range(3)]
        got = [await recv_json(rel) for _ in range(3)]
        assert got == [{"type": "message", "offset": o, "data": {"n": i}} for i, o in enumerate(offsets)]
        assert [await recv_json(plain) for _ in range(3)] == [{"n": i} for i in range(3)]
    assert await cluster_wsproxy.redis.xlen(f"session:{{{sid}}}:history") == 3
    await cluster_wsproxy.send_reliable(sid, {"n": 3})
    async with client(ws_base, sid, token, reliable=True, epoch=w["epoch"], offset=offsets[0]) as rel:
        w2 = await welcome(rel)
        assert w2["resumed"] is True and w2["replayed"] == 3
        assert [(await recv_json(rel))["data"]["n"] for _ in range(3)] == [1, 2, 3]


async def test_reliable_client_messages_from_every_shard(cluster_wsproxy: Wsproxy, cluster_wsproxy_server):
    group = "g-" + uuid.uuid4().hex[:12]
    # A session in each up shard: the consumer reads streams in different slots.
    sessions: dict[int, str] = {}
    while len(sessions) < CLUSTER_UP_SHARDS:
        sid = new_sid()
        sessions.setdefault(up_shard(sid, CLUSTER_UP_SHARDS), sid)
    async with cluster_wsproxy.client_messages(group, "w1", block_ms=500) as messages:
        for shard, sid in sorted(sessions.items()):
            token = await cluster_wsproxy.issue_token(sid)
            async with client(cluster_wsproxy_server.ws, sid, token, reliable=True) as ws:
                await welcome(ws)
                await send_reliable(ws, f"m-{shard}", {"shard": shard})
        got: list = []
        async with asyncio.timeout(10):
            while len(got) < len(sessions):
                got += await messages.read(block_ms=300)
        by_shard = {m.data["shard"]: m for m in got}
        assert sorted(by_shard) == list(range(CLUSTER_UP_SHARDS))
        for shard, m in by_shard.items():
            assert m.stream == CLUSTER.up_stream(shard) == f"wsproxy:up:{{{shard}}}"
            assert (m.session_id, m.agent_id, m.message_id) == (sessions[shard], AGENT, f"m-{shard}")
        assert await messages.ack(*got) == len(got)
        assert await messages.pending() == []


async def test_disconnect_closes_the_session_and_revokes_its_token(cluster_wsproxy: Wsproxy, cluster_wsproxy_server):
    sid = new_sid()
    token = await cluster_wsproxy.issue_token(sid)
    async with client(cluster_wsproxy_server.ws, sid, token) as ws, client(
        cluster_wsproxy_server.ws, sid, token, reliable=True
    ) as rel:
        await welcome(rel)
        entry = await cluster_wsproxy.disconnect(sid, code=4001, reason="bye", revoke_token=True)
        # The command went into the control stream's slot (the channel's).
        assert await cluster_wsproxy.redis.xrange("{wsproxy:control}:log", entry, entry)
        for conn in (ws, rel):
            with pytest.raises(ConnectionClosed):
                async with asyncio.timeout(5):
                    while True:
                        await conn.recv()
            assert conn.close_code == 4001 and conn.close_reason == "bye"
    assert await cluster_wsproxy.redis.exists(f"session:{{{sid}}}:auth") == 0


async def test_events_presence_and_session_events_on_a_cluster(cluster_wsproxy: Wsproxy, cluster_wsproxy_server):
    sid = new_sid()
    token = await cluster_wsproxy.issue_token(sid)
    group = f"g-{sid}"
    async with cluster_wsproxy.events(group, "c1", start="$") as events, cluster_wsproxy.session_events(sid) as live:
        async with client(cluster_wsproxy_server.ws, sid, token):
            async with asyncio.timeout(5):
                while await cluster_wsproxy.connection_count(sid) != 1:
                    await asyncio.sleep(0.05)
            [entry] = await cluster_wsproxy.presence(sid)
            assert entry.connection_id.startswith(entry.process)
        seen: list[str] = []
        async with asyncio.timeout(10):
            async for event in events:
                if event.session_id == sid:
                    seen.append(event.type)
                await events.ack(event)
                if seen == ["connect", "disconnect"]:
                    break
        first = await live.get(timeout=5)
        assert first is not None and first.type == "connect" and first.session_id == sid
    assert await cluster_wsproxy.connection_count(sid) == 0


def test_cluster_arguments_are_checked():
    import redis.asyncio as aioredis

    with pytest.raises(ValueError, match="RedisCluster"):
        Wsproxy(aioredis.Redis(), cluster="sharded")
    with pytest.raises(ValueError):
        Wsproxy.from_cluster([])
    with pytest.raises(ValueError, match="redis://"):
        Wsproxy.from_cluster(["http://x:1"])


async def test_classic_pubsub_on_a_cluster(redis_cluster, classic_cluster_wsproxy_server):
    """``cluster="classic"``: PUBLISH, SUBSCRIBE and PSUBSCRIBE (every node hears every message)."""
    server = classic_cluster_wsproxy_server
    first_seed = redis_cluster.seeds.split(",")[0]
    async with Wsproxy.from_url(first_seed, cluster="classic", decode_responses=True) as w:
        assert isinstance(w.redis, RedisCluster) and w.cluster == "classic" and not w.sharded
        sid = new_sid()
        token = await w.issue_token(sid)
        async with w.plain_client_messages() as every, w.plain_client_messages(sid) as one:
            async with client(server.ws, sid, token) as ws, client(server.ws, sid, token, reliable=True) as rel:
                await welcome(rel)
                await w.send(sid, {"n": 1})  # the count is only the publishing node's subscribers
                assert await recv_json(ws) == {"n": 1}
                offset = await w.send_reliable(sid, {"n": 2})
                assert await recv_json(ws) == {"n": 2}
                assert await recv_json(rel) == {"type": "message", "offset": offset, "data": {"n": 2}}
                await ws.send('{"up":1}')
                for sub in (one, every):
                    m = await sub.get(timeout=5)
                    while m is not None and m.session_id != sid:  # other tests' sessions
                        m = await sub.get(timeout=5)
                    assert m is not None and m.data == {"up": 1}
                await w.disconnect(sid, code=4002, revoke_token=True)
                with pytest.raises(ConnectionClosed):
                    async with asyncio.timeout(5):
                        while True:
                            await ws.recv()
                assert ws.close_code == 4002
