// The demo page's script: connects to wsproxy's /ws with ../jwt_utils.js,
// subscribes, publishes and logs every frame. Served with the rest of
// clients/js (`python3 -m http.server` in clients/js), so the import below
// finds the library one folder up.

import {
  createAuthenticatedWebSocket,
  publish,
  registerName,
  sessionOf,
  subscribe,
  unsubscribe,
} from '../jwt_utils.js';

const $ = (id) => document.getElementById(id);

/** The open socket, or null. */
let ws = null;
/** The session the socket is bound to. */
let session = null;
/** Topics subscribed on the current socket. */
const topics = new Set();

// ---- log panel ----------------------------------------------------------

/**
 * Appends a line to the log. `kind` is its CSS class: info, sent,
 * received, message (a delivered topic message) or error. The text is set
 * with textContent, never as HTML: messages come from other clients.
 */
function log(kind, text) {
  const item = document.createElement('li');
  item.className = kind;
  const time = document.createElement('span');
  time.className = 'time';
  time.textContent = new Date().toLocaleTimeString();
  item.append(time, ' ', text);
  const panel = $('log');
  panel.append(item);
  panel.scrollTop = panel.scrollHeight;
}

/** Logs a frame from the server, picking out messages and refusals. */
function logFrame(data) {
  if (typeof data !== 'string') {
    log('received', `binary frame (${data.size ?? data.byteLength} bytes)`);
    return;
  }
  let msg = null;
  try {
    msg = JSON.parse(data);
  } catch {
    // e.g. "pong", the reply to a "ping" frame
  }
  if (msg && typeof msg === 'object' && msg.type === undefined && typeof msg.topic === 'string') {
    log(
      'message',
      `message on ${msg.topic} from ${msg.publisher_name} (session ${msg.session_id}, ` +
        `${msg.timestamp}): ${JSON.stringify(msg.payload)}`,
    );
  } else if (msg && msg.type === 'error') {
    log('error', `server refused ${msg.command}: ${msg.error} (${msg.message})`);
  } else {
    log('received', data);
  }
}

// ---- connecting ---------------------------------------------------------

/**
 * The WebSocket and HTTP bases of what was typed in the URL field:
 * `ws://host:port`, `wss://...`, `http://...` or `https://...`, with or
 * without a trailing `/ws`.
 */
function bases(raw) {
  let url;
  try {
    url = new URL(raw.trim());
  } catch {
    throw new Error(`"${raw}" is not a URL (expected e.g. ws://127.0.0.1:8080)`);
  }
  const secure = { 'ws:': false, 'http:': false, 'wss:': true, 'https:': true }[url.protocol];
  if (secure === undefined) throw new Error(`"${raw}": use ws://, wss://, http:// or https://`);
  const path = url.pathname.replace(/\/+$/, '').replace(/\/ws$/, '');
  return {
    ws: `${secure ? 'wss' : 'ws'}://${url.host}${path}`,
    http: `${secure ? 'https' : 'http'}://${url.host}${path}`,
  };
}

/** Opens a WebSocket without a token; resolves once it is open. */
function openAnonymous(url) {
  return new Promise((resolve, reject) => {
    const socket = new WebSocket(url);
    const done = (err) => {
      socket.removeEventListener('open', onOpen);
      socket.removeEventListener('close', onClose);
      if (err) reject(err);
      else resolve(socket);
    };
    const onOpen = () => done(null);
    // A refused upgrade (401, 403) is only "closed with 1006" to a page.
    const onClose = (ev) => done(new Error(`WebSocket to ${url} closed before it opened (code ${ev.code})`));
    socket.addEventListener('open', onOpen);
    socket.addEventListener('close', onClose);
  });
}

/** Says what a connection refused by the browser may need on the server. */
function hintOrigins(base, anonymous) {
  log(
    'info',
    `Is wsproxy running at ${base.http}? A browser is not told why an upgrade was refused: ` +
      `WS_ALLOWED_ORIGINS must list this page's origin ${location.origin} (or be *)` +
      (anonymous
        ? ', and an anonymous client needs PUBSUB_ALLOW_ANONYMOUS=true.'
        : ', and CORS_ALLOWED_ORIGINS too, to log in.'),
  );
}

