// The page: asks the app for a session, opens it with clients/js/session.js,
// sends prompts and shows the agent's replies as their pieces arrive.
// "Leave" closes the WebSocket (the agent pauses when wsproxy reports the
// disconnect); "Come back" opens it again, resuming from the last message
// seen in a reliable session.
//
// Everything the page knows is also in window.agentDemo, for the
// end-to-end test (e2e.mjs).

import { openSession } from '/session.js';

const $ = (id) => document.getElementById(id);

const demo = {
  grant: null, // what POST /api/sessions answered
  session: null, // the open Session, or null after "Leave"
  position: null, // {epoch, offset} saved on "Leave" (reliable)
  state: 'none',
  replies: {}, // reply_to -> {pieces, chunks: [text], done, outOfOrder}
  received: [], // every agent message: {type, reply_to, seq, at, replayed, connection}
  connections: 0, // sessions opened (1 + comebacks)
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
  $('leave').disabled = !open;
  $('back').disabled = !started || open;
  $('prompt').disabled = !open;
  $('send').disabled = !open;
}

function replyFor(id) {
  let r = demo.replies[id];
  if (!r) {
    const el = document.createElement('div');
    el.className = 'turn reply';
    el.dataset.replyTo = id;
    $('conversation').append(el);
    r = { pieces: null, chunks: [], done: false, outOfOrder: 0, el };
    demo.replies[id] = r;
  }
  return r;
}

// A message from the agent: `data` is the parsed JSON in a reliable
// session, the frame's text in a plain one.
function onMessage(data, info = {}) {
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
  } else if (msg.type === 'chunk') {
    if (msg.seq !== r.chunks.length) {
      r.outOfOrder += 1; // a plain session loses what was sent while it was away
      log(`piece ${msg.seq} arrived, expected ${r.chunks.length}`);
    }
    r.chunks[msg.seq] = msg.text;
    r.el.textContent = r.chunks.join('');
  } else if (msg.type === 'done') {
    r.done = true;
    r.el.dataset.done = 'true';
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
    ...(resumeFrom ? { resumeFrom } : {}),
    onMessage,
    onResumeFailed({ reason }) {
      demo.resumeFailures.push(reason);
      log(`resume failed (${reason}): what was sent meanwhile is lost`);
    },
    onStateChange(state, info) {
      if (state === 'open' && info?.welcome?.resumed) log(`resumed, ${info.welcome.replayed} replayed`);
      // A session left behind by "Leave" reports its close: not ours any more.
      if (s === null || demo.session === s) setState(state);
    },
    onError(e) {
      demo.errors.push(e.code);
      log(`${e.code}: ${e.message}`);
    },
  });
  demo.session = s;
  setState(s.state);
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
  $('session').textContent = `${demo.grant.session_id} (${reliable ? 'reliable' : 'plain'})`;
  log(`session ${demo.grant.session_id}`);
  connect();
});

$('leave').addEventListener('click', () => {
  const s = demo.session;
  demo.position = s.position; // null in a plain session
  demo.session = null;
  s.close();
  setState('left');
  log(demo.position ? `left at offset ${demo.position.offset}` : 'left');
});

$('back').addEventListener('click', () => connect(demo.position));

$('ask').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const text = $('prompt').value.trim();
  if (!text || !demo.session) return;
  const id = `p-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`;
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

const params = new URLSearchParams(location.search);
if (params.get('mode')) $('mode').value = params.get('mode');
if (params.get('user')) $('user').value = params.get('user');
setState('none');
