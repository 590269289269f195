#!/usr/bin/env node
// Real-browser end-to-end test of sessions over HTTP (Server-Sent Events):
// Chromium's own EventSource (no library) and session.js with
// transport: 'sse', against wsproxy binaries this test starts itself, on a
// redis-server it starts itself.
//
//   WSPROXY_BIN=../../target/debug/wsproxy node test/sse-e2e.mjs
//
// WSPROXY_BIN defaults to ../../target/debug/wsproxy from clients/js (the
// repository's debug build; a relative WSPROXY_BIN is from the current directory);
// redis-server must be on PATH. Optional: CHROMIUM_PATH (default
// /usr/bin/chromium), E2E_TIMEOUT_MS (default 120000).
//
// The test page is served from another port than wsproxy (cross-origin:
// CORS on the stream, the POST and its preflight). The backend is this
// process: it stores session tokens with SETEX and publishes with
// FCALL wsproxy_publish, speaking RESP itself (no npm package).
//
// What happens:
//   1. a bare `new EventSource(url)` (?reliable=true, token as
//      ?access_token=) gets 500 messages published at a steady pace; in the
//      middle the wsproxy process is SIGKILLed and another started on the
//      same port while the publishing goes on. The browser reconnects by
//      itself with Last-Event-ID (the URL carries no position). Every
//      message must arrive exactly once, in order, byte for byte, with the
//      id <epoch>:<offset> of its FCALL; the reconnect's welcome says
//      resumed with the replay; the gap is measured;
//   2. a revoke (DEL session:{id}:auth and the control disconnect, in one
//      MULTI) ends that stream: the page sees `event: close` with
//      {"code":4001,"reason":"revoked"}, and the EventSource's own
//      reconnect gets 403 and ends it for good (readyState CLOSED);
//   3. session.js with transport 'sse' (reliable): messages down with their
//      offsets, messages up by POST acknowledged, stored once in
//      wsproxy:up:{n}, a resend with the same id acknowledged as a
//      duplicate; wsproxy SIGKILLed again with a message sent while it is
//      down: the session resumes (EventSource's Last-Event-ID), delivers
//      what was published meanwhile once, and the message is POSTed again
//      and stored once; a control disconnect with code 4001 ends the
//      session without reconnecting; a plain session gets text and bytes as
//      published, and its POSTs arrive on session:{id}:up;
//   4. a scripted event stream (this process) drops a resumed connection
//      between its welcome and its replay: session.js must reopen from the
//      last message it delivered, not let the EventSource resume from the
//      welcome's id (the newest offset), which would skip the replay;
//   5. refused streams: a wrong token is reported with its 403, a wsproxy
//      with reliable sessions off makes the session fail at once.
// Exit status 0 on success, 1 on any failure (with the reason on stderr).

import http from 'node:http';
import path from 'node:path';
import { readFile } from 'node:fs/promises';
import { randomBytes } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import { isDeepStrictEqual } from 'node:util';
import { chromium } from 'playwright-core';
import {
  TestFailure,
  Redis,
  check,
  closeRedisClients,
  describeFailure,
  freePort,
  killChildren,
  launch,
  makeUntil,
  printChildLogs,
  printDiagnostics,
  processes,
  runMain,
  sleep,
  startRedis,
} from './harness.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const LIB_PATH = path.resolve(HERE, '..', 'session.js');
const WSPROXY_BIN = process.env.WSPROXY_BIN ? path.resolve(process.env.WSPROXY_BIN) : path.resolve(HERE, '..', '../../target/debug/wsproxy');
const CHROMIUM_PATH = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const TIMEOUT_MS = Number(process.env.E2E_TIMEOUT_MS || 120_000);
const STEP_MS = 15_000;
const AGENT = 'sse-e2e';
const TOTAL = 500;
/** Milliseconds between two publishes: 500 messages in about 6 s. */
const PACE_MS = 12;
/** The message after which wsproxy is SIGKILLed. */
const KILL_AFTER = 200;

const say = (msg) => console.log(`[sse-e2e] ${msg}`);
const until = makeUntil(STEP_MS, 25);

// ---------------------------------------------------------------------------
// Processes (harness.mjs): a private redis-server, wsproxy processes on one port.

const started = { browser: null, staticServer: null, scripted: null };

