"""The browser stand-in: a `websockets` client on a wsproxy session."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from wsproxy_backend import RELIABLE_PROTOCOL, session_url

AGENT = "pytest"
STEP = 5.0


def client(base: str, session_id: str, token: str, *, reliable: bool = False, agent: str = AGENT, **query: str):
    """``async with client(...) as ws``: a session connection, reliable (``wsproxy.v1``) or plain."""
    url = session_url(base, agent, session_id, token, **query)
    return connect(
        url,
        subprotocols=[RELIABLE_PROTOCOL] if reliable else None,  # type: ignore[list-item]
        proxy=None,
        compression=None,
        open_timeout=STEP,
        user_agent_header="pytest-wsproxy-backend",
    )


async def recv_json(ws: ClientConnection, timeout: float = STEP) -> Any:
    async with asyncio.timeout(timeout):
        frame = await ws.recv()
    return json.loads(frame)


async def welcome(ws: ClientConnection) -> dict[str, Any]:
    w = await recv_json(ws)
    assert w["type"] == "welcome", w
    return w


async def send_reliable(ws: ClientConnection, message_id: str, data: Any) -> dict[str, Any]:
    """Sends a reliable client message and returns wsproxy's acknowledgement."""
    await ws.send(json.dumps({"type": "message", "id": message_id, "data": data}))
    while True:
        reply = await recv_json(ws)
        if reply.get("id") == message_id and reply.get("type") in ("ack", "error"):
            assert reply["type"] == "ack", reply
            return reply
