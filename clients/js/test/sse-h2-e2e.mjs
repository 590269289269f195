#!/usr/bin/env node
// Real-browser end-to-end test of sessions over TLS with HTTP/2: Chromium's
// own EventSource, fetch and WebSocket on a page served by wsproxy itself
// (same origin, no CORS), against a wsproxy this test starts with a
// throwaway self-signed certificate, on a redis-server it starts itself.
//
//   WSPROXY_BIN=../../target/debug/wsproxy node test/sse-h2-e2e.mjs
//
// WSPROXY_BIN defaults to ../../target/debug/wsproxy from clients/js (a
// relative WSPROXY_BIN is from the current directory); redis-server and
// openssl must be on PATH. Optional: CHROMIUM_PATH (default
// /usr/bin/chromium), E2E_TIMEOUT_MS (default 90000).
//
// The backend is this process, as in sse-e2e.mjs: it stores session tokens
// with SETEX and publishes (FCALL wsproxy_publish, PUBLISH), speaking RESP
// itself.
//
// What happens:
//   1. openssl makes a P-256 certificate for IP 127.0.0.1 (one day) in a
//      temporary directory; wsproxy starts with TLS_CERT_FILE/TLS_KEY_FILE
//      and RELIABLE_SESSIONS=true; Chromium (certificate errors ignored)
//      opens https://127.0.0.1:<port>/health, and everything else runs in
//      that page;
//   2. two EventSources at once, token as ?access_token=: session A
//      resumable (?reliable=true), session B plain; plus a WebSocket
//      (wss://) on session B. 40 messages to each session, interleaved:
//      A's arrive once, in order, byte for byte, with ids <epoch>:<offset>;
//      B's arrive once, in order, on its stream and on the WebSocket alike;
//   3. a fetch POST on each: A's (reliable) is acknowledged and stored once
//      in wsproxy:up:{n}, B's (plain) is answered "published" and arrives
//      on session:B:up, as does a message the WebSocket sends;
//   4. a control disconnect (code 4002) ends both streams and the
//      WebSocket: the page sees event: close with the code, and the
//      WebSocket its close code;
//   5. the point: performance.getEntriesByType('resource') has
//      nextHopProtocol 'h2' for both event streams and both POSTs (and the
//      page's navigation is h2), and Chromium's own network log (DevTools
//      protocol) says the streams and POSTs went over ONE connection, while
//      the WebSocket was a 101 upgrade (HTTP/1.1: wsproxy offers no RFC 8441
//      extended CONNECT).
// Exit status 0 on success, 1 on any failure (with the reason on stderr).

import https from 'node:https';
import os from 'node:os';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
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
const WSPROXY_BIN = process.env.WSPROXY_BIN ? path.resolve(process.env.WSPROXY_BIN) : path.resolve(HERE, '..', '../../target/debug/wsproxy');
const CHROMIUM_PATH = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const TIMEOUT_MS = Number(process.env.E2E_TIMEOUT_MS || 90_000);
const STEP_MS = 15_000;
const AGENT = 'sse-h2-e2e';
/** Messages published to each of the two sessions. */
const EACH = 40;

const say = (msg) => console.log(`[sse-h2-e2e] ${msg}`);
const until = makeUntil(STEP_MS, 25);

// ---------------------------------------------------------------------------
// Processes (harness.mjs): a private redis-server, a wsproxy with TLS, a certificate.

const started = { browser: null, tmp: null };

/** A throwaway self-signed certificate for IP 127.0.0.1, valid one day. */
function makeCertificate() {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'sse-h2-e2e-'));
  started.tmp = dir;
  const cert = path.join(dir, 'cert.pem');
  const key = path.join(dir, 'key.pem');
  const r = spawnSync(
    'openssl',
    ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-days', '1',
      '-subj', '/CN=127.0.0.1', '-addext', 'subjectAltName=IP:127.0.0.1', '-keyout', key, '-out', cert],
    { encoding: 'utf8' },
  );
  if (r.error) throw new TestFailure(`openssl: ${r.error.code === 'ENOENT' ? 'not on PATH (needed for the test certificate)' : r.error.message}`);
  check(r.status === 0, `openssl req exited with ${r.status}: ${r.stderr}`);
  return { cert, key, pem: readFileSync(cert) };
}

