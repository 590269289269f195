#!/usr/bin/env node
// The example's page in headless Chromium, against the example app (and its
// agent), wsproxy and Redis that run-e2e.sh has started.
//
//   APP_URL=http://127.0.0.1:8001 [E2E_EVENTS=1|simulated] [REDIS_PORT=6379] node e2e.mjs
//
// 1. reliable session: the page starts a session, sends a prompt, and the
//    reply arrives piece by piece (many messages, spread over time, each
//    piece once and in order, then `done`);
// 2. plain session: the same;
// 3. (E2E_EVENTS=1: wsproxy has lifecycle events) reliable session, the page
//    leaves in the middle of a reply and stays away longer than the rest of
//    the reply would take; the agent must pause (few messages wait in the
//    history, replayed on return) and go on after the page comes back, with
//    every piece once and in order.
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

async function startSession(page, mode) {
  await page.goto(`${APP_URL}/?mode=${mode}&user=e2e`);
  await page.click('#start');
  await until(page, `${mode} session open`, () => window.agentDemo.state === 'open');
  const grant = await page.evaluate(() => window.agentDemo.grant);
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

async function streamedReply(page, mode) {
  const grant = await startSession(page, mode);
  const prompt = `hello from the ${mode} page`;
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
  say(`${mode}: session ${grant.session_id}, ${r.pieces} pieces over ${spread.toFixed(0)} ms, in order, once each`);
}

/** Appends an event to wsproxy:events as wsproxy would (E2E_EVENTS=simulated). */
function emitEvent(type, sessionId, connectionId, extra = {}) {
  const event = {
    type, session_id: sessionId, agent_id: 'web', connection_id: connectionId, process: 'e2e-sim', time: Date.now(), ...extra,
  };
  execFileSync('redis-cli', ['-p', REDIS_PORT, 'XADD', 'wsproxy:events', '*', 'event', JSON.stringify(event)]);
}

async function pauseWhileAway(page) {
  const grant = await startSession(page, 'reliable');
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
  say(`leave and come back (${EVENTS === '1' ? "wsproxy's events" : 'simulated events'}): session ${grant.session_id}, left after ${leftAt} of ${pieces} pieces for ${away} ms; ` +
      `${replayed} replayed, ${live} live after the return`);
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
    context.on('response', (r) => {
      if (r.status() >= 400) failed.push(`${r.status()} ${r.url()}`);
    });
    for (const mode of ['reliable', 'plain']) {
      const page = await context.newPage();
      page.on('pageerror', (e) => pageErrors.push(e.message));
      await streamedReply(page, mode);
      const icon = await page.evaluate(async () => {
        const link = document.querySelector('link[rel~="icon"]');
        return link ? (await fetch(link.href)).status : null;
      });
      check(icon === 200, `the page's icon: ${icon === null ? 'none declared' : `HTTP ${icon}`}`);
      await page.close();
    }
    if (EVENTS === '1' || EVENTS === 'simulated') {
      const page = await context.newPage();
      page.on('pageerror', (e) => pageErrors.push(e.message));
      await pauseWhileAway(page);
      await page.close();
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
