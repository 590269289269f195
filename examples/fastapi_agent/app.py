"""A FastAPI backend behind wsproxy: it creates sessions, serves a page that
talks to a simulated agent over wsproxy, and runs the agent (agent.py).

    uv run app.py          # http://127.0.0.1:8001

Settings (environment):
    REDIS_URL          the Redis wsproxy uses (default redis://127.0.0.1:6379)
    WSPROXY_URL        wsproxy as the browser reaches it (default ws://127.0.0.1:8080)
    UP_STREAM_SHARDS   wsproxy's UP_STREAM_SHARDS (default 1)
    APP_HOST, APP_PORT where this app listens (default 127.0.0.1:8001; the JS demo
                       of clients/js uses 8000, wsproxy 8080)
    TOKEN_TTL_SECS     how long a new session's token waits for its first connect (default 60)
    RUN_AGENT          false: serve the API only, and run agents with `uv run agent.py`
    REPLY_DELAY_MS, REPLY_WORDS, FOLLOW_EVENTS: the agent's (agent.py)

wsproxy must have RELIABLE_SESSIONS=true for reliable sessions (the page's
default), LIFECYCLE_EVENTS=true for the agent to pause while a client is
away, and WS_ALLOWED_ORIGINS must let this app's page in
(http://127.0.0.1:8001).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import uvicorn
from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from agent import agent_from_env
from wsproxy_backend import Wsproxy, session_url

HERE = Path(__file__).resolve().parent
SESSION_JS = HERE.parent.parent / "clients" / "js" / "session.js"
AGENT_ID = "web"

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
WSPROXY_URL = os.environ.get("WSPROXY_URL", "ws://127.0.0.1:8080")
TOKEN_TTL = int(os.environ.get("TOKEN_TTL_SECS", "60"))
RUN_AGENT = os.environ.get("RUN_AGENT", "true").lower() not in ("0", "false", "no", "off")
#: What the app remembers of a session it created (its user and mode), for
#: the tabs that join it later; kept as long as wsproxy keeps a token after a
#: connect (AUTH_GRACE_PERIOD_SECS, 3 hours).
SESSION_KEY = "agent-example:session:{}"
SESSION_TTL = 10_800

log = logging.getLogger("app")


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    wsproxy = Wsproxy.from_url(REDIS_URL, up_shards=int(os.environ.get("UP_STREAM_SHARDS", "1")), decode_responses=True)
    app.state.wsproxy = wsproxy
    agent_task = asyncio.create_task(agent_from_env(wsproxy).run()) if RUN_AGENT else None
    try:
        yield
    finally:
        if agent_task is not None:
            agent_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await agent_task
        await wsproxy.aclose()


app = FastAPI(title="wsproxy agent example", lifespan=lifespan)


class NewSession(BaseModel):
    user: str = Field(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_-]+$")
    reliable: bool = True


class SessionGrant(BaseModel):
    session_id: str
    agent_id: str
    token: str
    reliable: bool
    #: wsproxy's base URL, what clients/js/session.js takes as `url`.
    wsproxy_url: str
    #: The full URL, for a client that opens the WebSocket itself.
    websocket_url: str
    #: How long the token is kept from now (0: no expiry).
    token_ttl_secs: int


@app.post("/api/sessions")
async def create_session(body: NewSession) -> SessionGrant:
    """Creates a session for a user: a new session id and its token, and where to connect."""
    session_id = f"{body.user}-{secrets.token_hex(6)}"
    wsproxy: Wsproxy = app.state.wsproxy
    token = await wsproxy.issue_token(session_id, ttl=TOKEN_TTL)
    await wsproxy.redis.set(SESSION_KEY.format(session_id), "reliable" if body.reliable else "plain", ex=SESSION_TTL)
    log.info("session %s for %s (%s)", session_id, body.user, "reliable" if body.reliable else "plain")
    return _grant(session_id, token, body.reliable, TOKEN_TTL)


@app.post("/api/sessions/{session_id}/join")
async def join_session(session_id: str) -> SessionGrant:
    """A grant for a session this app created, for another tab or a refreshed
    page: the session's current token (one a tab of it uses now), or a new
    one if wsproxy no longer keeps any. The token is not replaced while it
    is kept: a session has one token, and the tabs that are open use it to
    reconnect and, over SSE, for every message they send. 404 for a
    session the app does not know (or no longer does).

    A real app checks here that the caller is the session's user (its own
    login); this example lets anyone who has the session id in.
    """
    wsproxy: Wsproxy = app.state.wsproxy
    mode = await wsproxy.redis.get(SESSION_KEY.format(session_id))
    if mode is None:
        raise HTTPException(status_code=404, detail="no such session")
    auth_key = wsproxy.names.auth_key(session_id)
    token, ttl = await wsproxy.redis.get(auth_key), await wsproxy.redis.ttl(auth_key)
    if token is None or 0 <= ttl < 5:  # none, or about to expire (-1: kept for good)
        token, ttl = await wsproxy.issue_token(session_id, ttl=TOKEN_TTL), TOKEN_TTL
    log.info("session %s joined (%s)", session_id, mode)
    return _grant(session_id, token, mode == "reliable", max(ttl, 0))


def _grant(session_id: str, token: str, reliable: bool, ttl: int) -> SessionGrant:
    return SessionGrant(
        session_id=session_id,
        agent_id=AGENT_ID,
        token=token,
        reliable=reliable,
        wsproxy_url=WSPROXY_URL,
        websocket_url=session_url(WSPROXY_URL, AGENT_ID, session_id, token),
        token_ttl_secs=ttl,
    )


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/session.js")
async def session_js() -> FileResponse:
    """The repository's browser client, clients/js/session.js."""
    return FileResponse(SESSION_JS, media_type="text/javascript")


@app.get("/favicon.ico", include_in_schema=False)
async def favicon() -> FileResponse:
    """The page names its icon; this answers browsers that ask anyway."""
    return FileResponse(HERE / "static" / "favicon.svg", media_type="image/svg+xml")


@app.get("/")
async def index() -> FileResponse:
    return FileResponse(HERE / "static" / "index.html")


app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    uvicorn.run(
        app,
        host=os.environ.get("APP_HOST", "127.0.0.1"),
        port=int(os.environ.get("APP_PORT", "8001")),
        log_level="info",
    )