async function startWsproxy(port, redisPort, settings = {}) {
  // Only what this test sets: no setting of the caller's environment may change the server.
  const env = {
    PATH: process.env.PATH,
    HOST: '127.0.0.1',
    PORT: String(port),
    REDIS_URL: `redis://127.0.0.1:${redisPort}`,
    RELIABLE_SESSIONS: 'true',
    WS_ALLOWED_ORIGINS: '*',
    LIFECYCLE_EVENTS: 'true',
    RUST_LOG: 'warn',
    ...settings,
  };
  const child = launch(`wsproxy:${port}`, WSPROXY_BIN, [], env);
  const t0 = Date.now();
  await until(`wsproxy (${WSPROXY_BIN}) ready on ${port}`, async () => {
    const exited = await Promise.race([child.exited, sleep(0).then(() => null)]);
    if (exited) throw new TestFailure(`wsproxy exited (${JSON.stringify(exited)}): ${processes.logs.at(-1).lines.slice(-10).join('\n')}`);
    try {
      const res = await fetch(`http://127.0.0.1:${port}/ready`);
      return res.status === 200;
    } catch {
      return false;
    }
  });
  child.readyMs = Date.now() - t0;
  return child;
}

async function sigkill(child) {
  child.kill('SIGKILL');
  const { signal } = await child.exited;
  check(signal === 'SIGKILL', `wsproxy ended with ${signal}, expected SIGKILL`);
}

// ---------------------------------------------------------------------------
// The page: a bare EventSource, and session.js.

const PAGE_HTML = `<!doctype html>
<html>
<head><meta charset="utf-8"><title>wsproxy sse e2e</title>
<link rel="icon" href="data:,"></head>
<body>
<script type="module">
  import * as mod from './session.js';
  // 1 and 2: the browser's own EventSource, nothing else.
  window.openRaw = (url) => {
    const r = { events: [], welcomes: [], closes: [], errors: [], opens: 0, seq: 0 };
    const es = new EventSource(url);
    r.es = es;
    es.onopen = () => { r.opens += 1; };
    es.onmessage = (e) => r.events.push({ id: e.lastEventId, data: e.data, t: Date.now(), seq: (r.seq += 1) });
    es.addEventListener('welcome', (e) => r.welcomes.push({ id: e.lastEventId, welcome: JSON.parse(e.data), t: Date.now(), seq: (r.seq += 1) }));
    es.addEventListener('close', (e) => r.closes.push({ close: JSON.parse(e.data), t: Date.now() }));
    es.onerror = () => r.errors.push({ readyState: es.readyState, t: Date.now() });
    window.raw = r;
  };
  window.rawBrief = () => {
    const r = window.raw;
    return { count: r.events.length, last: r.events.at(-1), welcomes: r.welcomes, closes: r.closes, errors: r.errors, opens: r.opens, readyState: r.es.readyState };
  };
  window.rawEvents = () => window.raw.events;
  // 3: session.js over SSE.
  const rec = {};
  window.rec = rec;
  window.openRecorded = (name, options) => {
    const r = { messages: [], acks: [], resumeFailed: [], states: [], welcomes: [], errors: [], sends: [] };
    rec[name] = r;
    r.session = mod.openSession({
      ...options,
      onMessage: (data, info) => r.messages.push({ data: data instanceof ArrayBuffer ? { bytes: [...new Uint8Array(data)] } : data, ...info }),
      onAck: (ack) => r.acks.push(ack),
      onResumeFailed: (failure) => r.resumeFailed.push(failure),
      onStateChange: (state, info) => {
        r.states.push({ state, code: info.code, error: info.error && info.error.code });
        if (info.welcome) r.welcomes.push(info.welcome);
      },
      onError: (e) => r.errors.push({ code: e.code, message: e.message, fatal: e.fatal }),
    });
    r.ready = r.session.ready.then((welcome) => ({ welcome }), (e) => ({ code: e.code, message: e.message }));
    return r.ready;
  };
  window.sendRecorded = (name, data, options) => {
    const r = rec[name];
    const entry = { data, status: 'pending' };
    r.sends.push(entry);
    r.session.send(data, options).then(
      (ack) => Object.assign(entry, { status: 'acked', ack: ack ?? null }),
      (e) => Object.assign(entry, { status: 'rejected', code: e.code, message: e.message }),
    );
    return r.sends.length - 1;
  };
  window.snapshot = (name) => {
    const { session, ready, ...r } = rec[name];
    return { ...r, state: session.state, position: session.position, unacked: session.unacked, duplicatesDropped: session.duplicatesDropped };
  };
  window.e2eReady = true;
</script>
</body>
</html>
`;

async function startStaticServer() {
  const lib = await readFile(LIB_PATH);
  const server = http.createServer((req, res) => {
    const { pathname } = new URL(req.url, 'http://x');
    const send = (status, type, body) => {
      res.writeHead(status, { 'Content-Type': type, 'Cache-Control': 'no-store' });
      res.end(body);
    };
    if (pathname === '/') return send(200, 'text/html; charset=utf-8', PAGE_HTML);
    if (pathname === '/session.js') return send(200, 'text/javascript; charset=utf-8', lib);
    return send(404, 'text/plain', 'not found\n');
  });
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', resolve);
  });
  return { server, origin: `http://127.0.0.1:${server.address().port}` };
}

