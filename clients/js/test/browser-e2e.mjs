#!/usr/bin/env node
// Real-browser end-to-end test for clients/js/jwt_utils.js against a running
// wsproxy (topic pub/sub).
//
//   WSPROXY_HTTP=http://127.0.0.1:8080 E2E_USER=alice E2E_PASSWORD=secret \
//     node test/browser-e2e.mjs
//
// Optional: CHROMIUM_PATH (default /usr/bin/chromium), E2E_TIMEOUT_MS
// (default 60000).
//
// The wsproxy must allow this test page's origin (http://127.0.0.1:<random
// port>) in CORS_ALLOWED_ORIGINS; `*` is simplest.
//
// What happens:
//   1. a static HTTP server on 127.0.0.1:<free port> serves a test page and
//      jwt_utils.js; Chromium (via playwright-core, fresh profile) loads it;
//   2. the page logs in with createAuthenticatedWebSocket (POST /auth/token
//      across origins, then /ws?access_token=...), registers a name and
//      subscribes to topic A, waiting for the server's confirmation;
//   3. the page tries to subscribe with another session id and must get
//      {"type":"error","error":"session_mismatch"};
//   4. a Node client (`ws` package, its own token for the same session, sent
//      as an Authorization header) subscribes to topic B and publishes on A;
//      the page must receive exactly that message;
//   5. the page publishes on B (leaving publisher_name, timestamp and
//      session_id to the server); the Node client must receive it.
// Exit status 0 on success, 1 on any failure (with the reason on stderr).

import http from 'node:http';
import { readFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { isDeepStrictEqual } from 'node:util';
import { chromium } from 'playwright-core';
import WebSocket from 'ws';
import { TestFailure, check, requireEnv } from './harness.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const LIB_PATH = path.resolve(HERE, '..', 'jwt_utils.js');

const CHROMIUM_PATH = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const TIMEOUT_MS = Number(process.env.E2E_TIMEOUT_MS || 60_000);
const STEP_TIMEOUT_MS = 10_000;

const log = (msg) => console.log(`[e2e] ${msg}`);

// ---------------------------------------------------------------------------
// The test page and the static server that serves it.

const PAGE_HTML = `<!doctype html>
<html>
<head><meta charset="utf-8"><title>wsproxy browser e2e</title>
<link rel="icon" href="data:,"></head>
<body>
<pre id="log"></pre>
<script type="module">
  import * as client from './jwt_utils.js';
  window.wsclient = client;
  window.e2e = { ws: null, frames: [], messages: [] };
  window.e2eReady = true;
</script>
</body>
</html>
`;

async function startStaticServer() {
  const lib = await readFile(LIB_PATH);
  const served = [];
  const server = http.createServer((req, res) => {
    const url = new URL(req.url, 'http://x');
    served.push(`${req.method} ${url.pathname}`);
    const send = (status, type, body) => {
      res.writeHead(status, { 'Content-Type': type, 'Cache-Control': 'no-store' });
      res.end(body);
    };
    if (req.method !== 'GET' && req.method !== 'HEAD') return send(405, 'text/plain', 'method not allowed\n');
    if (url.pathname === '/' || url.pathname === '/index.html') return send(200, 'text/html; charset=utf-8', PAGE_HTML);
    if (url.pathname === '/jwt_utils.js') return send(200, 'text/javascript; charset=utf-8', lib);
    return send(404, 'text/plain', 'not found\n');
  });
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', resolve);
  });
  const { port } = server.address();
  return { server, origin: `http://127.0.0.1:${port}`, served };
}

// ---------------------------------------------------------------------------
// Node-side client: plain `ws`, speaking the wire protocol directly (not via
// jwt_utils.js, so it is an independent check of the server).

async function fetchToken(authUrl, username, password, sessionId) {
  const res = await fetch(authUrl, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ username, password, session_id: sessionId }),
  });
  const text = await res.text();
  let data;
  try {
    data = JSON.parse(text);
  } catch {
    throw new TestFailure(`POST ${authUrl}: HTTP ${res.status}, body is not JSON: ${text.slice(0, 200)}`);
  }
  check(res.status === 200, `POST ${authUrl}: HTTP ${res.status} ${text.slice(0, 300)}`);
  check(typeof data.token === 'string' && data.token.length > 0, `POST ${authUrl}: no token in ${text}`);
  check(data.session_id === sessionId, `POST ${authUrl}: session_id ${JSON.stringify(data.session_id)}, expected ${sessionId}`);
  return data.token;
}

