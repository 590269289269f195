"""Sessions over HTTP (SSE) with a third-party client: httpx-sse over httpx.

A client that is not a browser picks such a library because it sends what
``EventSource`` cannot: an ``Authorization: Bearer`` header, and a
``Last-Event-ID`` of its choosing when it reconnects. The backend side is
this package (tokens, ``send_reliable``, ``client_messages``); the stream is
``GET /{agent}/sse/{session}``, client messages ``POST`` to the same path.

httpx-sse yields a block without ``data`` as an event of its own, where a
browser dispatches nothing: the stream's opening ``retry: 2000`` and, on a
resumable stream, each keepalive comment (with the last id seen). ``Events``
sets those aside, and the tests check that they never carry data or a new
id.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from conftest import RedisServer, WsproxyProcess, start_wsproxy
from httpx_sse import EventSource, ServerSentEvent, aconnect_sse
from support import AGENT, STEP

from wsproxy_backend import Wsproxy

#: The ``retry:`` wsproxy opens every stream with (``sse::RETRY_MS``).
RETRY_MS = 2000


def sse_url(server: WsproxyProcess, session_id: str) -> str:
    return f"{server.http}/{AGENT}/sse/{session_id}"


def compact(data: Any) -> str:
    """JSON as the backend library writes it (``send``, ``send_reliable``)."""
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    # trust_env=False: HTTP(S)_PROXY must not reroute 127.0.0.1.
    async with httpx.AsyncClient(timeout=httpx.Timeout(STEP), trust_env=False) as c:
        yield c


class Events:
    """The events of one stream, as httpx-sse decodes them."""

    def __init__(self, source: EventSource) -> None:
        self.source = source
        self._it = source.aiter_sse()
        #: What httpx-sse yielded for blocks without data (see the module doc).
        self.blank: list[ServerSentEvent] = []
        self.last_id = ""

    async def next(self, timeout: float = STEP) -> ServerSentEvent:
        async with asyncio.timeout(timeout):
            while True:
                event = await anext(self._it)
                if event.event == "message" and event.data == "":
                    assert event.id == self.last_id, f"a block without data moved the id: {event!r}"
                    self.blank.append(event)
                    continue
                self.last_id = event.id
                return event


@asynccontextmanager
async def stream(
    http: httpx.AsyncClient, url: str, token: str, *, last_event_id: str | None = None, **params: str
) -> AsyncIterator[Events]:
    headers = {"Authorization": f"Bearer {token}"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    async with aconnect_sse(http, "GET", url, params=params, headers=headers) as source:
        response = source.response
        if response.status_code != 200:
            await response.aread()
            raise AssertionError(f"{response.status_code} {response.text}")
        assert response.headers["content-type"] == "text/event-stream"
        yield Events(source)


async def consume(messages, n: int, timeout: float = STEP) -> list:
    out: list = []
    async with asyncio.timeout(timeout):
        while len(out) < n:
            out += await messages.read(block_ms=200)
    return out


async def test_httpx_sse_receives_resumes_with_last_event_id_and_posts(
    wsproxy: Wsproxy, wsproxy_server: WsproxyProcess, http: httpx.AsyncClient, sid: str
):
    token = await wsproxy.issue_token(sid)
    url = sse_url(wsproxy_server, sid)
    # Byte for byte: a line feed inside a JSON string (escaped, as JSON
    # writes it), non-ASCII text of every width, and JSON whose whitespace
    # has line feeds (sent as several data: lines, joined again).
    first = [
        compact({"n": 1, "text": "first line\nsecond line"}),
        compact({"n": 2, "text": "héllo wörld ✓ 日本語 😀"}),
        '{\n  "n": 3,\n  "pretty": "yes"\n}',
    ]
    missed = [
        compact({"n": 4, "text": "away\n"}),
        compact({"n": 5, "text": "ünïcödé ✓ 😀"}),
        compact({"n": 6}),
    ]
    async with stream(http, url, token, reliable="true") as events:
        welcome = await events.next()
        assert events.blank[0].retry == RETRY_MS, events.blank
        assert welcome.event == "welcome", welcome
        w = welcome.json()
        assert w["type"] == "welcome" and w["session_id"] == sid, w
        epoch = w["epoch"]
        assert welcome.id == f"{epoch}:{w['offset']}"
        offsets = [await wsproxy.send_reliable_raw(sid, p) for p in first]
        for payload, offset in zip(first, offsets):
            e = await events.next()
            assert (e.event, e.id) == ("message", f"{epoch}:{offset}"), e
            assert e.data.encode() == payload.encode()
            assert e.json() == json.loads(payload)
        last_seen = events.last_id
    assert last_seen == f"{epoch}:{offsets[-1]}"

    # Away: published meanwhile, kept in the session's history.
    missed_offsets = [await wsproxy.send_reliable_raw(sid, p) for p in missed]
    async with stream(http, url, token, last_event_id=last_seen, reliable="true") as events:
        welcome = await events.next()
        w = welcome.json()
        assert welcome.event == "welcome" and (w["resumed"], w["replayed"]) == (True, len(missed)), w
        # Until the replay, the client is where it was.
        assert welcome.id == last_seen
        for payload, offset in zip(missed, missed_offsets):
            e = await events.next()
            assert (e.event, e.id, e.data) == ("message", f"{epoch}:{offset}", payload), e
        # Exactly those, once: the next event is the next message published.
        live = compact({"n": 7, "live": True})
        live_offset = await wsproxy.send_reliable_raw(sid, live)
        e = await events.next()
        assert (e.id, e.data) == (f"{epoch}:{live_offset}", live), e

        # A reliable client message, by POST while the stream is open: the
        # ack is the answer, and the backend consumes it once.
        group = "g-" + uuid.uuid4().hex[:12]
        body = {"type": "message", "id": "m-1", "data": {"q": "é\nx", "n": [1, 2]}}
        async with wsproxy.client_messages(group, "w1") as messages:
            post = await http.post(
                url, params={"reliable": "true"}, headers={"Authorization": f"Bearer {token}"}, json=body
            )
            assert post.status_code == 200, post.text
            ack = post.json()
            assert (ack["type"], ack["id"]) == ("ack", "m-1"), ack
            [m] = await consume(messages, 1)
            assert (m.session_id, m.agent_id, m.message_id, m.data) == (sid, AGENT, "m-1", body["data"])
            assert m.reliable and m.entry_id == ack["offset"]
            assert await messages.ack(m) == 1
            # Sent again (a retry after a lost answer): the same ack, not stored twice.
            again = await http.post(
                url, params={"reliable": "true"}, headers={"Authorization": f"Bearer {token}"}, json=body
            )
            assert again.status_code == 200 and again.json()["offset"] == ack["offset"], again.text
            assert again.json().get("duplicate") is True, again.text
            assert await messages.read(block_ms=300) == []


@pytest.fixture(scope="module")
def plain_server(redis_server: RedisServer, workdir) -> Iterator[WsproxyProcess]:
    """A wsproxy without reliable sessions, on the same Redis."""
    w = start_wsproxy(redis_server, workdir, RELIABLE_SESSIONS="false")
    try:
        yield w
    finally:
        w.stop()


async def test_httpx_sse_plain_stream_has_no_ids(
    wsproxy: Wsproxy, plain_server: WsproxyProcess, http: httpx.AsyncClient, sid: str
):
    token = await wsproxy.issue_token(sid)
    url = sse_url(plain_server, sid)
    payloads = [{"n": 1, "text": "a\nb"}, {"n": 2, "text": "ça ✓ 😀"}]
    async with stream(http, url, token) as events:
        for p in payloads:
            assert await wsproxy.send(sid, p) == 1  # this wsproxy only
        for p in payloads:
            e = await events.next()
            assert (e.event, e.id, e.data) == ("message", "", compact(p)), e
        assert events.blank[0].retry == RETRY_MS and all(b.id == "" for b in events.blank)
    # A resumable stream is refused here, before the token is looked at.
    with pytest.raises(AssertionError, match="^400 .*reliable_sessions_off"):
        async with stream(http, url, token, reliable="true"):
            pass
