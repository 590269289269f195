// The page: asks the app for a session, opens it with clients/js/session.js
// (over WebSocket or SSE, the "Transport" choice), sends prompts and shows
// the agent's replies as their pieces arrive. "Stop" asks the agent to end
// the reply in progress: every tab of the session sees it end ("stopped").
// "Leave" closes the connection (the agent pauses when wsproxy reports the
// disconnect); "Come back" opens it again, resuming from the last message
// seen in a reliable session.
//
// The session is in the page's address (#session=<id>): another tab opened
// there, or this one refreshed, joins the same session with a grant from
// POST /api/sessions/{id}/join. A refreshed tab of a reliable session
// resumes from the position it had reached (kept in sessionStorage), so it
// misses nothing that came while it reloaded.
//
// Everything the page knows is also in window.agentDemo, for the
// end-to-end test (e2e.mjs).

import { openSession } from '/session.js';

const $ = (id) => document.getElementById(id);

const demo = {
  grant: null, // what POST /api/sessions (or .../join) answered
  joined: false, // true when this page joined a session from its address
  transport: null, // 'websocket' or 'sse'
  session: null, // the open Session, or null after "Leave"
  position: null, // {epoch, offset} saved on "Leave" (reliable)
  state: 'none',
  replies: {}, // reply_to -> {pieces, chunks: [text], done, stopped, ended, joinedAt, outOfOrder, afterEnd}
  current: null, // the reply_to of the reply under way, as far as this page knows
  received: [], // every agent message: {type, reply_to, seq, at, replayed, connection}
  welcomes: [], // the welcome of each reliable connection
  connections: 0, // sessions opened (1 + comebacks)
  stops: 0, // stop messages sent
  resumeFailures: [],
  errors: [],
};
window.agentDemo = demo;

function log(text) {
  const line = document.createElement('div');
  line.textContent = `${new Date().toISOString().slice(11, 23)} ${text}`;
  $('log').prepend(line);
}

function setState(state) {
  demo.state = state;
  $('status').textContent = state;
  $('status').dataset.state = state;
  const started = demo.grant !== null;
  const open = demo.session !== null;
  $('start').disabled = started;
  $('mode').disabled = started;
  $('transport').disabled = started;
  $('leave').disabled = !open;
  $('back').disabled = !started || open;
  $('prompt').disabled = !open;
  $('send').disabled = !open;
  $('stop').disabled = !open;
}

// Where a reliable session stands, per tab (sessionStorage survives a reload).
const positionKey = (sessionId) => `agentDemo:position:${sessionId}`;
function savePosition() {
  const p = demo.session?.position;
  if (p && demo.grant) sessionStorage.setItem(positionKey(demo.grant.session_id), JSON.stringify(p));
}
function savedPosition(sessionId) {
  try {
    const p = JSON.parse(sessionStorage.getItem(positionKey(sessionId)) ?? 'null');
    return p && typeof p.epoch === 'string' && typeof p.offset === 'string' ? p : null;
  } catch {
    return null;
  }
}

function replyFor(id) {
  let r = demo.replies[id];
  if (!r) {
    const el = document.createElement('div');
    el.className = 'turn reply';
    el.dataset.replyTo = id;
    $('conversation').append(el);
    r = {
      pieces: null, chunks: [], started: false, done: false, stopped: false, ended: false,
      sent: null, joinedAt: null, outOfOrder: 0, afterEnd: 0, el,
    };
    demo.replies[id] = r;
  }
  return r;
}

// A message from the agent: `data` is the parsed JSON in a reliable
// session, the frame's text in a plain one.
function onMessage(data, info = {}) {
  savePosition();
  let msg = data;
  if (typeof msg === 'string') {
    try {
      msg = JSON.parse(msg);
    } catch {
      log(`not JSON: ${msg.slice(0, 80)}`);
      return;
    }
  }
  if (!msg || typeof msg !== 'object' || typeof msg.reply_to !== 'string') return;
  demo.received.push({
    type: msg.type, reply_to: msg.reply_to, seq: msg.seq ?? null,
    at: performance.now(), replayed: Boolean(info.replayed), connection: demo.connections,
  });
  const r = replyFor(msg.reply_to);
  if (msg.type === 'start') {
    r.pieces = msg.pieces;
    r.started = true;
    demo.current = msg.reply_to;
  } else if (msg.type === 'chunk') {
    if (r.ended) {
      r.afterEnd += 1; // never: the agent sends nothing after done or stopped
      log(`piece ${msg.seq} of ${msg.reply_to} after its end`);
    }
    if (!r.started && r.chunks.length === 0 && msg.seq > 0) {
      r.joinedAt = msg.seq; // this page joined in the middle of the reply
      r.el.dataset.joinedAt = String(msg.seq);
      log(`joined reply ${msg.reply_to} at piece ${msg.seq}`);
    } else if (msg.seq !== r.chunks.length) {
      r.outOfOrder += 1; // a plain session loses what was sent while it was away
      log(`piece ${msg.seq} arrived, expected ${r.chunks.length}`);
    }
    r.chunks[msg.seq] = msg.text;
    r.el.textContent = (r.joinedAt ? '… ' : '') + r.chunks.join('');
    if (!r.ended) demo.current = msg.reply_to;
  } else if (msg.type === 'done' || msg.type === 'stopped') {
    r.ended = true;
    r.done = msg.type === 'done';
    r.stopped = msg.type === 'stopped';
    r.pieces = msg.pieces;
    if (r.stopped) r.sent = msg.sent;
    r.el.dataset[msg.type] = 'true';
    if (r.stopped) log(`reply ${msg.reply_to} stopped after ${msg.sent} of ${msg.pieces} pieces`);
    if (demo.current === msg.reply_to) demo.current = null;
  }
}