class NodeClient {
  constructor(ws) {
    this.ws = ws;
    this.inbox = [];
    this.waiters = [];
    this.closed = null;
    ws.on('message', (data, isBinary) => {
      const text = isBinary ? null : data.toString('utf8');
      let json = null;
      if (text !== null) {
        try {
          json = JSON.parse(text);
        } catch {
          /* e.g. "pong" */
        }
      }
      this.inbox.push({ text, json });
      this.poke();
    });
    ws.on('close', (code, reason) => {
      this.closed = { code, reason: reason.toString() };
      this.poke();
    });
  }

  static async connect(wsUrl, token) {
    const ws = new WebSocket(wsUrl, { headers: { Authorization: `Bearer ${token}` }, handshakeTimeout: STEP_TIMEOUT_MS });
    await new Promise((resolve, reject) => {
      ws.once('open', resolve);
      ws.once('unexpected-response', (_req, res) => {
        let body = '';
        res.on('data', (c) => (body += c));
        res.on('end', () => reject(new TestFailure(`Node client: /ws upgrade refused: HTTP ${res.statusCode} ${body}`)));
      });
      ws.once('error', (e) => reject(new TestFailure(`Node client: /ws connection failed: ${e.message}`)));
    });
    return new NodeClient(ws);
  }

  poke() {
    for (const w of this.waiters.splice(0)) w();
  }

