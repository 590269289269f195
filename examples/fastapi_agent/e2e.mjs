#!/usr/bin/env node
// The example's page in headless Chromium, against the example app (and its
// agent), wsproxy and Redis that run-e2e.sh has started.
//
//   APP_URL=http://127.0.0.1:8001 [E2E_EVENTS=1|simulated] [REDIS_PORT=6379] [E2E_SCREENSHOT=stop.png] node e2e.mjs
//
// E2E_SCREENSHOT: a PNG of the reloaded tab once its reply is stopped.
//
// 1. reliable session: the page starts a session, sends a prompt, and the
//    reply arrives piece by piece (many messages, spread over time, each
//    piece once and in order, then `done`); over WebSocket, then over SSE
//    (the page's transport choice: EventSource down, POST up);
// 2. plain session: the same, over both transports;
// 3. Stop, across two tabs of one reliable session: tab A on SSE starts the
//    session, tab B on WebSocket joins it from the address (#session=<id>);
//    A asks for a long reply; while it streams B is reloaded (it rejoins the
//    session and resumes from its saved position, missing nothing), then
//    B presses Stop: both tabs get the `stopped` marker once, no piece after
//    it (watched for 25 piece intervals), no `done`, and the same last piece;
//    a new prompt then gets a whole reply in both tabs, and a Stop with
//    nothing under way changes nothing; an address naming an unknown
//    session gets a 404, which the page reports;
// 4. (E2E_EVENTS=1: wsproxy has lifecycle events) reliable session, the page
//    leaves in the middle of a reply and stays away longer than the rest of
//    the reply would take; the agent must pause (few messages wait in the
//    history, replayed on return) and go on after the page comes back, with
//    every piece once and in order; over WebSocket, then over SSE.
//    E2E_EVENTS=simulated (a wsproxy without lifecycle events): the same,
//    with the disconnect and resume events wsproxy would emit appended to
//    wsproxy:events by this test (redis-cli, REDIS_PORT), in issue 14's
//    format: the page, the agent and the library are checked end to end,
//    wsproxy's own events are not.
//
// playwright-core comes from clients/js/node_modules (run-e2e.sh installs it).

import { execFileSync } from 'node:child_process';
import path from 'node:path';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const require = createRequire(path.join(HERE, '..', '..', 'clients', 'js', 'package.json'));
const { chromium } = require('playwright-core');

const APP_URL = process.env.APP_URL;
const CHROMIUM_PATH = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const EVENTS = process.env.E2E_EVENTS || '0';
const REDIS_PORT = process.env.REDIS_PORT || '6379';
const STEP_MS = 15_000;

const say = (msg) => console.log(`[fastapi-agent-e2e] ${msg}`);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
class TestFailure extends Error {}
function check(cond, msg) {
  if (!cond) throw new TestFailure(msg);
}

async function until(page, what, fn, arg, timeout = STEP_MS) {
  try {
    await page.waitForFunction(fn, arg, { timeout, polling: 50 });
  } catch (e) {
    const demo = await page.evaluate(() => ({
      state: window.agentDemo?.state,
      replies: Object.fromEntries(Object.entries(window.agentDemo?.replies ?? {}).map(([k, r]) => [k, { pieces: r.pieces, got: r.chunks.length, done: r.done }])),
      errors: window.agentDemo?.errors,
      log: document.getElementById('log')?.innerText.slice(0, 600),
    }));
    throw new TestFailure(`${what}: not within ${timeout} ms (${e.message.split('\n')[0]}); page: ${JSON.stringify(demo)}`);
  }
}

async function startSession(page, mode, transport = 'websocket') {
  await page.goto(`${APP_URL}/?mode=${mode}&transport=${transport}&user=e2e`);
  await page.click('#start');
  await until(page, `${mode} session open over ${transport}`, () => window.agentDemo.state === 'open');
  const grant = await page.evaluate(() => window.agentDemo.grant);
  check(await page.evaluate(() => window.agentDemo.transport) === transport, 'the page did not take the transport');
  check(page.url().endsWith(`#session=${grant.session_id}`), `the session is not in the address: ${page.url()}`);
  check(grant.reliable === (mode === 'reliable'), `grant says reliable=${grant.reliable}`);
  check(/^e2e-[0-9a-f]{12}$/.test(grant.session_id), `session id ${grant.session_id}`);
  check(grant.websocket_url.includes(`/web/ws/${grant.session_id}?access_token=`), `websocket_url ${grant.websocket_url}`);
  return grant;
}