/** GET over HTTPS, trusting only the test certificate. */
function httpsGet(port, pathname, ca) {
  return new Promise((resolve, reject) => {
    const req = https.get({ host: '127.0.0.1', port, path: pathname, ca, timeout: 2_000 }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (c) => { body += c; });
      res.on('end', () => resolve({ status: res.statusCode, body }));
    });
    req.on('timeout', () => req.destroy(new Error('timeout')));
    req.on('error', reject);
  });
}

async function startWsproxy(port, redisPort, cert, settings = {}) {
  // Only what this test sets: no setting of the caller's environment may change the server.
  const env = {
    PATH: process.env.PATH,
    HOST: '127.0.0.1',
    PORT: String(port),
    REDIS_URL: `redis://127.0.0.1:${redisPort}`,
    RELIABLE_SESSIONS: 'true',
    TLS_CERT_FILE: cert.cert,
    TLS_KEY_FILE: cert.key,
    RUST_LOG: 'warn',
    ...settings,
  };
  const child = launch(`wsproxy:${port}`, WSPROXY_BIN, [], env);
  const t0 = Date.now();
  await until(`wsproxy (${WSPROXY_BIN}) ready on https://127.0.0.1:${port}`, async () => {
    const exited = await Promise.race([child.exited, sleep(0).then(() => null)]);
    if (exited) throw new TestFailure(`wsproxy exited (${JSON.stringify(exited)}): ${processes.logs.at(-1).lines.slice(-10).join('\n')}`);
    try {
      return (await httpsGet(port, '/ready', cert.pem)).status === 200;
    } catch {
      return false;
    }
  });
  child.readyMs = Date.now() - t0;
  return child;
}

// ---------------------------------------------------------------------------
// What the page runs (page.evaluate on wsproxy's own /health): recorders for
// EventSources, a WebSocket and POSTs.

