#!/usr/bin/env node
// Headless-Chromium test of wsproxy's status page (GET /status, issue 26):
// starts its own wsproxy (the built binary) on the given Redis with
// METRICS_TOKEN, lifecycle events and a routes file (one route to a `ws`
// echo backend, one to a closed port with a failing health check), opens a
// session and a proxied connection, then loads the page as an operator
// would: first without the token (the page asks for it), then with it in
// the form, then from the URL's fragment. Asserts on what the page shows,
// that the token never appears in a request's URL and that nothing is
// fetched from another origin, and saves a screenshot.
//
//   REDIS_URL=redis://127.0.0.1:6379 WSPROXY_BIN=target/debug/wsproxy \
//     node clients/js/test/status-e2e.mjs
//
// Optional: CHROMIUM_PATH (default /usr/bin/chromium), STATUS_SCREENSHOT
// (default target/status-page.png, from the repository root),
// E2E_TIMEOUT_MS (default 60000). Needs redis-cli. Exit status 0 on
// success, 1 on failure (with the reason, wsproxy's log and the browser
// console on stderr).

import { spawn, execFileSync } from 'node:child_process';
import { mkdtempSync, writeFileSync, mkdirSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import WebSocket, { WebSocketServer } from 'ws';
import { TestFailure, check, freePort } from './harness.mjs';

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
const CHROMIUM_PATH = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const WSPROXY_BIN = path.resolve(REPO, process.env.WSPROXY_BIN || 'target/debug/wsproxy');
const SCREENSHOT = path.resolve(REPO, process.env.STATUS_SCREENSHOT || 'target/status-page.png');
const TIMEOUT_MS = Number(process.env.E2E_TIMEOUT_MS || 60_000);
const STEP_MS = 10_000;
const TOKEN = `status-${randomBytes(12).toString('hex')}`;

const say = (msg) => console.log(`[status-e2e] ${msg}`);

const started = { wsproxy: null, backend: null, browser: null, sockets: [], dir: null };
const report = { wsproxyLog: [], console: [] };

async function waitFor(what, fn, ms = STEP_MS) {
  const deadline = Date.now() + ms;
  for (;;) {
    try {
      const v = await fn();
      if (v) return v;
    } catch {
      // not yet
    }
    check(Date.now() < deadline, `timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

function openSocket(url) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url);
    started.sockets.push(ws);
    ws.once('open', () => resolve(ws));
    ws.once('error', reject);
    ws.once('unexpected-response', (_, res) => reject(new Error(`${url}: HTTP ${res.statusCode}`)));
  });
}

async function main() {
  const redisUrl = process.env.REDIS_URL;
  check(redisUrl, 'environment variable REDIS_URL is required');
  started.dir = mkdtempSync(path.join(os.tmpdir(), 'status-e2e-'));

  // The backend: a `ws` echo server.
  const backendPort = await freePort();
  started.backend = new WebSocketServer({ host: '127.0.0.1', port: backendPort });
  started.backend.on('connection', (ws) => ws.on('message', (m, binary) => ws.send(m, { binary })));
  const deadPort = await freePort();
  const backend = (name, port) => ({ name, host: 'ws://127.0.0.1', port, weight: 1 });
  const route = (external, backends) => ({
    protocol: 'websocket', backends, external_path: external, internal_path: '/',
    methods: ['GET'], auth_required: false,
  });
  const routesFile = path.join(started.dir, 'routes.json');
  writeFileSync(routesFile, JSON.stringify({
    version: 1,
    routers: [
      route('/echo', [backend('echo-1', backendPort)]),
      { ...route('/dead', [backend('gone', deadPort)]), health_check: { interval_ms: 200, timeout_ms: 200 } },
    ],
  }));

  const port = await freePort();
  const base = `http://127.0.0.1:${port}`;
  started.wsproxy = spawn(WSPROXY_BIN, [], {
    env: {
      PATH: process.env.PATH, HOST: '127.0.0.1', PORT: String(port), REDIS_URL: redisUrl,
      METRICS_TOKEN: TOKEN, LIFECYCLE_EVENTS: 'true', PROCESS_HEARTBEAT_SECS: '1',
      ROUTES_FILE: routesFile, WS_ALLOWED_ORIGINS: '*', RUST_LOG: 'info', LOG_FORMAT: 'text',
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let exited = null;
  started.wsproxy.on('exit', (code, signal) => (exited = signal || `code ${code}`));
  for (const s of [started.wsproxy.stdout, started.wsproxy.stderr]) {
    s.on('data', (c) => report.wsproxyLog.push(...c.toString().trimEnd().split('\n')));
  }
  await waitFor('wsproxy to be ready', async () => {
    check(exited === null, `wsproxy exited (${exited})`);
    return (await fetch(`${base}/ready`)).ok;
  });
  say(`wsproxy ready on ${base}`);

  // A session (its token stored as a backend would) and a proxied socket.
  const session = `status-${randomBytes(4).toString('hex')}`;
  execFileSync('redis-cli', ['-u', redisUrl, 'SET', `session:${session}:auth`, 'tok-1', 'EX', '120']);
  const sessionWs = await openSocket(`ws://127.0.0.1:${port}/agent-1/ws/${session}?access_token=tok-1`);
  const proxied = await openSocket(`ws://127.0.0.1:${port}/echo`);
  proxied.send('hello');
  await new Promise((resolve) => proxied.once('message', resolve));

  // The JSON itself refuses a request without the token.
  const refused = await fetch(`${base}/status.json`);
  check(refused.status === 401, `/status.json without the token: HTTP ${refused.status}`);
  check((await refused.json()).error === 'metrics_token_required', 'the 401 body names metrics_token_required');

  started.browser = await chromium.launch({ executablePath: CHROMIUM_PATH, headless: true, args: ['--no-sandbox'] });
  const context = await started.browser.newContext({ viewport: { width: 1280, height: 1100 } });
  const requests = [];
  context.on('request', (r) => requests.push(r.url()));
  const page = await context.newPage();
  page.on('console', (m) => report.console.push(`${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => report.console.push(`pageerror: ${e.message}`));
  page.setDefaultTimeout(STEP_MS);

  // 1. Without the token: the page loads and asks for it.
  await page.goto(`${base}/status`);
  await page.locator('#auth.shown').waitFor();
  check((await page.textContent('#error')).includes('METRICS_TOKEN'), 'the page says it needs METRICS_TOKEN');

  // 2. With the token typed into the form.
  await page.fill('#token', TOKEN);
  await page.click('#auth button');
  await page.locator('body[data-loaded="yes"]').waitFor();
  const json = await (await fetch(`${base}/status.json`, { headers: { Authorization: `Bearer ${TOKEN}` } })).json();
  const text = async (sel) => (await page.textContent(sel)) || '';
  await waitFor('the page to show the failing health check', async () => (await text('#routes')).includes('failing'));
  check((await text('#process')).includes(json.process.id), 'the header names the process id');
  const connections = await text('#connections');
  // Columns by transport, in order: sse, websocket (proxied and topic
  // connections have no event streams, so their sse cell is 0).
  check(/job\s*sse\s*websocket/.test(connections) && /sessions\s*0\s*1/.test(connections)
    && /proxy\s*0\s*1/.test(connections) && /topics\s*0\s*0/.test(connections),
    `connections by job and transport: ${connections}`);
  check((await text('#sessions')) === '1', 'one session');
  check((await text('#topics')) === '0', 'no topics');
  const routes = await text('#routes');
  for (const want of ['/echo', 'echo-1', '/dead', 'gone', 'failing', 'not checked', 'closed']) {
    check(routes.includes(want), `routes table shows ${want}: ${routes}`);
  }
  const redis = await text('#pubsub');
  check(redis.includes('standalone') && redis.includes('connected'), `redis: ${redis}`);
  check((await text('#shards')).includes('up'), 'the Redis server is up');
  await waitFor('a heartbeat', async () => / s ago/.test(await text('#heartbeat')));
  check((await text('#heartbeat')).includes(json.process.id), 'the heartbeat names the process');

  // A close shows up, with its reason and code.
  sessionWs.close(1000, 'bye');
  await waitFor('the close on the page', async () => {
    const closes = await text('#closes');
    return closes.includes('sessions') && closes.includes('client') && closes.includes('1000');
  });
  check(/sessions\s*client\s*1000\s*1/.test(await text('#close-counts')), 'the close is counted');

  mkdirSync(path.dirname(SCREENSHOT), { recursive: true });
  await page.screenshot({ path: SCREENSHOT, fullPage: true });
  say(`screenshot: ${SCREENSHOT}`);

  // 3. A fresh tab, the token in the fragment: used, then taken off the URL.
  const tab = await (await started.browser.newContext()).newPage();
  tab.on('request', (r) => requests.push(r.url()));
  await tab.goto(`${base}/status#token=${TOKEN}`);
  await tab.locator('body[data-loaded="yes"]').waitFor({ timeout: STEP_MS });
  check(!tab.url().includes(TOKEN), `the token left the address bar: ${tab.url()}`);

  // No request carried the token in its URL, none went elsewhere, and
  // the page never asked for a favicon it does not have.
  check(requests.length > 0, 'requests were seen');
  for (const url of requests) {
    check(!url.includes(TOKEN), `a request URL carries the token: ${url}`);
    check(url.startsWith(`${base}/`), `a request to another origin: ${url}`);
    check(!url.endsWith('/favicon.ico'), 'the page asked for /favicon.ico');
  }
  const log = report.wsproxyLog.join('\n');
  check(!log.includes(TOKEN), 'the token is in wsproxy\'s log');
  say(`ok: ${requests.length} requests, all to ${base}, none with the token`);
}

async function cleanup() {
  for (const ws of started.sockets) ws.terminate();
  if (started.browser) await started.browser.close().catch(() => {});
  if (started.backend) started.backend.close();
  if (started.wsproxy && started.wsproxy.exitCode === null) started.wsproxy.kill('SIGTERM');
  if (started.dir) rmSync(started.dir, { recursive: true, force: true });
}

const timer = setTimeout(() => {
  console.error(`[status-e2e] FAILED: timed out after ${TIMEOUT_MS} ms`);
  cleanup().finally(() => process.exit(1));
}, TIMEOUT_MS);

main()
  .then(async () => {
    clearTimeout(timer);
    await cleanup();
    say('PASSED');
  })
  .catch(async (e) => {
    clearTimeout(timer);
    console.error(`[status-e2e] FAILED: ${e instanceof TestFailure ? e.message : e.stack || e}`);
    console.error('--- wsproxy log (last 40 lines) ---');
    console.error(report.wsproxyLog.slice(-40).join('\n'));
    console.error('--- browser console ---');
    console.error(report.console.join('\n'));
    await cleanup();
    process.exit(1);
  });