async function ask(page, text) {
  const before = await page.evaluate(() => Object.keys(window.agentDemo.replies).length);
  await page.fill('#prompt', text);
  await page.click('#send');
  await until(page, 'the reply starts', (n) => Object.keys(window.agentDemo.replies).length > n, before);
  return page.evaluate(() => Object.keys(window.agentDemo.replies).at(-1));
}

/** Checks a finished reply: every piece once, in order, spread over time. */
async function checkReply(page, id, prompt) {
  const r = await page.evaluate((rid) => {
    const reply = window.agentDemo.replies[rid];
    const msgs = window.agentDemo.received.filter((m) => m.reply_to === rid);
    return {
      pieces: reply.pieces, chunks: reply.chunks, done: reply.done, outOfOrder: reply.outOfOrder,
      text: reply.el.textContent, doneAttr: reply.el.dataset.done,
      seqs: msgs.filter((m) => m.type === 'chunk').map((m) => m.seq),
      times: msgs.filter((m) => m.type === 'chunk').map((m) => m.at),
      types: msgs.map((m) => m.type),
      msgs,
    };
  }, id);
  check(r.done && r.doneAttr === 'true', 'the reply is not marked done');
  check(r.pieces >= 10, `only ${r.pieces} pieces`);
  check(r.seqs.length === r.pieces, `${r.seqs.length} chunk messages for ${r.pieces} pieces: ${r.seqs}`);
  check(r.seqs.every((s, i) => s === i), `pieces out of order or repeated: ${r.seqs}`);
  check(r.outOfOrder === 0, `${r.outOfOrder} pieces out of order`);
  check(r.types[0] === 'start' && r.types.at(-1) === 'done', `message types ${r.types}`);
  check(r.text.startsWith(`You asked: "${prompt}".`), `reply text ${JSON.stringify(r.text.slice(0, 80))}`);
  check(/[.!?]$/.test(r.text.trim()), `the reply ends mid-sentence: ${JSON.stringify(r.text.slice(-60))}`);
  return r;
}

async function streamedReply(page, mode, transport) {
  const grant = await startSession(page, mode, transport);
  const prompt = `hello from the ${mode} ${transport} page`;
  const id = await ask(page, prompt);
  // Piece by piece: while the reply is under way, the page shows part of it.
  await until(page, 'a partial reply', (rid) => {
    const r = window.agentDemo.replies[rid];
    return r.chunks.length >= 3 && !r.done;
  }, id);
  await until(page, 'the whole reply', (rid) => window.agentDemo.replies[rid].done, id);
  const r = await checkReply(page, id, prompt);
  const spread = r.times.at(-1) - r.times[0];
  check(spread > (r.pieces - 1) * 60 * 0.5, `the ${r.pieces} pieces came within ${spread.toFixed(0)} ms: not streamed`);
  checkTransport(page, grant.session_id, transport);
  say(`${mode} over ${transport}: session ${grant.session_id}, ${r.pieces} pieces over ${spread.toFixed(0)} ms, in order, once each`);
}

/** Appends an event to wsproxy:events as wsproxy would (E2E_EVENTS=simulated). */
function emitEvent(type, sessionId, connectionId, extra = {}) {
  const event = {
    type, session_id: sessionId, agent_id: 'web', connection_id: connectionId, process: 'e2e-sim', time: Date.now(), ...extra,
  };
  execFileSync('redis-cli', ['-p', REDIS_PORT, 'XADD', 'wsproxy:events', '*', 'event', JSON.stringify(event)]);
}