function installRecorders() {
  const rec = { streams: {}, sockets: {}, posts: [] };
  window.rec = rec;
  window.openStream = (name, url) => {
    const r = { url, events: [], welcomes: [], closes: [], errors: [], opens: 0 };
    rec.streams[name] = r;
    const es = new EventSource(url);
    r.es = es;
    es.onopen = () => { r.opens += 1; };
    es.onmessage = (e) => r.events.push({ id: e.lastEventId, data: e.data });
    es.addEventListener('welcome', (e) => r.welcomes.push({ id: e.lastEventId, welcome: JSON.parse(e.data) }));
    es.addEventListener('close', (e) => {
      const close = JSON.parse(e.data);
      r.closes.push(close);
      if (close.code >= 4000) es.close(); // the backend ended it: do not come back
    });
    es.onerror = () => r.errors.push({ readyState: es.readyState });
  };
  window.openSocket = (name, url) => {
    const r = { url, messages: [], opened: false, close: null, errors: 0 };
    rec.sockets[name] = r;
    const ws = new WebSocket(url);
    r.ws = ws;
    ws.onopen = () => { r.opened = true; };
    ws.onmessage = (e) => r.messages.push(e.data);
    ws.onclose = (e) => { r.close = { code: e.code, reason: e.reason }; };
    ws.onerror = () => { r.errors += 1; };
  };
  window.post = async (url, body) => {
    const entry = { url, status: null, answer: null };
    rec.posts.push(entry);
    try {
      const res = await fetch(url, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
      entry.status = res.status;
      const text = await res.text();
      try { entry.answer = JSON.parse(text); } catch { entry.answer = text; }
    } catch (e) {
      entry.error = String(e);
    }
    return { status: entry.status, answer: entry.answer, error: entry.error };
  };
  window.brief = () => {
    const out = { streams: {}, sockets: {} };
    for (const [k, { es, ...r }] of Object.entries(rec.streams)) out.streams[k] = { ...r, readyState: es.readyState, count: r.events.length, events: undefined };
    for (const [k, { ws, ...r }] of Object.entries(rec.sockets)) out.sockets[k] = { ...r, readyState: ws.readyState, count: r.messages.length, messages: undefined };
    return out;
  };
  window.resources = () =>
    [...performance.getEntriesByType('navigation'), ...performance.getEntriesByType('resource')].map((e) => ({
      type: e.entryType,
      name: e.name,
      initiatorType: e.initiatorType,
      nextHopProtocol: e.nextHopProtocol,
    }));
  return true;
}

// ---------------------------------------------------------------------------

const diagnostics = { console: [], pageErrors: [] };

async function run() {
  const cert = makeCertificate();
  const { port: redisPort, client: redis } = await startRedis(until);
  const port = await freePort();
  const origin = `https://127.0.0.1:${port}`;
  // The default origin rule (same origin only): over HTTP/2 a browser
  // names the host in :authority, never in a Host header, and wsproxy must
  // still see the page's POSTs (which carry Origin) as same-origin (they
  // were refused 403 origin_not_allowed until it copied :authority).
  const wsproxy = await startWsproxy(port, redisPort, cert, {});
  say(`openssl certificate for 127.0.0.1 in ${started.tmp}; redis-server on ${redisPort}; wsproxy ${WSPROXY_BIN} on ${origin} (ready in ${wsproxy.readyMs} ms)`);

  started.browser = await chromium.launch({
    executablePath: CHROMIUM_PATH,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    timeout: 30_000,
  });
  const context = await started.browser.newContext({ ignoreHTTPSErrors: true });
  const page = await context.newPage();
  page.setDefaultTimeout(STEP_MS);
  page.on('console', (m) => diagnostics.console.push(`${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => diagnostics.pageErrors.push(String(e && e.stack ? e.stack : e)));

  // Chromium's own network log: the protocol and connection of each response,
  // and the WebSocket handshake's status.
  const cdp = await context.newCDPSession(page);
  const netlog = { requests: new Map(), responses: [], wsHandshakes: [] };
  cdp.on('Network.requestWillBeSent', (e) => netlog.requests.set(e.requestId, { url: e.request.url, method: e.request.method }));
  cdp.on('Network.responseReceived', (e) => {
    const req = netlog.requests.get(e.requestId) || {};
    netlog.responses.push({ url: e.response.url, method: req.method, status: e.response.status, protocol: e.response.protocol, connectionId: e.response.connectionId });
  });
  cdp.on('Network.webSocketHandshakeResponseReceived', (e) => netlog.wsHandshakes.push({ status: e.response.status }));
  await cdp.send('Network.enable');

  const resp = await page.goto(`${origin}/health`, { waitUntil: 'load' });
  check(resp && resp.status() === 200, `${origin}/health: HTTP ${resp && resp.status()}`);
  check(await page.evaluate(installRecorders), 'the recorders did not install');
  say(`Chromium ${started.browser.version()}, page ${origin}/health (certificate errors ignored), everything same-origin`);

  const nonce = `${Date.now().toString(36)}-${randomBytes(3).toString('hex')}`;
  const newSession = async (sessionId) => {
    const token = randomBytes(16).toString('hex');
    await redis.command('SETEX', `session:${sessionId}:auth`, 300, token);
    return token;
  };
  const brief = () => page.evaluate(() => window.brief());
  const detail = async () => JSON.stringify(await brief());

  // 2. Two event streams and a WebSocket ---------------------------------------------
  const sidA = `h2-a-${nonce}`;
  const sidB = `h2-b-${nonce}`;
  const tokenA = await newSession(sidA);
  const tokenB = await newSession(sidB);
  const streamA = `/${AGENT}/sse/${sidA}?reliable=true&access_token=${tokenA}`;
  const streamB = `/${AGENT}/sse/${sidB}?access_token=${tokenB}`;
  const socketB = `wss://127.0.0.1:${port}/${AGENT}/ws/${sidB}?access_token=${tokenB}`;
  const up = await Redis.connect(redisPort);
  processes.redis.push(up);
  const upB = [];
  await up.command('SUBSCRIBE', `session:${sidB}:up`);
  up.onMessage = (channel, message) => upB.push(message);

  await page.evaluate(([a, b, w]) => {
    window.openStream('A', a);
    window.openStream('B', b);
    window.openSocket('B', w);
  }, [streamA, streamB, socketB]);
  const ready = await until('both streams open, A welcomed, the WebSocket open', async () => {
    const s = await brief();
    return s.streams.A.opens === 1 && s.streams.A.welcomes.length === 1 && s.streams.B.opens === 1 && s.sockets.B.opened ? s : null;
  }, detail);
  const welcome = ready.streams.A.welcomes[0];
  const epoch = welcome.welcome.epoch;
  check(typeof epoch === 'string' && welcome.id === `${epoch}:${welcome.welcome.offset}`, `A: welcome ${JSON.stringify(welcome)}`);

  const publishedA = [];
  const publishedB = [];
  for (let n = 1; n <= EACH; n += 1) {
    const a = JSON.stringify({ n, session: 'A', nonce });
    publishedA.push({ id: `${epoch}:${await redis.command('FCALL', 'wsproxy_publish', 1, `session:${sidA}:history`, a)}`, data: a });
    const b = JSON.stringify({ n, session: 'B', nonce });
    const receivers = await redis.command('PUBLISH', `session:${sidB}:down`, b);
    check(receivers === 1, `B: PUBLISH reached ${receivers} subscribers, expected wsproxy's one`);
    publishedB.push(b);
  }
  await until(`${EACH} messages on each stream and on the WebSocket`, async () => {
    const s = await brief();
    return s.streams.A.count >= EACH && s.streams.B.count >= EACH && s.sockets.B.count >= EACH;
  }, detail);
  await sleep(200); // anything extra would come now
  const got = await page.evaluate(() => ({
    A: window.rec.streams.A.events,
    B: window.rec.streams.B.events.map((e) => e.data),
    W: window.rec.sockets.B.messages,
  }));
  check(isDeepStrictEqual(got.A, publishedA), `A: got ${JSON.stringify(got.A.slice(0, 3))}… (${got.A.length}), expected ${JSON.stringify(publishedA.slice(0, 3))}… (${EACH}): lost, duplicated, reordered or altered`);
  check(isDeepStrictEqual(got.B, publishedB), `B stream: got ${got.B.length} messages, expected ${EACH} in order: ${JSON.stringify(got.B.slice(0, 3))}…`);
  check(isDeepStrictEqual(got.W, publishedB), `B WebSocket: got ${got.W.length} messages, expected ${EACH} in order: ${JSON.stringify(got.W.slice(0, 3))}…`);
  say(`two EventSources at once: A (reliable) ${EACH} messages once, in order, byte for byte, ids <epoch>:<offset>; B (plain) ${EACH} in order; the WebSocket on B the same ${EACH}`);

  // 3. POSTs, and a message up the WebSocket ------------------------------------------
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
  const postA = await page.evaluate(([u, b]) => window.post(u, b), [streamA, { type: 'message', id: 'm-1', data: { up: 'A', nonce } }]);
  check(
    postA.status === 200 && postA.answer && postA.answer.type === 'ack' && postA.answer.id === 'm-1' && !postA.answer.duplicate && typeof postA.answer.offset === 'string',
    `A: POST answered ${JSON.stringify(postA)}, expected 200 with the ack of m-1 (not a duplicate)`,
  );
  const storedA = await upEntries(sidA);
  check(
    storedA.length === 1 && storedA[0].id === 'm-1' && storedA[0].entryId === postA.answer.offset,
    `A: wsproxy:up:{n} holds ${JSON.stringify(storedA)}, expected m-1 once at ${postA.answer.offset}`,
  );
  const bodyB = { up: 'B by POST', nonce };
  const postB = await page.evaluate(([u, b]) => window.post(u, b), [streamB, bodyB]);
  check(postB.status === 200 && isDeepStrictEqual(postB.answer, { status: 'published' }), `B: POST answered ${JSON.stringify(postB)}, expected 200 {"status":"published"}`);
  const wsBody = { up: 'B by WebSocket', nonce };
  await page.evaluate((d) => window.rec.sockets.B.ws.send(d), JSON.stringify(wsBody));
  await until('B: two messages on session:B:up', async () => upB.length >= 2, async () => JSON.stringify(upB));
  check(
    isDeepStrictEqual(upB, [JSON.stringify(bodyB), JSON.stringify(wsBody)]),
    `B: session:${sidB}:up got ${JSON.stringify(upB)}, expected the POST's body, then the WebSocket's message`,
  );
  say(`POSTs: A's acknowledged (offset ${postA.answer.offset}) and stored once in ${storedA[0].stream}; B's "published" and on session:B:up, followed by the WebSocket's message`);

  // 4. The backend ends both sessions: the streams' responses complete -------------------
  for (const sid of [sidA, sidB]) {
    await redis.command('PUBLISH', 'wsproxy:control', JSON.stringify({ type: 'disconnect', session_id: sid, code: 4002, reason: 'done' }));
  }
  const ended = await until('both streams closed, the WebSocket closed', async () => {
    const s = await brief();
    return s.streams.A.readyState === 2 && s.streams.B.readyState === 2 && s.sockets.B.close ? s : null;
  }, detail);
  for (const k of ['A', 'B']) {
    check(isDeepStrictEqual(ended.streams[k].closes, [{ code: 4002, reason: 'done' }]), `${k}: close events ${JSON.stringify(ended.streams[k].closes)}, expected one {code 4002, done}`);
    check(ended.streams[k].opens === 1, `${k}: ${ended.streams[k].opens} opens, expected 1 (no reconnect)`);
  }
  check(ended.sockets.B.close.code === 4002, `B WebSocket: closed with ${JSON.stringify(ended.sockets.B.close)}, expected 4002`);
  say('control disconnect 4002: event: close on both streams (closed by the page, no reconnect), the WebSocket closed with 4002');

  // 5. HTTP/2 for the streams and POSTs, HTTP/1.1 for the WebSocket --------------------
  const entries = await until('resource timing entries of both streams and both POSTs', async () => {
    const all = await page.evaluate(() => window.resources());
    const pick = (p) => all.filter((e) => e.type === 'resource' && e.name === origin + p);
    // Each URL twice: a stream's GET and its POST.
    return pick(streamA).length >= 2 && pick(streamB).length >= 2 ? all : null;
  }, async () => JSON.stringify(await page.evaluate(() => window.resources())), 5_000);
  const mine = entries.filter((e) => e.name.includes(`/${AGENT}/`) || e.type === 'navigation');
  const shown = JSON.stringify(mine.map((e) => ({ ...e, name: e.name.replace(tokenA, 'TA').replace(tokenB, 'TB') })));
  check(mine.length === 5, `resource timing: ${shown}; expected the navigation, two event streams and two POSTs`);
  check(mine.every((e) => e.nextHopProtocol === 'h2'), `resource timing: ${shown}; expected nextHopProtocol 'h2' for every one`);
  check(
    mine.filter((e) => e.initiatorType === 'other' || e.initiatorType === 'eventsource').length >= 2 && mine.filter((e) => e.initiatorType === 'fetch').length === 2,
    `resource timing: ${shown}; expected two event streams and two fetches`,
  );
  const sessionResponses = netlog.responses.filter((r) => r.url.startsWith(`${origin}/${AGENT}/sse/`));
  const netShown = JSON.stringify(netlog.responses.map((r) => ({ ...r, url: r.url.replace(tokenA, 'TA').replace(tokenB, 'TB') })));
  check(
    sessionResponses.length === 4 && sessionResponses.every((r) => r.protocol === 'h2' && r.status === 200),
    `network log: ${netShown}; expected 4 responses (2 streams, 2 POSTs) over h2 with 200`,
  );
  const connections = new Set(sessionResponses.map((r) => r.connectionId));
  check(connections.size === 1, `network log: ${netShown}; the streams and POSTs used ${connections.size} connections, expected one`);
  check(isDeepStrictEqual(netlog.wsHandshakes, [{ status: 101 }]), `network log: WebSocket handshakes ${JSON.stringify(netlog.wsHandshakes)}, expected one 101 (HTTP/1.1 upgrade)`);
  say(`nextHopProtocol h2 for the page, both event streams and both POSTs (resource timing and the network log agree), all four on one connection (id ${[...connections][0]}); the WebSocket beside them upgraded with 101 (HTTP/1.1)`);

  check(diagnostics.pageErrors.length === 0, `page errors: ${diagnostics.pageErrors.join('\n')}`);
}

async function cleanup() {
  const { browser } = started;
  started.browser = null;
  if (browser) await Promise.race([browser.close().catch(() => {}), sleep(10_000)]);
  closeRedisClients();
  await killChildren();
  if (started.tmp) rmSync(started.tmp, { recursive: true, force: true });
}

runMain({
  tag: 'sse-h2-e2e',
  run,
  cleanup,
  report: (err) => {
    console.error(`\n[sse-h2-e2e] FAILED: ${describeFailure(err)}`);
    printDiagnostics('sse-h2-e2e', diagnostics);
    printChildLogs('sse-h2-e2e');
  },
  timeoutMs: TIMEOUT_MS,
  hardStopMs: 20_000,
});