  /** Wait for (and remove) the first inbox entry matching pred. */
  async next(pred, what, timeoutMs = STEP_TIMEOUT_MS) {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const i = this.inbox.findIndex(pred);
      if (i >= 0) return this.inbox.splice(i, 1)[0];
      if (this.closed) {
        throw new TestFailure(`Node client: connection closed (${this.closed.code} ${this.closed.reason}) while waiting for ${what}`);
      }
      const left = deadline - Date.now();
      if (left <= 0) {
        throw new TestFailure(`Node client: no ${what} within ${timeoutMs} ms; got: ${JSON.stringify(this.inbox.map((m) => m.text))}`);
      }
      await new Promise((resolve) => {
        const t = setTimeout(resolve, Math.min(left, 250));
        this.waiters.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
  }

  send(frame) {
    this.ws.send(frame);
  }

  close() {
    try {
      this.ws.close(1000);
    } catch {
      /* ignore */
    }
    try {
      this.ws.terminate();
    } catch {
      /* ignore */
    }
  }
}

// ---------------------------------------------------------------------------

const resources = { browser: null, staticServer: null, nodeClient: null };
const diagnostics = { console: [], pageErrors: [], failedRequests: [] };

async function run() {
  const base = requireEnv('WSPROXY_HTTP').replace(/\/+$/, '');
  const username = requireEnv('E2E_USER');
  const password = requireEnv('E2E_PASSWORD');
  check(/^https?:\/\//.test(base), `WSPROXY_HTTP must start with http:// or https:// (got ${base})`);
  const authUrl = `${base}/auth/token`;
  const wsUrl = `${base.replace(/^http/, 'ws')}/ws`;

  const nonce = `${Date.now().toString(36)}-${randomBytes(4).toString('hex')}`;
  const sessionId = `e2e-${nonce}`;
  const otherSession = `e2e-other-${nonce}`;
  const topicToBrowser = `e2e.to-browser.${nonce}`;
  const topicToNode = `e2e.to-node.${nonce}`;
  log(`server ${base}, session ${sessionId}`);

  // 1. static server + browser ------------------------------------------------
  const st = await startStaticServer();
  resources.staticServer = st.server;
  log(`test page served at ${st.origin}/`);

  resources.browser = await chromium.launch({
    executablePath: CHROMIUM_PATH,
    headless: true,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
    timeout: 30_000,
  });
  // launch() gives the browser a fresh temporary profile, removed on close().
  log(`launched ${CHROMIUM_PATH} (Chromium ${resources.browser.version()})`);
  const context = await resources.browser.newContext();
  const page = await context.newPage();
  page.setDefaultTimeout(STEP_TIMEOUT_MS);
  page.on('console', (m) => diagnostics.console.push(`${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => diagnostics.pageErrors.push(String(e && e.stack ? e.stack : e)));
  page.on('requestfailed', (r) => diagnostics.failedRequests.push(`${r.method()} ${r.url()}: ${r.failure()?.errorText}`));

  const resp = await page.goto(`${st.origin}/`, { waitUntil: 'load' });
  check(resp && resp.status() === 200, `test page: HTTP ${resp && resp.status()}`);
  await page.waitForFunction(() => window.e2eReady === true).catch(() => {
    throw new TestFailure(`jwt_utils.js did not load in the browser; page errors: ${JSON.stringify(diagnostics.pageErrors)}; console: ${JSON.stringify(diagnostics.console)}`);
  });
  check(diagnostics.pageErrors.length === 0, `page errors while loading jwt_utils.js: ${diagnostics.pageErrors.join('\n')}`);
  const exported = await page.evaluate(() => Object.keys(window.wsclient).sort());
  for (const name of ['jwtManager', 'createAuthenticatedWebSocket', 'subscribe', 'publish']) {
    check(exported.includes(name), `jwt_utils.js does not export ${name} (exports: ${exported.join(', ')})`);
  }
  log(`jwt_utils.js loaded in the page (exports: ${exported.join(', ')})`);

  // 2. browser: log in, connect, register, subscribe to A ---------------------
  const browserName = `browser-${nonce}`;
  const connected = await page.evaluate(
    async ({ wsUrl, authUrl, username, password, sessionId, browserName, topicToBrowser }) => {
      const { jwtManager, createAuthenticatedWebSocket, registerName, subscribe } = window.wsclient;
      const out = { before: jwtManager.isAuthenticated() };
      let ws;
      try {
        ws = await createAuthenticatedWebSocket(wsUrl, authUrl, username, password, sessionId);
      } catch (e) {
        return { error: `createAuthenticatedWebSocket failed: ${e.message}` };
      }
      window.e2e.ws = ws;
      ws.addEventListener('message', (ev) => {
        window.e2e.frames.push(ev.data);
        try {
          const m = JSON.parse(ev.data);
          if (m && m.type === undefined) window.e2e.messages.push(m);
        } catch {
          /* not JSON */
        }
      });
      ws.addEventListener('close', (ev) => {
        window.e2e.closed = { code: ev.code, reason: ev.reason };
      });
      out.authenticated = jwtManager.isAuthenticated();
      out.claims = jwtManager.getClaims();
      out.socketUrlHasToken = /[?&]access_token=/.test(ws.url);
      try {
        out.registered = await registerName(ws, browserName);
        out.subscribed = await subscribe(ws, topicToBrowser, sessionId);
      } catch (e) {
        return { ...out, error: `${e.message}; frames: ${JSON.stringify(window.e2e.frames)}` };
      }
      return out;
    },
    { wsUrl, authUrl, username, password, sessionId, browserName, topicToBrowser },
  );
  check(!connected.error, `browser: ${connected.error}`);
  check(connected.before === false, 'browser: jwtManager.isAuthenticated() was true with a fresh profile');
  check(connected.authenticated === true, 'browser: jwtManager.isAuthenticated() is false after login');
  check(connected.claims && connected.claims.sid === sessionId, `browser: token sid is ${connected.claims && connected.claims.sid}, expected ${sessionId}`);
  check(connected.claims.sub === username, `browser: token sub is ${connected.claims.sub}, expected ${username}`);
  check(connected.socketUrlHasToken, 'browser: the socket URL carries no access_token');
  check(
    isDeepStrictEqual(connected.registered, { type: 'registered', name: browserName }),
    `browser: register-name reply ${JSON.stringify(connected.registered)}`,
  );
  check(
    isDeepStrictEqual(connected.subscribed, { type: 'subscribed', topic: topicToBrowser, session_id: sessionId }),
    `browser: subscribe reply ${JSON.stringify(connected.subscribed)}`,
  );
  log(`browser: logged in (POST /auth/token across origins), connected with ?access_token, registered, subscribed to ${topicToBrowser}`);

  // 3. browser: a subscription in another session is refused ------------------
  const refusal = await page.evaluate(
    async ({ otherSession }) => {
      try {
        const r = await window.wsclient.subscribe(window.e2e.ws, 'e2e.refused', otherSession);
        return { unexpected: r };
      } catch (e) {
        return { code: e.code, reply: e.reply, message: e.message, open: window.e2e.ws.readyState === 1 };
      }
    },
    { otherSession },
  );
  check(!refusal.unexpected, `browser: subscribing in session ${otherSession} was accepted: ${JSON.stringify(refusal.unexpected)}`);
  check(
    refusal.reply && refusal.reply.type === 'error' && refusal.reply.error === 'session_mismatch',
    `browser: expected {"type":"error","error":"session_mismatch"}, got ${JSON.stringify(refusal)}`,
  );
  check(refusal.open, 'browser: the connection did not stay open after the refusal');
  log(`browser: subscribing in another session refused: ${JSON.stringify(refusal.reply)}`);

  // 4. Node client: own token, subscribe to B, publish on A --------------------
  const nodeToken = await fetchToken(authUrl, username, password, sessionId);
  const node = await NodeClient.connect(wsUrl, nodeToken);
  resources.nodeClient = node;
  const nodeName = `node-${nonce}`;
  node.send(`register-name:${nodeName}`);
  const reg = await node.next((m) => m.json && m.json.type !== undefined, 'register-name reply');
  check(isDeepStrictEqual(reg.json, { type: 'registered', name: nodeName }), `Node client: register-name reply ${reg.text}`);
  node.send(`subscribe:${topicToNode}|${sessionId}`);
  const sub = await node.next((m) => m.json && m.json.type !== undefined, 'subscribe reply');
  check(
    isDeepStrictEqual(sub.json, { type: 'subscribed', topic: topicToNode, session_id: sessionId }),
    `Node client: subscribe reply ${sub.text}`,
  );
  log(`node: connected with an Authorization header, subscribed to ${topicToNode}`);

  const toBrowser = {
    publisher_name: nodeName,
    topic: topicToBrowser,
    payload: `hello browser ${nonce}`,
    timestamp: new Date().toISOString().replace(/\.\d{3}Z$/, 'Z'),
    session_id: sessionId,
  };
  node.send(`publish-json:${JSON.stringify(toBrowser)}`);
  log(`node: published on ${topicToBrowser}`);

  const received = await page
    .waitForFunction((topic) => window.e2e.messages.find((m) => m.topic === topic) || null, topicToBrowser)
    .then((h) => h.jsonValue())
    .catch(async () => {
      const state = await page.evaluate(() => ({ frames: window.e2e.frames, closed: window.e2e.closed })).catch(() => null);
      const nodeErrors = node.inbox.map((m) => m.text);
      throw new TestFailure(`browser: no message on ${topicToBrowser} within ${STEP_TIMEOUT_MS} ms; browser frames: ${JSON.stringify(state)}; Node inbox: ${JSON.stringify(nodeErrors)}`);
    });
  // The seed's five fields, and publisher_sub: the publisher has a token.
  check(
    isDeepStrictEqual(Object.keys(received).sort(), ['payload', 'publisher_name', 'publisher_sub', 'session_id', 'timestamp', 'topic']),
    `browser: delivered message has fields ${Object.keys(received).join(', ')}`,
  );
  check(received.publisher_sub === username, `browser: publisher_sub ${received.publisher_sub}, expected the token's sub ${username}`);
  check(received.publisher_name === nodeName, `browser: publisher_name ${received.publisher_name}, expected ${nodeName}`);
  check(received.topic === topicToBrowser, `browser: topic ${received.topic}`);
  check(received.payload === toBrowser.payload, `browser: payload ${JSON.stringify(received.payload)}, expected ${JSON.stringify(toBrowser.payload)}`);
  check(received.session_id === sessionId, `browser: session_id ${received.session_id}, expected ${sessionId}`);
  check(received.timestamp === toBrowser.timestamp, `browser: timestamp ${received.timestamp}, expected ${toBrowser.timestamp}`);
  log(`browser: received ${JSON.stringify(received)}`);

  // 5. browser publishes on B; Node receives it --------------------------------
  const replyPayload = { reply_to: toBrowser.payload, from: 'browser', n: 42 };
  const sentFrame = await page.evaluate(
    ({ topicToNode, replyPayload }) => window.wsclient.publish(window.e2e.ws, { topic: topicToNode, payload: replyPayload }),
    { topicToNode, replyPayload },
  );
  log(`browser: sent ${sentFrame}`);
  const got = await node.next((m) => m.json && m.json.topic === topicToNode, `message on ${topicToNode}`).catch(async (e) => {
    const frames = await page.evaluate(() => window.e2e.frames).catch(() => null);
    throw new TestFailure(`${e.message}; browser frames (a publish error would be here): ${JSON.stringify(frames)}`);
  });
  const m = got.json;
  check(
    isDeepStrictEqual(Object.keys(m).sort(), ['payload', 'publisher_name', 'publisher_sub', 'session_id', 'timestamp', 'topic']),
    `Node client: delivered message has fields ${Object.keys(m).join(', ')}`,
  );
  check(m.publisher_sub === username, `Node client: publisher_sub ${m.publisher_sub}, expected the token's sub ${username}`);
  check(m.publisher_name === browserName, `Node client: publisher_name ${m.publisher_name}, expected the browser's registered name ${browserName}`);
  check(m.session_id === sessionId, `Node client: session_id ${m.session_id}, expected ${sessionId}`);
  check(isDeepStrictEqual(m.payload, replyPayload), `Node client: payload ${JSON.stringify(m.payload)}, expected ${JSON.stringify(replyPayload)}`);
  check(typeof m.timestamp === 'string' && !Number.isNaN(Date.parse(m.timestamp)), `Node client: timestamp ${JSON.stringify(m.timestamp)} is not a date`);
  log(`node: received ${got.text}`);

  // Nothing else went wrong on either side.
  const stray = node.inbox.filter((x) => x.json && x.json.type === 'error');
  check(stray.length === 0, `Node client: unexpected errors ${JSON.stringify(stray.map((x) => x.text))}`);
  const browserErrors = await page.evaluate(() =>
    window.e2e.frames.filter((f) => f.includes('"type":"error"') && !f.includes('session_mismatch')),
  );
  check(browserErrors.length === 0, `browser: unexpected error frames ${JSON.stringify(browserErrors)}`);
  check(diagnostics.pageErrors.length === 0, `page errors: ${diagnostics.pageErrors.join('\n')}`);

  await page.evaluate(() => window.e2e.ws.close(1000));
}

async function cleanup() {
  const { browser, staticServer, nodeClient } = resources;
  resources.browser = resources.staticServer = resources.nodeClient = null;
  if (nodeClient) nodeClient.close();
  if (browser) {
    await Promise.race([browser.close().catch(() => {}), new Promise((r) => setTimeout(r, 10_000))]);
  }
  if (staticServer) {
    staticServer.closeAllConnections?.();
    await new Promise((r) => staticServer.close(() => r()));
  }
}

function reportFailure(err) {
  console.error(`\n[e2e] FAILED: ${err instanceof TestFailure ? err.message : err && err.stack ? err.stack : err}`);
  if (diagnostics.pageErrors.length) console.error(`[e2e] page errors:\n  ${diagnostics.pageErrors.join('\n  ')}`);
  if (diagnostics.console.length) console.error(`[e2e] browser console:\n  ${diagnostics.console.join('\n  ')}`);
  if (diagnostics.failedRequests.length) console.error(`[e2e] failed browser requests:\n  ${diagnostics.failedRequests.join('\n  ')}`);
}

let finished = false;
async function finish(code, err) {
  if (finished) return;
  finished = true;
  if (err) reportFailure(err);
  // cleanup() must not keep a failing run alive either.
  const hardStop = setTimeout(() => process.exit(code || 1), 15_000);
  try {
    await cleanup();
  } catch (e) {
    console.error(`[e2e] cleanup: ${e.message}`);
  }
  clearTimeout(hardStop);
  if (code === 0) log('PASS');
  process.exit(code);
}

for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, () => finish(1, new TestFailure(`interrupted by ${sig}`)));
}
const overall = setTimeout(() => finish(1, new TestFailure(`overall timeout: the test did not finish within ${TIMEOUT_MS} ms`)), TIMEOUT_MS);

run().then(
  () => {
    clearTimeout(overall);
    return finish(0);
  },
  (err) => {
    clearTimeout(overall);
    return finish(1, err);
  },
);