async function pauseWhileAway(page, transport) {
  const grant = await startSession(page, 'reliable', transport);
  const prompt = 'a long answer please';
  const id = await ask(page, prompt);
  await until(page, 'a few pieces', (rid) => window.agentDemo.replies[rid].chunks.length >= 4, id);
  await page.click('#leave');
  if (EVENTS === 'simulated') {
    emitEvent('disconnect', grant.session_id, 'e2e-sim:1', {
      code: 1000, reason: 'client', duration_ms: 1, messages_in: 1, messages_out: 1,
    });
  }
  const leftAt = await page.evaluate((rid) => window.agentDemo.replies[rid].chunks.length, id);
  const pieces = await page.evaluate((rid) => window.agentDemo.replies[rid].pieces, id);
  // Away longer than the rest of the reply takes (60 ms a piece), twice over.
  const away = Math.max(2000, (pieces - leftAt) * 60 * 2);
  await sleep(away);
  await page.click('#back');
  await until(page, 'back, resumed', () => window.agentDemo.state === 'open');
  if (EVENTS === 'simulated') {
    emitEvent('resume', grant.session_id, 'e2e-sim:2', {
      reliable: true, remote: '127.0.0.1:1', user_agent: null, query: {}, resumed: true, replayed: 0,
    });
  }
  await until(page, 'the whole reply after coming back', (rid) => window.agentDemo.replies[rid].done, id);
  const r = await checkReply(page, id, prompt);
  const after = r.msgs.filter((m) => m.connection === 2);
  const replayed = after.filter((m) => m.replayed).length;
  const live = after.filter((m) => !m.replayed && m.type === 'chunk').length;
  check(replayed <= 3, `${replayed} messages replayed: the agent went on while the page was away`);
  check(live >= 3, `only ${live} pieces came live after the return: the agent did not wait for it`);
  check((await page.evaluate(() => window.agentDemo.resumeFailures)).length === 0, 'a resume failed');
  checkTransport(page, grant.session_id, transport);
  say(`leave and come back over ${transport} (${EVENTS === '1' ? "wsproxy's events" : 'simulated events'}): session ${grant.session_id}, left after ${leftAt} of ${pieces} pieces for ${away} ms; ` +
      `${replayed} replayed, ${live} live after the return`);
}

/** A new tab that records its errors and which of wsproxy's paths it opened. */
async function newTab(context, pageErrors) {
  const page = await context.newPage();
  page.on('pageerror', (e) => pageErrors.push(e.message));
  page.wsproxyUrls = [];
  page.on('request', (r) => page.wsproxyUrls.push(r.url()));
  page.on('websocket', (ws) => page.wsproxyUrls.push(ws.url()));
  return page;
}

/** The page really went over `transport`: its session's SSE path or WebSocket, never the other. */
function checkTransport(page, sessionId, transport) {
  const sse = page.wsproxyUrls.filter((u) => u.includes(`/web/sse/${sessionId}`));
  const ws = page.wsproxyUrls.filter((u) => u.includes(`/web/ws/${sessionId}`));
  if (transport === 'sse') check(sse.length > 0 && ws.length === 0, `transport sse: ${sse.length} SSE requests, ${ws.length} WebSockets`);
  else check(ws.length > 0 && sse.length === 0, `transport websocket: ${ws.length} WebSockets, ${sse.length} SSE requests`);
}

/** What a tab got of one reply: its messages in order, and the reply's state. */
function replyState(page, id) {
  return page.evaluate((rid) => {
    const r = window.agentDemo.replies[rid];
    const msgs = window.agentDemo.received.filter((m) => m.reply_to === rid);
    return {
      pieces: r?.pieces, sent: r?.sent, got: r ? r.chunks.filter((c) => c !== undefined).length : 0,
      done: r?.done, stopped: r?.stopped, afterEnd: r?.afterEnd, outOfOrder: r?.outOfOrder, joinedAt: r?.joinedAt,
      stoppedAttr: r?.el.dataset.stopped, doneAttr: r?.el.dataset.done,
      types: msgs.map((m) => m.type), seqs: msgs.filter((m) => m.type === 'chunk').map((m) => m.seq),
      replayed: msgs.filter((m) => m.replayed).length,
    };
  }, id);
}

