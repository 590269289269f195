#!/usr/bin/env node
// Headless-Chromium test of the demo page (clients/js/demo/) against a
// running wsproxy, used the way a newcomer uses it: clients/js served by
// `python3 -m http.server`, the page opened in three tabs in one session:
// two logged in, each seeing what the other publishes, and one anonymous,
// which sees neither (anonymous clients' sessions are apart from token
// holders' on a server with JWT_SECRET) but does see its own messages.
//
//   WSPROXY_HTTP=http://127.0.0.1:8080 E2E_USER=alice E2E_PASSWORD=secret \
//     node test/demo-e2e.mjs
//
// The wsproxy needs what the demo's README section says: JWT_SECRET, a
// USERS_FILE with E2E_USER, PUBSUB_ALLOW_ANONYMOUS=true, and the page's
// origin (http://localhost:<port>) in WS_ALLOWED_ORIGINS and
// CORS_ALLOWED_ORIGINS ('*' is simplest).
//
// Optional: CHROMIUM_PATH (default /usr/bin/chromium), E2E_TIMEOUT_MS
// (default 60000), DEMO_PORT (default: a free port).
// Exit status 0 on success, 1 on any failure (with the reason, both tabs'
// log panels and the browser console on stderr).

import { spawn } from 'node:child_process';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { TestFailure, check, describeFailure, freePort, requireEnv as env, runMain } from './harness.mjs';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const CHROMIUM_PATH = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const TIMEOUT_MS = Number(process.env.E2E_TIMEOUT_MS || 60_000);
const STEP_MS = 10_000;

const say = (msg) => console.log(`[demo-e2e] ${msg}`);

/** What is started, so that cleanup can stop it. */
const started = { server: null, browser: null };
/** Collected for the failure report. */
const report = { serverLog: [], tabs: [] };