// ---------------------------------------------------------------------------

const diagnostics = { console: [], pageErrors: [] };

async function run() {
  const { port: redisPort, client: redis } = await startRedis(until);
  const wsPort = await freePort();
  let wsproxy = await startWsproxy(wsPort, redisPort);
  const base = `http://127.0.0.1:${wsPort}`;
  say(`redis-server on ${redisPort}, wsproxy ${WSPROXY_BIN} on ${wsPort} (ready in ${wsproxy.readyMs} ms)`);

  const st = await startStaticServer();
  started.staticServer = st.server;
  started.browser = await chromium.launch({
    executablePath: CHROMIUM_PATH,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    timeout: 30_000,
  });
  const page = await (await started.browser.newContext()).newPage();
  page.setDefaultTimeout(STEP_MS);
  page.on('console', (m) => diagnostics.console.push(`${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => diagnostics.pageErrors.push(String(e && e.stack ? e.stack : e)));
  // The stream requests the browser makes, with their headers, and the answers.
  const streamRequests = [];
  const posts = [];
  const sockets = [];
  page.on('websocket', (ws) => sockets.push(ws.url()));
  page.on('request', (req) => {
    if (/\/sse\//.test(req.url()) && req.method() === 'POST') {
      const entry = { url: req.url(), body: req.postData() };
      posts.push(entry);
      entry.done = req.allHeaders().then((h) => { entry.headers = h; }, () => {});
    }
    if (/\/sse\//.test(req.url()) && req.method() === 'GET') {
      const entry = { url: req.url(), headers: req.headers(), status: null, t: Date.now() };
      streamRequests.push(entry);
      // allHeaders: what went on the wire, Last-Event-ID included.
      entry.done = Promise.all([
        req.allHeaders().then((h) => { entry.headers = h; }, () => {}),
        req.response().then((res) => { entry.status = res ? res.status() : null; }, () => {}),
      ]);
    }
  });
  const resp = await page.goto(`${st.origin}/`, { waitUntil: 'load' });
  check(resp && resp.status() === 200, `test page: HTTP ${resp && resp.status()}`);
  await page.waitForFunction(() => window.e2eReady === true).catch(() => {
    throw new TestFailure(`session.js did not load in the page: ${diagnostics.pageErrors.join('\n')}`);
  });
  say(`Chromium ${started.browser.version()}, page ${st.origin}, wsproxy ${base} (cross-origin)`);

  const nonce = `${Date.now().toString(36)}-${randomBytes(3).toString('hex')}`;
  const newSession = async (sessionId) => {
    const token = randomBytes(16).toString('hex');
    await redis.command('SETEX', `session:${sessionId}:auth`, 300, token);
    return token;
  };
  const rawBrief = () => page.evaluate(() => window.rawBrief());
  const rawDetail = async () => JSON.stringify(await rawBrief());

  // 1. 500 messages, wsproxy SIGKILLed and restarted in the middle ---------------
  const sid = `sse-e2e-${nonce}`;
  const token = await newSession(sid);
  const history = `session:${sid}:history`;
  const url = `${base}/${AGENT}/sse/${sid}?reliable=true&access_token=${token}`;
  await page.evaluate((u) => window.openRaw(u), url);
  const first = await until('raw: the welcome', async () => (await rawBrief()).welcomes[0], rawDetail);
  const epoch = first.welcome.epoch;
  check(typeof epoch === 'string' && first.welcome.resumed === undefined && first.id === `${epoch}:${first.welcome.offset}`, `raw: first welcome ${JSON.stringify(first)}`);

  const published = [];
  const publish = async (n) => {
    const data = JSON.stringify({ n, text: `message ${n}`, nonce });
    const offset = await redis.command('FCALL', 'wsproxy_publish', 1, history, data);
    published[n - 1] = { data, offset };
  };
  let killedAt = null;
  let restarted = null;
  let deliveredBeforeKill = null;
  const t0 = Date.now();
  for (let n = 1; n <= TOTAL; n += 1) {
    const due = t0 + (n - 1) * PACE_MS;
    if (Date.now() < due) await sleep(due - Date.now());
    await publish(n);
    if (n === KILL_AFTER) {
      // Mid-stream: the page must have been receiving live.
      deliveredBeforeKill = (await rawBrief()).count;
      check(deliveredBeforeKill > KILL_AFTER / 4, `raw: only ${deliveredBeforeKill} of ${KILL_AFTER} messages delivered before the kill; ${await rawDetail()}`);
      const old = wsproxy;
      killedAt = Date.now();
      // Publishing goes on while the process dies and another starts on the same port.
      restarted = sigkill(old).then(() => startWsproxy(wsPort, redisPort));
    }
  }
  const publishMs = Date.now() - t0;
  wsproxy = await restarted;
  say(`published ${TOTAL} messages in ${publishMs} ms; wsproxy SIGKILLed after message ${KILL_AFTER} (${deliveredBeforeKill} delivered by then), the new one ready ${wsproxy.readyMs} ms after its start`);

  await until(`raw: ${TOTAL} messages`, async () => (await rawBrief()).count >= TOTAL, rawDetail, 30_000);
  await sleep(300); // anything extra would come now
  const events = await page.evaluate(() => window.rawEvents());
  check(events.length === TOTAL, `raw: ${events.length} messages, expected ${TOTAL}: extra ${JSON.stringify(events.slice(TOTAL, TOTAL + 3))}`);
  for (let i = 0; i < TOTAL; i += 1) {
    const want = { id: `${epoch}:${published[i].offset}`, data: published[i].data };
    const got = { id: events[i].id, data: events[i].data };
    check(isDeepStrictEqual(got, want), `raw: message ${i + 1} is ${JSON.stringify(got)}, expected ${JSON.stringify(want)} (lost, duplicated or out of order)`);
  }
  const b = await rawBrief();
  check(b.welcomes.length === 2, `raw: ${b.welcomes.length} welcomes, expected 2 (the first, the resume): ${JSON.stringify(b.welcomes)}`);
  const w2 = b.welcomes[1];
  // The message the page had last before the resume, and the next one.
  const lastBefore = events.filter((e) => e.seq < w2.seq).at(-1);
  const firstAfter = events.find((e) => e.seq > w2.seq);
  const lastIndex = events.indexOf(lastBefore);
  check(
    w2.welcome.resumed === true && w2.welcome.epoch === epoch && w2.welcome.replayed > 0,
    `raw: the reconnect's welcome is ${JSON.stringify(w2.welcome)}, expected resumed:true with a replay`,
  );
  // What the reconnect asked for: the browser's own header, not the URL.
  await Promise.all(streamRequests.map((r) => r.done));
  const resumes = streamRequests.filter((r) => r.headers['last-event-id'] !== undefined);
  check(resumes.length >= 1, `raw: no stream request carried Last-Event-ID: ${JSON.stringify(streamRequests.map((r) => ({ url: r.url.replace(token, 'T'), status: r.status })))}`);
  check(
    resumes.every((r) => r.headers['last-event-id'] === lastBefore.id && !r.url.includes('last_event_id')),
    `raw: reconnects asked for ${JSON.stringify(resumes.map((r) => r.headers['last-event-id']))}, expected ${lastBefore.id} (message ${lastIndex + 1}, the last one seen)`,
  );
  const topIndex = published.findIndex((p) => p.offset === w2.welcome.offset);
  check(
    topIndex - lastIndex === w2.welcome.replayed,
    `raw: the resume replayed ${w2.welcome.replayed}, but ${topIndex - lastIndex} were published after message ${lastIndex + 1} up to the welcome's offset`,
  );
  const gapMs = firstAfter.t - lastBefore.t;
  say(
    `bare EventSource: ${TOTAL} messages once, in order, byte for byte, ids <epoch>:<offset>; ` +
      `resumed with Last-Event-ID ${lastBefore.id.split(':')[1]} (message ${lastIndex + 1}), ${w2.welcome.replayed} replayed; ` +
      `gap: ${gapMs} ms between message ${lastIndex + 1} and ${lastIndex + 2}, welcome ${w2.t - killedAt} ms after the SIGKILL ` +
      `(${resumes.length} reconnect request(s) with Last-Event-ID, ${b.errors.length} error event(s))`,
  );

  // 2. A revoke ends the stream ------------------------------------------------------
  const requestsBefore = streamRequests.length;
  const revoke = JSON.stringify({ type: 'disconnect', session_id: sid, code: 4001, reason: 'revoked' });
  await redis.command('MULTI');
  await redis.command('DEL', `session:${sid}:auth`);
  await redis.command('PUBLISH', 'wsproxy:control', revoke);
  const [deleted] = await redis.command('EXEC');
  check(deleted === 1, `revoke: DEL removed ${deleted} keys`);
  const revokedAt = Date.now();
  const closed = await until('raw: the close event', async () => (await rawBrief()).closes[0], rawDetail);
  check(isDeepStrictEqual(closed.close, { code: 4001, reason: 'revoked' }), `raw: close event ${JSON.stringify(closed.close)}`);
  const ended = await until('raw: readyState CLOSED', async () => {
    const s = await rawBrief();
    return s.readyState === 2 ? s : null;
  }, rawDetail);
  const refusals = streamRequests.slice(requestsBefore);
  await Promise.all(refusals.map((r) => r.done));
  check(refusals.length === 1 && refusals[0].status === 403, `raw: after the revoke the browser made ${JSON.stringify(refusals.map((r) => r.status))} requests, expected one refused with 403`);
  check(ended.count === TOTAL && ended.errors.at(-1).readyState === 2, `raw: after the revoke: ${JSON.stringify(ended)}`);
  say(`revoke: close event {code 4001, revoked} ${closed.t - revokedAt} ms after the MULTI, the reconnect got 403, EventSource CLOSED ${ended.errors.at(-1).t - revokedAt} ms after it`);

  // 3. session.js over SSE ------------------------------------------------------------
  const sid2 = `sse-e2e-lib-${nonce}`;
  const token2 = await newSession(sid2);
  const history2 = `session:${sid2}:history`;
  const [redisSeconds] = await redis.command('TIME');
  const sinceId = `${(Number(redisSeconds) - 5) * 1000}-0`;
  const upEntries = async (sessionId) => {
    const out = [];
    let cursor = '0';
    do {
      const [next, keys] = await redis.command('SCAN', cursor, 'MATCH', 'wsproxy:up:*', 'COUNT', 1000, 'TYPE', 'stream');
      cursor = next;
      for (const stream of keys.filter((k) => /^wsproxy:up:\d+$/.test(k))) {
        for (const [entryId, fields] of await redis.command('XRANGE', stream, sinceId, '+')) {
          const e = { stream, entryId };
          for (let i = 0; i < fields.length; i += 2) e[fields[i]] = fields[i + 1];
          if (e.session === sessionId) out.push(e);
        }
      }
    } while (cursor !== '0');
    return out;
  };
  const snap = () => page.evaluate(() => window.snapshot('lib'));
  const brief = async () => {
    const s = await snap();
    return `lib: state ${s.state}, ${s.messages.length} messages, welcomes ${JSON.stringify(s.welcomes)}, errors ${JSON.stringify(s.errors.slice(-5))}, sends ${JSON.stringify(s.sends)}, states ${JSON.stringify(s.states.slice(-8))}`;
  };
  const send = (data, options) => page.evaluate(([d, o]) => window.sendRecorded('lib', d, o), [data, options]);
  const published2 = [];
  const publish2 = async (n) => {
    const data = { n, lib: true };
    published2.push({ data, offset: await redis.command('FCALL', 'wsproxy_publish', 1, history2, JSON.stringify(data)) });
  };
  const expectMessages = async (count, what) => {
    await until(`${what}: ${count} messages`, async () => (await snap()).messages.length >= count, brief);
    await sleep(100);
    const s = await snap();
    const want = published2.map((p) => ({ data: p.data, offset: p.offset }));
    const got = s.messages.map((m) => ({ data: m.data, offset: m.offset }));
    check(isDeepStrictEqual(got, want), `${what}: got ${JSON.stringify(got)}, expected ${JSON.stringify(want)}`);
    return s;
  };

  const lib = await page.evaluate(
    ([o]) => window.openRecorded('lib', o),
    [{ url: base, agentId: AGENT, sessionId: sid2, token: token2, transport: 'sse', backoff: { initialMs: 100, maxMs: 1000 } }],
  );
  check(lib.welcome && lib.welcome.type === 'welcome' && lib.welcome.epoch, `lib: ready gave ${JSON.stringify(lib)}; ${await brief()}`);
  for (let n = 1; n <= 3; n += 1) await publish2(n);
  await expectMessages(3, 'lib: down');
  const k = [];
  for (let i = 1; i <= 3; i += 1) k.push(await send({ up: i, nonce }));
  await until('lib: 3 acks', async () => (await snap()).sends.every((x) => x.status !== 'pending'), brief);
  let s = await snap();
  for (const i of k) check(s.sends[i].status === 'acked' && s.sends[i].ack.duplicate === false, `lib: send ${i + 1}: ${JSON.stringify(s.sends[i])}`);
  const firstId = s.sends[k[0]].ack.id;
  const dup = await send({ up: 1, nonce }, { id: firstId });
  await until('lib: the resend answered', async () => (await snap()).sends[dup].status !== 'pending', brief);
  s = await snap();
  check(s.sends[dup].status === 'acked' && s.sends[dup].ack.duplicate === true && s.sends[dup].ack.offset === s.sends[k[0]].ack.offset, `lib: resend with id ${firstId}: ${JSON.stringify(s.sends[dup])}`);
  // Over HTTP, not a WebSocket: one stream, and a POST per message with the token as Bearer.
  await Promise.all(posts.map((p) => p.done));
  const libStreams = streamRequests.filter((r) => r.url.includes(`/sse/${sid2}?`));
  check(
    libStreams.length === 1 && new URL(libStreams[0].url).searchParams.get('reliable') === 'true' && sockets.length === 0,
    `lib: stream requests ${JSON.stringify(libStreams.map((r) => r.url.replace(token2, 'T')))}, WebSockets ${JSON.stringify(sockets)}; expected one SSE stream, no WebSocket`,
  );
  const libPosts = posts.filter((p) => p.url.endsWith(`/sse/${sid2}?reliable=true`));
  check(
    libPosts.length === 4 && libPosts.every((p) => p.headers.authorization === `Bearer ${token2}` && JSON.parse(p.body).type === 'message'),
    `lib: POSTs ${JSON.stringify(posts.map((p) => ({ url: p.url, auth: p.headers && p.headers.authorization && 'Bearer …', body: p.body })))}; expected 4 to ?reliable=true with the token as Bearer`,
  );
  let up = await upEntries(sid2);
  const acked = k.map((i) => ({ id: s.sends[i].ack.id, offset: s.sends[i].ack.offset }));
  check(
    isDeepStrictEqual(up.map((e) => ({ id: e.id, offset: e.entryId })), acked),
    `lib: wsproxy:up:{n} holds ${JSON.stringify(up)}, expected each acknowledged message once: ${JSON.stringify(acked)}`,
  );
  say(`session.js over SSE: 3 messages down with offsets, 3 up by POST acknowledged and stored once in ${up[0].stream}, a resend acknowledged as a duplicate`);

  // A POST whose answer is lost: the server stored the message, the page saw
  // a network error. session.js sends it again with the same id.
  let lost = 0;
  await page.route('**/sse/**', async (route) => {
    if (route.request().method() !== 'POST' || lost > 0) return route.fallback();
    lost += 1;
    await route.fetch(); // reaches wsproxy: stored
    return route.abort('connectionreset');
  });
  const lostK = await send({ up: 'answer lost', nonce });
  await until('lib: the message whose answer was lost acknowledged', async () => (await snap()).sends[lostK].status !== 'pending', brief);
  await page.unroute('**/sse/**');
  s = await snap();
  check(lost === 1 && s.sends[lostK].status === 'acked' && s.sends[lostK].ack.duplicate === true, `lib: the resend after a lost answer: ${JSON.stringify(s.sends[lostK])}, expected duplicate:true`);
  check(s.errors.some((e) => e.code === 'post_failed'), `lib: the failed POST was not reported: ${JSON.stringify(s.errors)}`);
  up = await upEntries(sid2);
  check(up.filter((e) => e.id === s.sends[lostK].ack.id).length === 1 && up.length === 4, `lib: wsproxy:up:{n} after the lost answer: ${JSON.stringify(up)}`);
  say('session.js over SSE: a POST whose answer was lost is sent again with its id, acknowledged as a duplicate, stored once');

  // wsproxy SIGKILLed again; a message sent while it is down.
  await sigkill(wsproxy);
  const offline = await send({ up: 'offline', nonce });
  for (let n = 4; n <= 8; n += 1) await publish2(n);
  wsproxy = await startWsproxy(wsPort, redisPort);
  await expectMessages(8, 'lib: after the restart');
  await until('lib: the message sent while down acknowledged', async () => (await snap()).sends[offline].status !== 'pending', brief);
  s = await snap();
  check(s.sends[offline].status === 'acked' && s.sends[offline].ack.duplicate === false, `lib: offline send: ${JSON.stringify(s.sends[offline])}`);
  const resumedWelcome = s.welcomes.at(-1);
  check(s.welcomes.length === 2 && resumedWelcome.resumed === true && resumedWelcome.replayed === 5, `lib: welcomes ${JSON.stringify(s.welcomes)}, expected a resume replaying 5`);
  check(s.resumeFailed.length === 0 && s.duplicatesDropped === 0, `lib: resumeFailed ${JSON.stringify(s.resumeFailed)}, ${s.duplicatesDropped} duplicates dropped`);
  up = await upEntries(sid2);
  const offlineId = s.sends[offline].ack.id;
  check(up.filter((e) => e.id === offlineId).length === 1 && up.length === 5, `lib: wsproxy:up:{n} after the restart: ${JSON.stringify(up)}`);
  say(`session.js over SSE: after a SIGKILL and restart, resumed (5 replayed, none twice), the message sent while down stored once (${s.errors.length} errors reported on the way)`);

  // A backend disconnect (code >= 4000) ends the session without reconnecting.
  const requestsBeforeEnd = streamRequests.length;
  await redis.command('PUBLISH', 'wsproxy:control', JSON.stringify({ type: 'disconnect', session_id: sid2, code: 4002, reason: 'done' }));
  await until('lib: closed', async () => (await snap()).state === 'closed', brief);
  await sleep(2_500); // longer than retry: 2000
  s = await snap();
  const fatal = s.errors.at(-1);
  check(fatal.code === 'server_closed' && fatal.fatal && /4002/.test(fatal.message), `lib: the session ended with ${JSON.stringify(fatal)}`);
  check(streamRequests.length === requestsBeforeEnd, `lib: ${streamRequests.length - requestsBeforeEnd} stream requests after a backend disconnect, expected none`);
  say('session.js over SSE: a control disconnect with code 4002 closed the session (server_closed), no reconnect');

  // 3b. session.js over SSE, plain ------------------------------------------------------
  const sid3 = `sse-e2e-plain-${nonce}`;
  const token3 = await newSession(sid3);
  const sub = await Redis.connect(redisPort);
  processes.redis.push(sub);
  const upPlain = [];
  await sub.command('SUBSCRIBE', `session:${sid3}:up`);
  sub.onMessage = (channel, message) => upPlain.push(message);
  const plainSnap = () => page.evaluate(() => window.snapshot('plain'));
  const plainReady = await page.evaluate(
    ([o]) => window.openRecorded('plain', o),
    [{ url: base, agentId: AGENT, sessionId: sid3, token: token3, transport: 'sse', reliable: false }],
  );
  check(plainReady.welcome === null, `plain: ready gave ${JSON.stringify(plainReady)}`);
  await redis.command('PUBLISH', `session:${sid3}:down`, 'raw text,\nnot JSON');
  await redis.command('PUBLISH', `session:${sid3}:down`, Buffer.from([0xff, 0x00, 0x41]));
  await until('plain: two messages', async () => (await plainSnap()).messages.length >= 2, async () => JSON.stringify(await plainSnap()));
  s = await plainSnap();
  check(
    isDeepStrictEqual(s.messages, [{ data: 'raw text,\nnot JSON' }, { data: { bytes: [0xff, 0x00, 0x41] } }]),
    `plain: got ${JSON.stringify(s.messages)}, expected the text byte for byte and the bytes as an ArrayBuffer`,
  );
  const plainK = await page.evaluate(([d]) => window.sendRecorded('plain', d), [{ hello: 'plain', nonce }]);
  await until('plain: the POST answered', async () => (await plainSnap()).sends[plainK].status !== 'pending');
  await until('plain: session:{id}:up', async () => upPlain.length >= 1);
  s = await plainSnap();
  check(s.sends[plainK].status === 'acked' && upPlain[0] === JSON.stringify({ hello: 'plain', nonce }), `plain: send gave ${JSON.stringify(s.sends[plainK])}, session:{id}:up got ${JSON.stringify(upPlain)}`);
  const plainPost = posts.filter((p) => p.url.endsWith(`/sse/${sid3}`));
  check(plainPost.length === 1, `plain: POSTs ${JSON.stringify(posts.map((p) => p.url))}, expected one without reliable=true`);
  await page.evaluate(() => window.rec.plain.session.close());
  say('session.js over SSE, plain: text (with a line feed) and bytes down as published, JSON up by POST on session:{id}:up');

  // 4. A scripted event stream: a drop between a resume's welcome and its replay ----
  // The EventSource's last id is then the welcome's (the newest offset), so
  // its own reconnect would skip the replay: session.js must reconnect from
  // the last message it delivered instead.
  const script = { requests: [] };
  started.scripted = http.createServer((req, res) => {
    const u = new URL(req.url, 'http://scripted');
    script.requests.push({ position: u.searchParams.get('last_event_id'), header: req.headers['last-event-id'] ?? null });
    res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache', 'access-control-allow-origin': '*' });
    const welcome = (w) => `event: welcome\nid: E1:${w.offset}\ndata: ${JSON.stringify({ type: 'welcome', session_id: 'scripted', epoch: 'E1', ...w })}\n\n`;
    const message = (offset) => `id: E1:${offset}\ndata: ${JSON.stringify({ at: offset })}\n\n`;
    const n = script.requests.length;
    if (n === 1) {
      res.write('retry: 100\n\n' + welcome({ offset: '5-0' }) + message('6-0') + message('7-0'));
      setTimeout(() => res.end(), 100); // the stream ends: the EventSource reconnects with E1:7-0
    } else if (n === 2) {
      res.write(welcome({ offset: '10-0', resumed: true, replayed: 3 }));
      setTimeout(() => res.socket.destroy(), 100); // dropped with 8-0, 9-0 and 10-0 still to come
    } else {
      const from = (script.requests[n - 1].header ?? script.requests[n - 1].position ?? '').replace('E1:', '');
      const rest = ['6-0', '7-0', '8-0', '9-0', '10-0'].filter((o) => Number(o.split('-')[0]) > Number(from.split('-')[0]));
      res.write(welcome({ offset: '10-0', resumed: true, replayed: rest.length }) + rest.map(message).join(''));
    }
  });
  await new Promise((resolve) => started.scripted.listen(0, '127.0.0.1', resolve));
  const scripted = await page.evaluate(
    ([o]) => window.openRecorded('scripted', o),
    [{ url: `http://127.0.0.1:${started.scripted.address().port}`, agentId: AGENT, sessionId: 'scripted', token: 't', transport: 'sse', backoff: { initialMs: 50, maxMs: 100 } }],
  );
  check(scripted.welcome, `scripted: not ready: ${JSON.stringify(scripted)}`);
  const scriptedSnap = () => page.evaluate(() => window.snapshot('scripted'));
  await until('scripted: 5 messages', async () => (await scriptedSnap()).messages.length >= 5, async () => JSON.stringify({ ...(await scriptedSnap()), requests: script.requests }));
  await sleep(300);
  s = await scriptedSnap();
  check(
    isDeepStrictEqual(s.messages.map((m) => m.offset), ['6-0', '7-0', '8-0', '9-0', '10-0']) && s.resumeFailed.length === 0,
    `scripted: delivered ${JSON.stringify(s.messages.map((m) => m.offset))}, expected 6-0 to 10-0 once each`,
  );
  check(
    isDeepStrictEqual(script.requests, [{ position: null, header: null }, { position: null, header: 'E1:7-0' }, { position: 'E1:7-0', header: null }]),
    `scripted: the stream requests asked for ${JSON.stringify(script.requests)}; expected the EventSource's own resume from E1:7-0, then, after the drop before the replay, session.js's from E1:7-0 (not the welcome's E1:10-0)`,
  );
  await page.evaluate(() => window.rec.scripted.session.close());
  say('scripted stream: the EventSource resumed by itself (Last-Event-ID E1:7-0); dropped before the replay, session.js reopened from its own position (last_event_id=E1:7-0), not the welcome\'s E1:10-0');

  // 5. Refused streams: a wrong token, a server with reliable sessions off ------------
  const refusedSnap = (name) => page.evaluate((n) => window.snapshot(n), name);
  const settled = (name) =>
    page.evaluate(
      ([n, ms]) => Promise.race([window.rec[n].ready, new Promise((r) => setTimeout(() => r({ code: 'test: still not settled' }), ms))]),
      [name, STEP_MS],
    );
  await page.evaluate(
    ([o]) => { window.openRecorded('badtoken', o); },
    [{ url: base, agentId: AGENT, sessionId: sid2, token: 'not-the-token', transport: 'sse', backoff: { initialMs: 50, maxMs: 100, maxAttempts: 2 } }],
  );
  const badToken = await settled('badtoken');
  s = await refusedSnap('badtoken');
  check(
    badToken.code === 'gave_up' && s.errors.filter((e) => e.code === 'connect_failed' && /HTTP 403 invalid_token/.test(e.message)).length === 2,
    `badtoken: ready gave ${JSON.stringify(badToken)}, errors ${JSON.stringify(s.errors)}; expected two attempts refused with 403 invalid_token, then gave_up`,
  );
  const offPort = await freePort();
  await startWsproxy(offPort, redisPort, { RELIABLE_SESSIONS: 'false' });
  await page.evaluate(
    ([o]) => { window.openRecorded('off', o); },
    [{ url: `http://127.0.0.1:${offPort}`, agentId: AGENT, sessionId: sid2, token: token2, transport: 'sse', backoff: { initialMs: 50, maxMs: 100 } }],
  );
  const off = await settled('off');
  s = await refusedSnap('off');
  check(off.code === 'reliable_unavailable' && s.state === 'closed', `off: ready gave ${JSON.stringify(off)}, state ${s.state}; expected reliable_unavailable`);
  say(`refused streams: a wrong token is reported as HTTP 403 invalid_token (then gave_up after maxAttempts), reliable sessions off is ${off.code} at once`);

  check(diagnostics.pageErrors.length === 0, `page errors: ${diagnostics.pageErrors.join('\n')}`);
}

async function cleanup() {
  const { browser, staticServer, scripted } = started;
  started.browser = started.staticServer = started.scripted = null;
  if (browser) await Promise.race([browser.close().catch(() => {}), sleep(10_000)]);
  closeRedisClients();
  for (const server of [staticServer, scripted]) {
    if (!server) continue;
    server.closeAllConnections?.();
    await new Promise((r) => server.close(() => r()));
  }
  await killChildren();
}

runMain({
  tag: 'sse-e2e',
  run,
  cleanup,
  report: (err) => {
    console.error(`\n[sse-e2e] FAILED: ${describeFailure(err)}`);
    printDiagnostics('sse-e2e', diagnostics);
    printChildLogs('sse-e2e');
  },
  timeoutMs: TIMEOUT_MS,
  hardStopMs: 20_000,
});