function connect(resumeFrom) {
  const g = demo.grant;
  demo.connections += 1;
  let s = null;
  s = openSession({
    url: g.wsproxy_url,
    agentId: g.agent_id,
    sessionId: g.session_id,
    token: g.token,
    reliable: g.reliable,
    transport: demo.transport,
    ...(resumeFrom ? { resumeFrom } : {}),
    onMessage,
    onResumeFailed({ reason }) {
      demo.resumeFailures.push(reason);
      log(`resume failed (${reason}): what was sent meanwhile is lost`);
    },
    onStateChange(state, info) {
      if (state === 'open' && info?.welcome) {
        demo.welcomes.push(info.welcome);
        if (info.welcome.resumed) log(`resumed, ${info.welcome.replayed} replayed`);
      }
      // A session left behind by "Leave" reports its close: not ours any more.
      if (s === null || demo.session === s) {
        if (state === 'open') savePosition();
        setState(state);
      }
    },
    onError(e) {
      demo.errors.push(e.code);
      log(`${e.code}: ${e.message}`);
    },
  });
  demo.session = s;
  setState(s.state);
}

function showSession(how) {
  const g = demo.grant;
  // The session goes in the address (query kept): a reload, or another tab, joins it.
  history.replaceState(null, '', `${location.pathname}${location.search}#session=${encodeURIComponent(g.session_id)}`);
  $('mode').value = g.reliable ? 'reliable' : 'plain';
  $('session').textContent = `${g.session_id} (${g.reliable ? 'reliable' : 'plain'}, ${demo.transport}, ${how})`;
  $('share').href = location.href;
  $('share').textContent = location.href;
  $('joinhint').hidden = false;
  log(`session ${g.session_id} ${how} over ${demo.transport}`);
}

$('start').addEventListener('click', async () => {
  $('start').disabled = true;
  const reliable = $('mode').value === 'reliable';
  const res = await fetch('/api/sessions', {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ user: $('user').value, reliable }),
  });
  if (!res.ok) {
    log(`POST /api/sessions: ${res.status} ${await res.text()}`);
    $('start').disabled = false;
    return;
  }
  demo.grant = await res.json();
  demo.transport = $('transport').value || 'websocket';
  showSession('started');
  connect();
});

/** Joins the session named in the address (#session=<id>): another tab's, or this tab's before a reload. */
async function join(sessionId) {
  $('start').disabled = true;
  const res = await fetch(`/api/sessions/${encodeURIComponent(sessionId)}/join`, { method: 'POST' });
  if (!res.ok) {
    log(`cannot join ${sessionId}: ${res.status} ${await res.text()}`);
    history.replaceState(null, '', `${location.pathname}${location.search}`);
    $('start').disabled = false;
    return;
  }
  demo.grant = await res.json();
  demo.joined = true;
  demo.transport = $('transport').value || 'websocket';
  const from = demo.grant.reliable ? savedPosition(sessionId) : null;
  showSession(from ? `rejoined at offset ${from.offset}` : 'joined');
  connect(from);
}

$('leave').addEventListener('click', () => {
  const s = demo.session;
  demo.position = s.position; // null in a plain session
  demo.session = null;
  s.close();
  setState('left');
  log(demo.position ? `left at offset ${demo.position.offset}` : 'left');
});

$('back').addEventListener('click', () => connect(demo.position));

const newId = (prefix) => `${prefix}-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`;

$('ask').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const text = $('prompt').value.trim();
  if (!text || !demo.session) return;
  const id = newId('p');
  const el = document.createElement('div');
  el.className = 'turn prompt';
  el.textContent = text;
  $('conversation').append(el);
  $('prompt').value = '';
  try {
    await demo.session.send({ type: 'prompt', id, text }, { id });
  } catch (e) {
    log(`not sent: ${e.code ?? e}`);
  }
});

// Stop: the agent ends the reply under way (the one named, when this page
// knows it) and tells every tab; with nothing under way it does nothing.
$('stop').addEventListener('click', async () => {
  if (!demo.session) return;
  const id = newId('s');
  const data = { type: 'stop', ...(demo.current ? { reply_to: demo.current } : {}) };
  demo.stops += 1;
  log(`stop${data.reply_to ? ` ${data.reply_to}` : ''}`);
  try {
    await demo.session.send(data, { id });
  } catch (e) {
    log(`stop not sent: ${e.code ?? e}`);
  }
});

const params = new URLSearchParams(location.search);
if (params.get('mode')) $('mode').value = params.get('mode');
if (params.get('user')) $('user').value = params.get('user');
if (params.get('transport')) $('transport').value = params.get('transport');
setState('none');
const joining = new URLSearchParams(location.hash.slice(1)).get('session');
if (joining) join(joining);