/** `python3 -m http.server` on clients/js, as the README tells a newcomer. */
async function startStaticServer(port) {
  const child = spawn('python3', ['-m', 'http.server', String(port), '--bind', '127.0.0.1', '--directory', ROOT], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  started.server = child;
  let exited = null;
  child.on('exit', (code, signal) => (exited = signal || `code ${code}`));
  child.on('error', (e) => (exited = e.message));
  for (const stream of [child.stdout, child.stderr]) {
    stream.on('data', (chunk) => report.serverLog.push(...chunk.toString().trimEnd().split('\n')));
  }
  const url = `http://127.0.0.1:${port}/demo/`;
  const deadline = Date.now() + STEP_MS;
  for (;;) {
    check(exited === null, `python3 -m http.server exited (${exited}): ${report.serverLog.join('\n')}`);
    try {
      const res = await fetch(url);
      check(res.status === 200, `GET ${url}: HTTP ${res.status}`);
      return;
    } catch (e) {
      if (e instanceof TestFailure) throw e;
    }
    check(Date.now() < deadline, `python3 -m http.server did not answer on port ${port} within ${STEP_MS} ms`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** Opens the demo page in a new tab and waits for its script to load. */
async function openTab(context, url, label) {
  const page = await context.newPage();
  page.setDefaultTimeout(STEP_MS);
  const tab = { label, page, console: [], errors: [] };
  report.tabs.push(tab);
  page.on('console', (m) => tab.console.push(`${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => tab.errors.push(String(e && e.stack ? e.stack : e)));
  page.on('requestfailed', (r) => tab.console.push(`request failed: ${r.url()}: ${r.failure()?.errorText}`));
  const res = await page.goto(url, { waitUntil: 'load' });
  check(res && res.status() === 200, `${label}: GET ${url}: HTTP ${res && res.status()}`);
  await page.waitForFunction(() => window.wsproxyDemoLoaded === true).catch(async () => {
    const shown = await page.locator('#load-error').textContent().catch(() => '');
    throw new TestFailure(`${label}: the demo script did not load: ${shown}`);
  });
  check(await page.locator('#connect').isEnabled(), `${label}: Connect is not enabled after the page loaded`);
  return tab;
}

/** Waits for a line of the tab's log panel of class `kind` containing `text`. */
async function logLine(tab, kind, text) {
  const line = tab.page.locator(`#log li.${kind}`).filter({ hasText: text }).first();
  await line.waitFor({ timeout: STEP_MS }).catch(() => {
    throw new TestFailure(`${tab.label}: no "${kind}" line containing ${JSON.stringify(text)} in the log within ${STEP_MS} ms`);
  });
  return line.textContent();
}

async function connect(tab, fields) {
  const { page } = tab;
  await page.locator('#url').fill(fields.url);
  await page.locator(fields.login ? '#mode-login' : '#mode-anonymous').check();
  if (fields.login) {
    await page.locator('#username').fill(fields.username);
    await page.locator('#password').fill(fields.password);
  }
  await page.locator('#session').fill(fields.session);
  await page.locator('#name').fill(fields.name);
  await page.locator('#connect').click();
  await page.waitForFunction(() => document.body.dataset.state !== 'connecting').catch(() => {
    throw new TestFailure(`${tab.label}: still connecting after ${STEP_MS} ms`);
  });
  const state = await page.evaluate(() => document.body.dataset.state);
  check(state === 'connected', `${tab.label}: the connection failed (state ${state}; the log panel below says why)`);
  const status = await page.locator('#status').textContent();
  check(status.includes(`session ${fields.session}`), `${tab.label}: status says ${JSON.stringify(status)}, expected session ${fields.session}`);
  // The registered name comes back before anything published can.
  await logLine(tab, 'received', `"name":"${fields.name}"`);
  say(`${tab.label}: ${status}`);
}

async function subscribeTo(tab, topic) {
  await tab.page.locator('#sub-topic').fill(topic);
  await tab.page.locator('#subscribe').click();
  // The list changes only once the server confirmed the subscription.
  await tab.page.waitForFunction((t) => document.getElementById('subscriptions').textContent === t, topic).catch(() => {
    throw new TestFailure(`${tab.label}: the subscription to ${topic} was not confirmed within ${STEP_MS} ms`);
  });
}

async function publishFrom(tab, topic, payloadText) {
  await tab.page.locator('#pub-topic').fill(topic);
  await tab.page.locator('#payload').fill(payloadText);
  await tab.page.locator('#publish').click();
}

async function run() {
  const base = env('WSPROXY_HTTP').replace(/\/+$/, '');
  check(/^https?:\/\//.test(base), `WSPROXY_HTTP must start with http:// or https:// (got ${base})`);
  const username = env('E2E_USER');
  const password = env('E2E_PASSWORD');
  // What a newcomer types in the URL field.
  const wsproxyUrl = base.replace(/^http/, 'ws');

  const nonce = `${Date.now().toString(36)}-${randomBytes(3).toString('hex')}`;
  const session = `demo-${nonce}`;
  const topic = `demo.chat.${nonce}`;

  const port = Number(process.env.DEMO_PORT || (await freePort()));
  await startStaticServer(port);
  const pageUrl = `http://localhost:${port}/demo/`;
  say(`python3 -m http.server serves ${ROOT} on port ${port}; wsproxy at ${wsproxyUrl}`);

  started.browser = await chromium.launch({
    executablePath: CHROMIUM_PATH,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking', '--disable-sync'],
    timeout: 30_000,
  });
  // One context, two pages: two tabs of one browser, each with its own
  // sessionStorage (where the library keeps the token).
  const context = await started.browser.newContext();
  const a = await openTab(context, pageUrl, 'tab A');
  const b = await openTab(context, pageUrl, 'tab B');
  const c = await openTab(context, pageUrl, 'tab C');
  say(`opened ${pageUrl} three times in Chromium ${started.browser.version()}`);

  await connect(a, { url: wsproxyUrl, login: true, username, password, session, name: 'tab-A' });
  await connect(b, { url: wsproxyUrl, login: true, username, password, session, name: 'tab-B' });
  await connect(c, { url: wsproxyUrl, login: false, session, name: 'tab-C' });
  await subscribeTo(a, topic);
  await subscribeTo(b, topic);
  await subscribeTo(c, topic);
  say(`all three tabs subscribed to ${topic} in session ${session}`);

  await publishFrom(a, topic, JSON.stringify({ text: `hello from A ${nonce}`, n: 1 }));
  let line = await logLine(b, 'message', `hello from A ${nonce}`);
  check(line.includes(`on ${topic} from tab-A (session ${session}`), `tab B: the message line does not name topic, publisher and session: ${line}`);
  check(line.includes(`{"text":"hello from A ${nonce}","n":1}`), `tab B: the payload is not shown as sent: ${line}`);
  say(`tab B shows: ${line}`);

  await publishFrom(b, topic, JSON.stringify([`hello from B ${nonce}`, true, null]));
  line = await logLine(a, 'message', `hello from B ${nonce}`);
  check(line.includes(`from tab-B (session ${session}`), `tab A: the message line does not name the publisher: ${line}`);
  say(`tab A shows: ${line}`);

  // The anonymous tab is in a session of the same name among anonymous
  // clients only: its own message comes back to it, and reaches neither
  // logged-in tab; theirs never reached it.
  await publishFrom(c, topic, JSON.stringify({ text: `hello from C ${nonce}` }));
  await logLine(c, 'message', `hello from C ${nonce}`);
  await c.page.waitForTimeout(500);
  for (const tab of [a, b]) {
    const seen = await tab.page.locator('#log li.message').allTextContents();
    check(!seen.some((m) => m.includes(`hello from C ${nonce}`)), `${tab.label}: an anonymous tab's message reached a logged-in tab: ${JSON.stringify(seen)}`);
  }
  const seenByC = await c.page.locator('#log li.message').allTextContents();
  check(!seenByC.some((m) => m.includes(`hello from A ${nonce}`) || m.includes(`hello from B ${nonce}`)), `tab C: a logged-in tab's message reached the anonymous tab: ${JSON.stringify(seenByC)}`);
  say('tab C (anonymous) saw only its own message, tabs A and B not it');

  // Errors reach the log panel: one caught by the page, one refused by the server.
  await publishFrom(b, topic, '{not json');
  await logLine(b, 'error', 'not valid JSON');
  await b.page.locator('#sub-topic').fill('no spaces allowed');
  await b.page.locator('#subscribe').click();
  line = await logLine(b, 'error', 'invalid_topic');
  check(line.includes('server refused subscribe'), `tab B: the refusal does not name the command: ${line}`);
  say(`tab B shows the server's refusal: ${line}`);

  for (const tab of [a, b, c]) {
    const messages = await tab.page.locator('#log li.message').allTextContents();
    check(messages.every((m) => m.includes(topic)), `${tab.label}: a message from another topic: ${JSON.stringify(messages)}`);
    check(tab.errors.length === 0, `${tab.label}: page errors: ${tab.errors.join('\n')}`);
    await tab.page.locator('#disconnect').click();
    await logLine(tab, 'info', 'connection closed (code 1000');
  }
}

async function cleanup() {
  const { browser, server } = started;
  started.browser = started.server = null;
  if (browser) await Promise.race([browser.close().catch(() => {}), new Promise((r) => setTimeout(r, 10_000))]);
  if (server && server.exitCode === null) {
    const gone = new Promise((r) => server.once('exit', r));
    server.kill('SIGTERM');
    await Promise.race([gone, new Promise((r) => setTimeout(r, 5_000))]);
  }
}

async function reportFailure(err) {
  console.error(`\n[demo-e2e] FAILED: ${describeFailure(err)}`);
  for (const tab of report.tabs) {
    const lines = await tab.page.locator('#log li').allTextContents().catch(() => ['(log unreadable)']);
    console.error(`[demo-e2e] ${tab.label} log panel:\n  ${lines.join('\n  ') || '(empty)'}`);
    if (tab.errors.length) console.error(`[demo-e2e] ${tab.label} page errors:\n  ${tab.errors.join('\n  ')}`);
    if (tab.console.length) console.error(`[demo-e2e] ${tab.label} console:\n  ${tab.console.join('\n  ')}`);
  }
  if (report.serverLog.length) console.error(`[demo-e2e] http.server:\n  ${report.serverLog.slice(-30).join('\n  ')}`);
}

runMain({ tag: 'demo-e2e', run, cleanup, report: reportFailure, timeoutMs: TIMEOUT_MS, hardStopMs: 20_000 });