/** Two tabs (SSE and WebSocket) on one reliable session; one is reloaded mid-reply and stops it. */
async function stopAcrossTabs(context, pageErrors) {
  const a = await newTab(context, pageErrors);
  const grant = await startSession(a, 'reliable', 'sse');
  const sid = grant.session_id;
  const b = await newTab(context, pageErrors);
  await b.goto(`${APP_URL}/?transport=websocket#session=${sid}`);
  await until(b, 'the second tab joins the session', () => window.agentDemo.state === 'open');
  const joined = await b.evaluate(() => ({ sid: window.agentDemo.grant.session_id, joined: window.agentDemo.joined, reliable: window.agentDemo.grant.reliable }));
  check(joined.sid === sid && joined.joined && joined.reliable, `the second tab: ${JSON.stringify(joined)}`);

  const prompt = 'a long answer, to be stopped';
  const id = await ask(a, prompt);
  for (const [name, p] of [['A', a], ['B', b]]) {
    await until(p, `a few pieces in tab ${name}`, (rid) => (window.agentDemo.replies[rid]?.chunks.length ?? 0) >= 3, id);
  }
  const beforeReload = await replyState(b, id);
  await b.reload();
  await until(b, 'the reloaded tab rejoins', () => window.agentDemo.state === 'open');
  const rejoin = await b.evaluate(() => ({ sid: window.agentDemo.grant.session_id, welcome: window.agentDemo.welcomes[0], transport: window.agentDemo.transport }));
  check(rejoin.sid === sid && rejoin.transport === 'websocket', `the reloaded tab: ${JSON.stringify(rejoin)}`);
  check(rejoin.welcome?.resumed === true, `the reloaded tab did not resume from its position: ${JSON.stringify(rejoin.welcome)}`);
  await until(b, 'pieces in the reloaded tab', (rid) => {
    const r = window.agentDemo.replies[rid];
    return r && r.chunks.filter((c) => c !== undefined).length >= 2;
  }, id);
  const atStop = await replyState(b, id);
  check(!atStop.done && !atStop.stopped, 'the reply ended before Stop was pressed: make it longer (REPLY_WORDS)');
  await b.click('#stop');
  const lastSeenAtStop = atStop.seqs.at(-1);
  for (const [name, p] of [['A (sse)', a], ['B (websocket, reloaded)', b]]) {
    await until(p, `the stopped marker in tab ${name}`, (rid) => window.agentDemo.replies[rid].stopped, id, 5_000);
  }
  await sleep(25 * 60); // 25 piece intervals: nothing may follow the marker
  const states = { A: await replyState(a, id), B: await replyState(b, id) };
  for (const [name, r] of Object.entries(states)) {
    const where = `tab ${name}`;
    check(r.types.at(-1) === 'stopped', `${where}: the last message is ${r.types.at(-1)}, not stopped: ${r.types}`);
    check(r.types.filter((t) => t === 'stopped').length === 1, `${where}: ${r.types.filter((t) => t === 'stopped').length} stopped markers`);
    check(!r.types.includes('done') && !r.done && r.doneAttr === undefined, `${where}: the stopped reply is also done`);
    check(r.afterEnd === 0, `${where}: ${r.afterEnd} pieces after the marker`);
    check(r.stoppedAttr === 'true', `${where}: the page does not show the reply stopped`);
    check(r.outOfOrder === 0 && r.seqs.every((s, i) => i === 0 || s === r.seqs[i - 1] + 1), `${where}: pieces out of order or missing: ${r.seqs}`);
    check(r.sent < r.pieces, `${where}: stopped after ${r.sent} of ${r.pieces} pieces: it was not stopped`);
    check(r.seqs.at(-1) === r.sent - 1, `${where}: last piece ${r.seqs.at(-1)}, the marker says ${r.sent} were sent`);
    check(r.sent - 1 <= lastSeenAtStop + 8, `${where}: ${r.sent - 1 - lastSeenAtStop} pieces after Stop was pressed: not at once`);
  }
  if (process.env.E2E_SCREENSHOT) await b.screenshot({ path: process.env.E2E_SCREENSHOT, fullPage: true });
  check(states.A.seqs[0] === 0 && states.A.types[0] === 'start', `tab A missed the start: ${states.A.types.slice(0, 3)}`);
  // The reloaded tab picked up where it was: from the piece after the last it had saved, no gap.
  check(states.B.seqs[0] >= beforeReload.seqs.at(-1) + 1 && states.B.seqs[0] <= atStop.seqs[0], `tab B after the reload starts at piece ${states.B.seqs[0]}`);
  check(states.B.joinedAt === states.B.seqs[0], `tab B: joinedAt ${states.B.joinedAt}`);

  // A new prompt, from the reloaded tab: a whole reply in both.
  const prompt2 = 'and now a whole answer';
  const id2 = await ask(b, prompt2);
  for (const [name, p] of [['A', a], ['B', b]]) {
    await until(p, `the whole new reply in tab ${name}`, (rid) => window.agentDemo.replies[rid]?.done, id2, 20_000);
    await checkReply(p, id2, prompt2);
  }
  // Stop with nothing under way: nothing arrives, nothing fails.
  const counts = async () => [await a.evaluate(() => window.agentDemo.received.length), await b.evaluate(() => window.agentDemo.received.length)];
  const before = await counts();
  await a.click('#stop');
  await sleep(1_000);
  const after = await counts();
  check(after[0] === before[0] && after[1] === before[1], `a Stop with nothing under way: ${before} messages before, ${after} after`);
  for (const [name, p] of [['A', a], ['B', b]]) {
    const e = await p.evaluate(() => ({ errors: window.agentDemo.errors, stops: window.agentDemo.stops, state: window.agentDemo.state }));
    check(e.errors.length === 0 && e.state === 'open', `tab ${name}: ${JSON.stringify(e)}`);
  }
  checkTransport(a, sid, 'sse');
  checkTransport(b, sid, 'websocket');
  say(`stop across tabs: session ${sid}, A on SSE, B on WebSocket reloaded after piece ${beforeReload.seqs.at(-1)} ` +
      `(resumed, ${states.B.replayed} replayed, from piece ${states.B.seqs[0]}); Stop pressed in B after piece ${lastSeenAtStop}, ` +
      `stopped after ${states.A.sent} of ${states.A.pieces} pieces in both tabs, nothing after; the next reply whole in both`);
  await a.close();
  await b.close();
}

