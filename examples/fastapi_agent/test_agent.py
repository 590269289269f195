"""The agent against a private Redis, with wsproxy's side played by the test:
client messages are published (plain) or appended (reliable) as wsproxy
does, and lifecycle events are appended to wsproxy:events in the format of
issue 14, so pausing and resuming are tested before wsproxy emits them.

    uv run --group test pytest -q
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from agent import Agent, compose_reply
from wsproxy_backend import Wsproxy


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed")
    port = _free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}"
    proc.terminate()
    proc.wait()


@pytest.fixture
async def agent(redis_url: str) -> AsyncIterator[tuple[Agent, aioredis.Redis]]:
    r = aioredis.Redis.from_url(redis_url, decode_responses=True)
    a = Agent(Wsproxy(r), delay=0.03, words=20, group="g-" + uuid.uuid4().hex, events_group="e-" + uuid.uuid4().hex)
    task = asyncio.create_task(a.run())
    await asyncio.sleep(0.3)  # its groups and subscription are in place
    yield a, r
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await r.aclose()


def event(kind: str, sid: str, conn: str, **extra: object) -> dict[str, str]:
    e = {"type": kind, "session_id": sid, "agent_id": "web", "connection_id": conn, "process": "p", "time": 1, **extra}
    return {"event": json.dumps(e)}


async def next_message(ps, timeout: float = 3.0) -> dict | None:
    msg = await ps.get_message(ignore_subscribe_messages=True, timeout=timeout)
    return None if msg is None else json.loads(msg["data"])


def test_a_reply_ends_at_the_end_of_a_sentence():
    for words in range(1, 120):
        pieces = compose_reply("hi", words)
        text = "".join(pieces).rstrip()
        assert text.endswith((".", "!", "?")), (words, text[-40:])
        assert len(pieces) >= words, (words, len(pieces))
        assert len(pieces) < words + 16, (words, len(pieces))


async def test_a_plain_prompt_is_answered_piece_by_piece(agent):
    a, r = agent
    sid = "s-" + uuid.uuid4().hex
    async with r.pubsub() as ps:
        await ps.subscribe(f"session:{sid}:down")
        await ps.get_message(timeout=1)
        await r.publish(f"session:{sid}:up", json.dumps({"type": "prompt", "id": "p1", "text": "hi"}))
        n = len(compose_reply("hi", 20))
        got = [await next_message(ps) for _ in range(n + 2)]
    assert got[0] == {"type": "start", "reply_to": "p1", "pieces": n}
    assert [m["seq"] for m in got[1 : n + 1]] == list(range(n))
    assert "".join(m["text"] for m in got[1 : n + 1]) == "".join(compose_reply("hi", 20))
    assert got[n + 1] == {"type": "done", "reply_to": "p1", "pieces": n}


async def test_a_reliable_prompt_is_answered_through_history_and_acknowledged(agent):
    a, r = agent
    sid = "s-" + uuid.uuid4().hex
    # No wsproxy here: a stand-in for its wsproxy_publish that records the calls.
    sent: list[tuple[str, object]] = []

    async def send_reliable(session_id: str, data: object) -> str:
        sent.append((session_id, data))
        return f"{len(sent)}-0"

    a.wsproxy.send_reliable = send_reliable  # type: ignore[method-assign]
    await r.xadd("wsproxy:up:0", {"session": sid, "agent": "web", "id": "m1",
                                  "data": json.dumps({"type": "prompt", "id": "p1", "text": "yo"})})
    async with asyncio.timeout(5):
        while not sent or sent[-1][1]["type"] != "done":  # type: ignore[index]
            await asyncio.sleep(0.05)
        while (await r.xpending("wsproxy:up:0", a.group))["pending"]:
            await asyncio.sleep(0.05)
    n = len(compose_reply("yo", 20))
    assert [d["type"] for _, d in sent] == ["start"] + ["chunk"] * n + ["done"]  # type: ignore[index]


async def test_the_reply_pauses_on_disconnect_and_goes_on_when_the_client_is_back(agent):
    a, r = agent
    sid = "s-" + uuid.uuid4().hex
    async with r.pubsub() as ps:
        await ps.subscribe(f"session:{sid}:down")
        await ps.get_message(timeout=1)
        await r.xadd("wsproxy:events", event("connect", sid, "p:1", reliable=False))
        await r.publish(f"session:{sid}:up", json.dumps({"type": "prompt", "id": "p1", "text": "hi"}))
        got = [await next_message(ps) for _ in range(5)]  # start + 4 pieces
        await r.xadd("wsproxy:events", event("disconnect", sid, "p:1", code=1001, reason="client"))
        # At most a piece or two in flight before the event is read, then nothing.
        while (m := await next_message(ps, timeout=0.5)) is not None:
            got.append(m)
            assert len(got) < 12, "the agent did not pause"
        paused_at = len(got)
        await asyncio.sleep(0.5)
        assert await next_message(ps, timeout=0.1) is None
        await r.xadd("wsproxy:events", event("resume", sid, "p:2", reliable=True, resumed=True, replayed=0))
        while (m := await next_message(ps, timeout=2)) is not None:
            got.append(m)
            if m["type"] == "done":
                break
    assert paused_at < 12 and got[-1]["type"] == "done"
    assert [m["seq"] for m in got if m["type"] == "chunk"] == list(range(len(compose_reply("hi", 20))))


async def test_one_of_two_connections_leaving_does_not_pause(agent):
    a, r = agent
    sid = "s-" + uuid.uuid4().hex
    for conn in ("p:1", "p:2"):
        await r.xadd("wsproxy:events", event("connect", sid, conn))
    await r.xadd("wsproxy:events", event("disconnect", sid, "p:1", code=1000, reason="client"))
    async with asyncio.timeout(3):
        while a.sessions.get(sid) is None or a.sessions[sid].open != {"p:2"}:
            await asyncio.sleep(0.05)
    assert a.sessions[sid].present.is_set()
    await r.xadd("wsproxy:events", event("disconnect", sid, "p:2", code=1006, reason="process_lost",
                                         messages_in=None, messages_out=None))
    async with asyncio.timeout(3):
        while a.sessions[sid].present.is_set():
            await asyncio.sleep(0.05)


# -- stop ------------------------------------------------------------------------


async def _collect(ps, timeout: float = 0.6) -> list[dict]:
    """Messages until none comes for ``timeout`` seconds."""
    got = []
    while (m := await next_message(ps, timeout=timeout)) is not None:
        got.append(m)
    return got


async def test_a_stop_mid_reply_ends_it_and_publishes_the_marker_once(agent):
    a, r = agent
    sid = "s-" + uuid.uuid4().hex
    n = len(compose_reply("hi", 20))
    async with r.pubsub() as ps:
        await ps.subscribe(f"session:{sid}:down")
        await ps.get_message(timeout=1)
        await r.publish(f"session:{sid}:up", json.dumps({"type": "prompt", "id": "p1", "text": "hi"}))
        got = [await next_message(ps) for _ in range(5)]  # start + 4 pieces
        # Two tabs press Stop at once: one marker.
        await r.publish(f"session:{sid}:up", json.dumps({"type": "stop", "reply_to": "p1"}))
        await r.publish(f"session:{sid}:up", json.dumps({"type": "stop"}))
        got += await _collect(ps)
    types = [m["type"] for m in got]
    assert types[0] == "start" and types[-1] == "stopped", types
    assert types.count("stopped") == 1 and "done" not in types, types
    chunks = [m["seq"] for m in got if m["type"] == "chunk"]
    assert chunks == list(range(len(chunks)))
    assert 4 <= len(chunks) <= 6, f"{len(chunks)} pieces: the reply did not stop at once"
    assert got[-1] == {"type": "stopped", "reply_to": "p1", "pieces": n, "sent": len(chunks)}
    assert a.sessions[sid].current is None


async def test_a_stop_with_no_reply_under_way_is_a_no_op(agent):
    a, r = agent
    sid = "s-" + uuid.uuid4().hex
    async with r.pubsub() as ps:
        await ps.subscribe(f"session:{sid}:down")
        await ps.get_message(timeout=1)
        await r.publish(f"session:{sid}:up", json.dumps({"type": "stop"}))
        assert await _collect(ps) == []
        # A stop that names another reply leaves the one under way alone.
        await r.publish(f"session:{sid}:up", json.dumps({"type": "prompt", "id": "p1", "text": "hi"}))
        got = [await next_message(ps) for _ in range(3)]
        await r.publish(f"session:{sid}:up", json.dumps({"type": "stop", "reply_to": "p0"}))
        got += await _collect(ps)
    assert [m["type"] for m in got] == ["start"] + ["chunk"] * len(compose_reply("hi", 20)) + ["done"]
    assert a.stop(sid) is False  # and directly: nothing under way
    assert a.stop("never-seen") is False


async def test_a_prompt_after_a_stop_gets_a_full_reply(agent):
    a, r = agent
    sid = "s-" + uuid.uuid4().hex
    n = len(compose_reply("again", 20))
    async with r.pubsub() as ps:
        await ps.subscribe(f"session:{sid}:down")
        await ps.get_message(timeout=1)
        await r.publish(f"session:{sid}:up", json.dumps({"type": "prompt", "id": "p1", "text": "hi"}))
        for _ in range(3):
            await next_message(ps)
        await r.publish(f"session:{sid}:up", json.dumps({"type": "stop"}))
        assert (await _collect(ps))[-1]["type"] == "stopped"
        await r.publish(f"session:{sid}:up", json.dumps({"type": "prompt", "id": "p2", "text": "again"}))
        got = await _collect(ps)
    assert [m["type"] for m in got] == ["start"] + ["chunk"] * n + ["done"]
    assert all(m["reply_to"] == "p2" for m in got)
    assert [m["seq"] for m in got[1:-1]] == list(range(n))


async def test_a_stop_ends_a_paused_reply_at_once(agent):
    a, r = agent
    sid = "s-" + uuid.uuid4().hex
    async with r.pubsub() as ps:
        await ps.subscribe(f"session:{sid}:down")
        await ps.get_message(timeout=1)
        await r.xadd("wsproxy:events", event("connect", sid, "p:1", reliable=False))
        await r.publish(f"session:{sid}:up", json.dumps({"type": "prompt", "id": "p1", "text": "hi"}))
        got = [await next_message(ps) for _ in range(3)]
        await r.xadd("wsproxy:events", event("disconnect", sid, "p:1", code=1001, reason="client"))
        got += await _collect(ps, timeout=0.5)  # paused
        await r.publish(f"session:{sid}:up", json.dumps({"type": "stop"}))
        got += await _collect(ps)
    assert got[-1]["type"] == "stopped" and [m["type"] for m in got].count("stopped") == 1
    assert got[-1]["sent"] == sum(m["type"] == "chunk" for m in got) < len(compose_reply("hi", 20))


async def test_a_reliable_stop_ends_the_reply_and_both_messages_are_acknowledged(agent):
    a, r = agent
    sid = "s-" + uuid.uuid4().hex
    sent: list[dict] = []

    async def send_reliable(session_id: str, data: dict) -> str:
        assert session_id == sid
        sent.append(data)
        return f"{len(sent)}-0"

    a.wsproxy.send_reliable = send_reliable  # type: ignore[method-assign]
    await r.xadd("wsproxy:up:0", {"session": sid, "agent": "web", "id": "m1",
                                  "data": json.dumps({"type": "prompt", "id": "p1", "text": "yo"})})
    async with asyncio.timeout(5):
        while sum(d["type"] == "chunk" for d in sent) < 3:
            await asyncio.sleep(0.01)
    await r.xadd("wsproxy:up:0", {"session": sid, "agent": "web", "id": "m2",
                                  "data": json.dumps({"type": "stop", "reply_to": "p1"})})
    async with asyncio.timeout(5):
        while sent[-1]["type"] != "stopped":
            await asyncio.sleep(0.01)
        while (await r.xpending("wsproxy:up:0", a.group))["pending"]:
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    types = [d["type"] for d in sent]
    assert types[-1] == "stopped" and types.count("stopped") == 1 and "done" not in types, types
    assert sent[-1]["sent"] == types.count("chunk") < len(compose_reply("yo", 20))