async function connect() {
  if (document.body.dataset.state !== 'disconnected') return;
  let base;
  try {
    base = bases($('url').value);
  } catch (e) {
    log('error', e.message);
    return;
  }
  const anonymous = $('mode-anonymous').checked;
  const wanted = $('session').value.trim();
  const name = $('name').value.trim();
  const username = $('username').value.trim();
  if (anonymous && !wanted) {
    log('error', 'an anonymous connection needs a session: fill in "session"');
    return;
  }
  if (!anonymous && !username) {
    log('error', 'fill in username and password to log in');
    return;
  }
  setState('connecting');
  let socket;
  try {
    if (anonymous) {
      log('info', `connecting to ${base.ws}/ws anonymously`);
      socket = await openAnonymous(`${base.ws}/ws`);
    } else {
      log('info', `logging in as ${username} at ${base.http}/auth/token, then connecting to ${base.ws}/ws`);
      socket = await createAuthenticatedWebSocket(
        `${base.ws}/ws`,
        `${base.http}/auth/token`,
        username,
        $('password').value,
        wanted || undefined,
      );
    }
  } catch (e) {
    log('error', e.message);
    // An HTTP answer from POST /auth/token (wrong password, say) says what
    // is wrong; anything else may be the origin check.
    if (e.status === undefined) hintOrigins(base, anonymous);
    setState('disconnected');
    return;
  }

  ws = socket;
  topics.clear();
  showTopics();
  ws.addEventListener('message', (ev) => logFrame(ev.data));
  ws.addEventListener('close', (ev) => {
    if (socket !== ws) return;
    const reason = ev.reason ? `, ${ev.reason}` : '';
    log(ev.code === 1000 ? 'info' : 'error', `connection closed (code ${ev.code}${reason})`);
    if (ev.code === 1008 && ev.reason === 'token expired') log('info', 'the token expired: connect again for a new one');
    ws = null;
    topics.clear();
    showTopics();
    setState('disconnected');
  });

  session = anonymous ? wanted : sessionOf(ws);
  log('info', `connected, session ${session}${anonymous ? ' (anonymous)' : ''}`);
  setState('connected');
  // An anonymous connection is bound to the first session it names; this
  // binds it at once (a token does that for a logged-in connection).
  if (anonymous) send(`register-session:${session}`);
  if (name) {
    try {
      log('sent', `register-name:${name}`);
      await registerName(ws, name);
    } catch (e) {
      if (!e.reply) log('error', e.message); // a refusal is logged as it arrives
    }
  }
}

/** Sends a raw command frame and logs it. */
function send(frame) {
  log('sent', frame);
  ws.send(frame);
}

// ---- subscribing and publishing -----------------------------------------

async function changeSubscription(on) {
  const topic = $('sub-topic').value.trim();
  if (!ws || !topic) return;
  log('sent', `${on ? 'subscribe' : 'unsubscribe'}:${topic}|${session}`);
  try {
    await (on ? subscribe : unsubscribe)(ws, topic, session);
    if (on) topics.add(topic);
    else topics.delete(topic);
    showTopics();
  } catch (e) {
    if (!e.reply) log('error', e.message);
  }
}

function publishPayload() {
  if (!ws) return;
  const topic = $('pub-topic').value.trim();
  let payload;
  try {
    payload = JSON.parse($('payload').value);
  } catch (e) {
    log('error', `not published: the payload is not valid JSON (${e.message})`);
    return;
  }
  try {
    log('sent', publish(ws, { topic, payload }));
  } catch (e) {
    log('error', `not published: ${e.message}`);
  }
}

// ---- page state ---------------------------------------------------------

function showTopics() {
  $('subscriptions').textContent = topics.size ? [...topics].join(', ') : 'nothing';
}

/** Enables what makes sense in `state`: disconnected, connecting or connected. */
function setState(state) {
  const connected = state === 'connected';
  $('connect').disabled = state !== 'disconnected';
  $('disconnect').disabled = !connected;
  for (const id of ['subscribe', 'unsubscribe', 'publish']) $(id).disabled = !connected;
  const status = $('status');
  status.className = state;
  status.textContent = connected ? `connected, session ${session}` : state === 'connecting' ? 'connecting...' : 'not connected';
  document.body.dataset.state = state;
}

function showMode() {
  const login = $('mode-login').checked;
  $('login-fields').hidden = !login;
  // Logged in, the session may be left empty: the server then uses
  // session-<username>. Anonymous, it is required.
  $('session').placeholder = login ? 'session-<username>' : 'required';
}

$('origin').textContent = location.origin;
$('name').value = `tab-${Math.random().toString(36).slice(2, 6)}`;
$('connect-form').addEventListener('submit', (ev) => {
  ev.preventDefault(); // Connect (or Enter in a field) connects; the page stays
  connect();
});
$('disconnect').addEventListener('click', () => ws && ws.close(1000));
$('subscribe').addEventListener('click', () => changeSubscription(true));
$('unsubscribe').addEventListener('click', () => changeSubscription(false));
$('publish').addEventListener('click', publishPayload);
$('clear-log').addEventListener('click', () => $('log').replaceChildren());
for (const radio of document.querySelectorAll('input[name="mode"]')) radio.addEventListener('change', showMode);
showMode();
setState('disconnected');
window.wsproxyDemoLoaded = true;