async function main() {
  check(APP_URL, 'APP_URL is required');
  const browser = await chromium.launch({
    executablePath: CHROMIUM_PATH,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking', '--disable-sync'],
    timeout: 30_000,
  });
  try {
    say(`Chromium ${browser.version()}, app ${APP_URL}`);
    const context = await browser.newContext();
    const pageErrors = [];
    // Nothing the page asks the app for may fail; a favicon it lacks would.
    const failed = [];
    const UNKNOWN = '/api/sessions/e2e-000000000000/join'; // asked below, must be 404
    context.on('response', (r) => {
      if (r.status() >= 400 && !r.url().endsWith(UNKNOWN)) failed.push(`${r.status()} ${r.url()}`);
    });
    for (const [mode, transport] of [['reliable', 'websocket'], ['plain', 'websocket'], ['reliable', 'sse'], ['plain', 'sse']]) {
      const page = await newTab(context, pageErrors);
      await streamedReply(page, mode, transport);
      const icon = await page.evaluate(async () => {
        const link = document.querySelector('link[rel~="icon"]');
        return link ? (await fetch(link.href)).status : null;
      });
      check(icon === 200, `the page's icon: ${icon === null ? 'none declared' : `HTTP ${icon}`}`);
      await page.close();
    }
    await stopAcrossTabs(context, pageErrors);
    {
      // An address naming a session the app does not know: the page says so and can start one.
      const page = await newTab(context, pageErrors);
      await page.goto(`${APP_URL}/#session=e2e-000000000000`);
      await until(page, 'the unknown session refused', () => !document.getElementById('start').disabled && window.agentDemo.grant === null);
      check(!page.url().includes('#session='), `the unknown session stays in the address: ${page.url()}`);
      check((await page.textContent('#log')).includes('cannot join e2e-000000000000: 404'), 'the page does not say why it did not join');
      await page.close();
      say('an unknown session in the address: 404, the page offers a new session');
    }
    if (EVENTS === '1' || EVENTS === 'simulated') {
      for (const transport of ['websocket', 'sse']) {
        const page = await newTab(context, pageErrors);
        await pauseWhileAway(page, transport);
        await page.close();
      }
    } else {
      say('SKIPPED leave and come back: E2E_EVENTS is not 1 or simulated');
    }
    check(pageErrors.length === 0, `errors in the page: ${pageErrors}`);
    check(failed.length === 0, `requests that failed: ${failed}`);
    say('passed');
  } finally {
    await browser.close();
  }
}

main().catch((e) => {
  console.error(`[fastapi-agent-e2e] FAILED: ${e instanceof TestFailure ? e.message : e.stack}`);
  process.exit(1);
});
