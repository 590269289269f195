#!/usr/bin/env node
// Real-browser end-to-end test of clients/js/session.js (sessions on
// /{agent}/ws/{session}) against a running wsproxy with reliable sessions on,
// and the Redis it uses.
//
//   WSPROXY_HTTP=http://127.0.0.1:8080 REDIS_URL=redis://127.0.0.1:6379 \
//     node test/session-e2e.mjs
//
// The wsproxy needs RELIABLE_SESSIONS=true and WS_ALLOWED_ORIGINS allowing
// the test page (http://127.0.0.1:<random port>; '*' is simplest).
// Optional: CHROMIUM_PATH (default /usr/bin/chromium), E2E_TIMEOUT_MS
// (default 60000).
//
// The page connects through a TCP relay in this process ("the link"), which
// the test can cut (both sockets reset: the browser sees code 1006, as when
// the network goes away), hold down (connections are reset as they arrive),
// or mute (what the server sends is dropped). The backend is this process
// too: it stores session tokens with SETEX and publishes with
// FCALL wsproxy_publish, speaking RESP itself (no npm package).
//
// What happens:
//   1. a reliable session in the page gets a stream of messages; in the
//      middle of it the link is cut and held down while the backend keeps
//      publishing; the page sends a message while disconnected; the link
//      comes back while the stream goes on. The page must have received
//      every message exactly once, in order, with the offsets FCALL
//      returned, the resume must have asked for the last offset it had, and
//      the message sent offline must be in wsproxy:up:{n} once;
//   2. with the link muted, the page sends a message that the server stores
//      but whose acknowledgement never arrives, and misses some messages;
//      after a cut the page resends it (same id) and gets duplicate:true,
//      the stream still has it once, the missed messages are replayed;
//   3. resumes the server refuses (an offset past the end, an unknown epoch)
//      call onResumeFailed and continue from the welcome's offset; a resume
//      from {epoch, "0-0"} replays the whole history;
//   4. a server that does not select wsproxy.v1 (a `ws` server here) makes
//      the session fail with reliable_unavailable, without retrying;
//   5. a plain session (reliable: false) sends JSON up (seen on
//      session:{id}:up) and gets raw frames down;
//   6. with no server, send() beyond maxUnacked rejects at once, close()
//      rejects what waits, and the reconnect delays follow the backoff;
//   7. a scripted wsproxy.v1 server does what a correct wsproxy cannot be
//      made to (duplicate messages, acknowledgements out of order,
//      not_stored, a 1009 close): the module must still deliver once, match
//      acknowledgements by id, reject what was not stored or too big.
// Exit status 0 on success, 1 on any failure (with the reason on stderr).

import http from 'node:http';
import net from 'node:net';
import path from 'node:path';
import { readFile } from 'node:fs/promises';
import { randomBytes } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import { isDeepStrictEqual } from 'node:util';
import { chromium } from 'playwright-core';
import { WebSocketServer } from 'ws';
import {
  TestFailure,
  Redis,
  check,
  describeFailure,
  freePort,
  makeUntil,
  printDiagnostics,
  requireEnv as env,
  runMain,
  sleep,
} from './harness.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const LIB_PATH = path.resolve(HERE, '..', 'session.js');
const CHROMIUM_PATH = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const TIMEOUT_MS = Number(process.env.E2E_TIMEOUT_MS || 60_000);
const STEP_MS = 10_000;
const AGENT = 'browser-e2e';

const say = (msg) => console.log(`[session-e2e] ${msg}`);
const until = makeUntil(STEP_MS, 20);

// ---------------------------------------------------------------------------
// The link: a TCP relay to wsproxy that the test can cut, hold down or mute.
// It also records each connection's HTTP request (line and headers).

function parseHead(head) {
  const [requestLine, ...lines] = head.split('\r\n');
  const headers = {};
  for (const l of lines) {
    const i = l.indexOf(':');
    if (i > 0) headers[l.slice(0, i).trim().toLowerCase()] = l.slice(i + 1).trim();
  }
  const target = requestLine.split(' ')[1] || '';
  return { requestLine, headers, url: new URL(target, 'http://link') };
}

async function startLink(host, port) {
  const link = { down: false, pairs: new Set(), requests: [], refused: 0 };
  const reset = (s) => {
    try {
      s.resetAndDestroy();
    } catch {
      s.destroy();
    }
  };
  link.server = net.createServer((client) => {
    if (link.down) {
      link.refused += 1;
      reset(client);
      return;
    }
    const upstream = net.connect(port, host);
    const pair = { client, upstream, muted: false, head: '', seen: false };
    link.pairs.add(pair);
    client.on('data', (chunk) => {
      if (!pair.seen) {
        pair.head += chunk.toString('latin1');
        const end = pair.head.indexOf('\r\n\r\n');
        if (end >= 0) {
          pair.seen = true;
          link.requests.push(parseHead(pair.head.slice(0, end)));
        }
      }
      upstream.write(chunk);
    });
    upstream.on('data', (chunk) => {
      if (!pair.muted) client.write(chunk);
    });
    const end = () => {
      link.pairs.delete(pair);
      client.destroy();
      upstream.destroy();
    };
    for (const s of [client, upstream]) {
      s.on('error', end);
      s.on('close', end);
    }
  });
  await new Promise((resolve, reject) => {
    link.server.once('error', reject);
    link.server.listen(0, '127.0.0.1', resolve);
  });
  link.url = `ws://127.0.0.1:${link.server.address().port}`;
  /** Resets every open connection, both sides. */
  link.cut = () => {
    for (const p of link.pairs) {
      reset(p.client);
      reset(p.upstream);
    }
    link.pairs.clear();
  };
  /** Drops what the server sends on the open connections from now on. */
  link.mute = () => {
    for (const p of link.pairs) p.muted = true;
  };
  return link;
}

// ---------------------------------------------------------------------------
// The page: loads session.js and records what each session's callbacks see.

const PAGE_HTML = `<!doctype html>
<html>
<head><meta charset="utf-8"><title>wsproxy session e2e</title>
<link rel="icon" href="data:,"></head>
<body>
<script type="module">
  import * as mod from './session.js';
  const rec = {};
  window.mod = mod;
  window.rec = rec;
  window.openRecorded = (name, options) => {
    const r = { messages: [], acks: [], resumeFailed: [], states: [], welcomes: [], errors: [], sends: [] };
    rec[name] = r;
    r.session = mod.openSession({
      ...options,
      onMessage: (data, info) => r.messages.push({ data, ...info }),
      onAck: (ack) => r.acks.push(ack),
      onResumeFailed: (failure) => r.resumeFailed.push(failure),
      onStateChange: (state, info) => {
        r.states.push({ state, attempt: info.attempt, delayMs: info.delayMs, code: info.code, error: info.error && info.error.code });
        if (info.welcome) r.welcomes.push(info.welcome);
      },
      onError: (e) => r.errors.push({ code: e.code, message: e.message, fatal: e.fatal }),
    });
    r.ready = r.session.ready.then((welcome) => ({ welcome }), (e) => ({ code: e.code, message: e.message }));
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

const started = { browser: null, staticServer: null, link: null, fake: null, scripted: null, redis: [] };
const diagnostics = { console: [], pageErrors: [] };

async function run() {
  const base = env('WSPROXY_HTTP').replace(/\/+$/, '');
  check(/^https?:\/\//.test(base), `WSPROXY_HTTP must start with http:// or https:// (got ${base})`);
  const target = new URL(base);
  check(target.protocol === 'http:', 'this test relays plain TCP: WSPROXY_HTTP must be http://');
  const redis = await Redis.connectUrl(env('REDIS_URL'));
  started.redis.push(redis);
  const redisUrl = env('REDIS_URL');

  const nonce = `${Date.now().toString(36)}-${randomBytes(3).toString('hex')}`;
  const link = await startLink(target.hostname, Number(target.port || 80));
  started.link = link;
  const st = await startStaticServer();
  started.staticServer = st.server;

  started.browser = await chromium.launch({
    executablePath: CHROMIUM_PATH,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    timeout: 30_000,
  });
  const page = await (await started.browser.newContext()).newPage();
  page.setDefaultTimeout(STEP_MS);
  page.on('console', (m) => diagnostics.console.push(`${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => diagnostics.pageErrors.push(String(e && e.stack ? e.stack : e)));
  const resp = await page.goto(`${st.origin}/`, { waitUntil: 'load' });
  check(resp && resp.status() === 200, `test page: HTTP ${resp && resp.status()}`);
  await page.waitForFunction(() => window.e2eReady === true).catch(() => {
    throw new TestFailure(`session.js did not load in the page: ${diagnostics.pageErrors.join('\n')}`);
  });
  say(`session.js loaded in Chromium ${started.browser.version()}; wsproxy ${base} through the link ${link.url}`);

  const snap = (name) => page.evaluate((n) => window.snapshot(n), name);
  const open = (name, options) => page.evaluate(([n, o]) => window.openRecorded(n, o), [name, options]);
  const ready = (name) =>
    page.evaluate(
      ([n, ms]) => Promise.race([window.rec[n].ready, new Promise((r) => setTimeout(() => r({ code: 'test: still not ready' }), ms))]),
      [name, STEP_MS],
    );
  const send = (name, data, options) => page.evaluate(([n, d, o]) => window.sendRecorded(n, d, o), [name, data, options]);
  const brief = async (name) => {
    const s = await snap(name);
    return `${name}: state ${s.state}, ${s.messages.length} messages (last ${JSON.stringify(s.messages.at(-1))}), ` +
      `welcomes ${JSON.stringify(s.welcomes)}, errors ${JSON.stringify(s.errors.slice(-5))}, sends ${JSON.stringify(s.sends)}, ` +
      `states ${JSON.stringify(s.states.slice(-8))}`;
  };

  const newSession = async (sessionId) => {
    const token = randomBytes(16).toString('hex');
    await redis.command('SETEX', `session:${sessionId}:auth`, 300, token);
    return token;
  };
  const [redisSeconds] = await redis.command('TIME');
  const sinceId = `${(Number(redisSeconds) - 5) * 1000}-0`;
  /** This session's entries in the client-message streams, as objects. */
  const upEntries = async (sessionId) => {
    const streams = [];
    let cursor = '0';
    do {
      const [next, keys] = await redis.command('SCAN', cursor, 'MATCH', 'wsproxy:up:*', 'COUNT', 1000, 'TYPE', 'stream');
      cursor = next;
      streams.push(...keys.filter((k) => /^wsproxy:up:\d+$/.test(k)));
    } while (cursor !== '0');
    const out = [];
    for (const stream of streams) {
      for (const [entryId, fields] of await redis.command('XRANGE', stream, sinceId, '+')) {
        const e = { stream, entryId };
        for (let i = 0; i < fields.length; i += 2) e[fields[i]] = fields[i + 1];
        if (e.session === sessionId) out.push(e);
      }
    }
    return out;
  };

  // 1. A stream with a cut in the middle ---------------------------------------
  const sid = `js-e2e-${nonce}`;
  const token = await newSession(sid);
  const history = `session:${sid}:history`;
  const published = [];
  const publish = async (n) => {
    const data = { n, text: `message ${n}` };
    const offset = await redis.command('FCALL', 'wsproxy_publish', 1, history, JSON.stringify(data));
    published[n - 1] = { data, offset };
  };
  const expectAll = async (name, count, what) => {
    await until(`${what}: ${count} messages`, async () => (await snap(name)).messages.length >= count, () => brief(name));
    const { messages, duplicatesDropped } = await snap(name);
    check(messages.length === count, `${what}: ${messages.length} messages, expected ${count}: ${JSON.stringify(messages.slice(count))}`);
    for (let i = 0; i < count; i += 1) {
      const got = messages[i];
      const want = published[i];
      check(
        isDeepStrictEqual(got.data, want.data) && got.offset === want.offset,
        `${what}: message ${i + 1} is ${JSON.stringify(got)}, expected ${JSON.stringify(want)} (lost, duplicated or out of order)`,
      );
    }
    return { messages, duplicatesDropped };
  };

  await open('main', { url: link.url, agentId: AGENT, sessionId: sid, token, backoff: { initialMs: 50, maxMs: 400 } });
  const first = await ready('main');
  check(first.welcome, `main: ready rejected: ${JSON.stringify(first)}; ${await brief('main')}`);
  const w0 = first.welcome;
  check(w0.type === 'welcome' && w0.session_id === sid && typeof w0.epoch === 'string' && w0.resumed === undefined, `main: first welcome ${JSON.stringify(w0)}`);
  const req0 = link.requests.at(-1);
  check(req0.url.pathname === `/${AGENT}/ws/${sid}`, `main: connected to ${req0.requestLine}`);
  check(req0.url.searchParams.get('access_token') === token, `main: the token is not the access_token parameter: ${req0.requestLine}`);
  check(!req0.url.searchParams.has('epoch') && !req0.url.searchParams.has('offset'), `main: a first connection with a position: ${req0.requestLine}`);
  check(req0.headers['sec-websocket-protocol'] === 'wsproxy.v1', `main: offered ${JSON.stringify(req0.headers['sec-websocket-protocol'])}, not wsproxy.v1`);
  const epoch = w0.epoch;
  say(`main: welcomed (epoch ${epoch}); the request was ${req0.url.pathname}?access_token=…, protocol wsproxy.v1`);

  for (let n = 1; n <= 40; n += 1) await publish(n);
  await expectAll('main', 40, 'before the cut');

  const cutAt = { received: 0 };
  let upSince = 0;
  let last = 40;
  const stream = (async () => {
    // Publishes until at least 200, and for 700 ms after the link is back,
    // so that the resume runs while the backend keeps publishing.
    while (last < 200 || !upSince || Date.now() - upSince < 700) {
      last += 1;
      await publish(last);
      await sleep(4);
    }
  })();
  stream.catch(() => {});
  await until('main: 60 messages of the stream', async () => (await snap('main')).messages.length >= 60, () => brief('main'));
  link.down = true;
  link.cut();
  cutAt.received = (await snap('main')).messages.length;
  cutAt.published = last;
  say(`main: link cut after ${cutAt.received} messages received (${cutAt.published} published); reconnects are refused`);

  await until(
    'main: two refused reconnects',
    async () => (await snap('main')).errors.filter((e) => e.code === 'connect_failed').length >= 2,
    () => brief('main'),
  );
  const offline = { kind: 'sent offline', nonce };
  const offlineK = await send('main', offline);
  let s = await snap('main');
  check(s.state !== 'open', `main: state ${s.state} while the link is down`);
  check(s.sends[offlineK].status === 'pending' && s.unacked === 1, `main: a message sent offline is ${JSON.stringify(s.sends[offlineK])}, unacked ${s.unacked}`);
  check(s.states.some((x) => x.state === 'backoff' && x.delayMs > 0 && x.delayMs <= 400), `main: no backoff state: ${JSON.stringify(s.states)}`);
  check(s.errors.every((e) => !e.fatal), `main: a fatal error: ${JSON.stringify(s.errors)}`);
  await sleep(250); // more to replay
  const lastBeforeResume = s.messages.at(-1);
  check(s.position && s.position.epoch === epoch && s.position.offset === lastBeforeResume.offset, `main: position ${JSON.stringify(s.position)}, expected the last message's offset ${lastBeforeResume.offset}`);
  const requestsBefore = link.requests.length;
  link.down = false;
  upSince = Date.now();
  const publishedAtUp = last;
  say(`main: ${link.refused} connections refused meanwhile; link up again while publishing goes on`);

  await stream;
  const total = last;
  const { duplicatesDropped } = await expectAll('main', total, 'after the resume');
  s = await snap('main');
  // The first reliable connection after the outage (a plain probe of the
  // module may come first, when an attempt failed just before).
  const reliableAfter = (from) => link.requests.slice(from).find((r) => r.headers['sec-websocket-protocol'] === 'wsproxy.v1');
  const resumeReq = reliableAfter(requestsBefore);
  check(resumeReq, 'main: no connection after the link came back');
  check(
    resumeReq.url.searchParams.get('epoch') === epoch && resumeReq.url.searchParams.get('offset') === lastBeforeResume.offset &&
      resumeReq.url.searchParams.get('access_token') === token,
    `main: the resume asked for ${resumeReq.requestLine}, expected epoch=${epoch}&offset=${lastBeforeResume.offset}`,
  );
  const w1 = s.welcomes[1];
  check(w1 && w1.resumed === true && w1.epoch === epoch && w1.replayed > 0, `main: the resume's welcome is ${JSON.stringify(w1)}`);
  const replayed = s.messages.filter((m) => m.replayed);
  const firstReplayed = s.messages.findIndex((m) => m.replayed);
  check(replayed.length === w1.replayed, `main: ${replayed.length} messages flagged replayed, the welcome said ${w1.replayed}`);
  check(s.messages[firstReplayed - 1].offset === lastBeforeResume.offset, 'main: the replay does not start right after the last message before the cut');
  check(duplicatesDropped === 0, `main: the module dropped ${duplicatesDropped} duplicate messages (the server sent them)`);
  say(`main: all ${total} messages exactly once and in order; resumed from ${lastBeforeResume.offset} with ${w1.replayed} replayed; ${publishedAtUp - cutAt.published} published during the outage, ${total - publishedAtUp} after`);

  await until('main: the offline message acknowledged', async () => (await snap('main')).sends[offlineK].status !== 'pending', () => brief('main'));
  s = await snap('main');
  const offlineAck = s.sends[offlineK];
  check(offlineAck.status === 'acked' && offlineAck.ack.duplicate === false && typeof offlineAck.ack.id === 'string', `main: the offline message: ${JSON.stringify(offlineAck)}`);
  let entries = (await upEntries(sid)).filter((e) => e.id === offlineAck.ack.id);
  check(entries.length === 1, `wsproxy:up: ${entries.length} entries for the offline message ${offlineAck.ack.id}: ${JSON.stringify(entries)}`);
  check(isDeepStrictEqual(JSON.parse(entries[0].data), offline) && entries[0].agent === AGENT, `wsproxy:up: the entry is ${JSON.stringify(entries[0])}`);
  check(entries[0].entryId === offlineAck.ack.offset, `wsproxy:up: entry ${entries[0].entryId}, but the ack said ${offlineAck.ack.offset}`);
  check(s.acks.length === 1 && s.acks[0].id === offlineAck.ack.id, `main: onAck saw ${JSON.stringify(s.acks)}`);
  say(`main: the message sent offline was sent after the reconnect, acknowledged (${offlineAck.ack.offset}) and stored once in ${entries[0].stream}`);

  // 2. The acknowledgement is lost: the resend is stored once ------------------
  link.mute();
  const lost = { kind: 'ack lost', nonce };
  const lostK = await send('main', lost);
  for (let n = total + 1; n <= total + 10; n += 1) await publish(n);
  const stored = await until(
    'wsproxy:up: the message sent on the muted link',
    async () => (await upEntries(sid)).find((e) => JSON.parse(e.data).kind === 'ack lost'),
    () => brief('main'),
  );
  await sleep(100);
  s = await snap('main');
  check(s.sends[lostK].status === 'pending', `main: the muted link let an answer through: ${JSON.stringify(s.sends[lostK])}`);
  check(s.messages.length === total, `main: the muted link let messages through: ${s.messages.length}`);
  const requestsMuted = link.requests.length;
  link.cut();
  await expectAll('main', total + 10, 'after the muted link was cut');
  await until('main: the resend acknowledged', async () => (await snap('main')).sends[lostK].status !== 'pending', () => brief('main'));
  s = await snap('main');
  const lostAck = s.sends[lostK];
  check(lostAck.status === 'acked' && lostAck.ack.duplicate === true, `main: the resend got ${JSON.stringify(lostAck)}, expected an ack with duplicate:true`);
  check(lostAck.ack.id === stored.id && lostAck.ack.offset === stored.entryId, `main: the resend's ack ${JSON.stringify(lostAck.ack)} is not for the stored entry ${JSON.stringify(stored)}`);
  entries = (await upEntries(sid)).filter((e) => e.id === stored.id);
  check(entries.length === 1, `wsproxy:up: the resent message is there ${entries.length} times`);
  const w2 = s.welcomes[2];
  check(w2 && w2.resumed === true && w2.replayed === 10, `main: the third welcome is ${JSON.stringify(w2)}, expected 10 replayed`);
  const thirdReq = reliableAfter(requestsMuted);
  check(thirdReq.url.searchParams.get('offset') === published[total - 1].offset, `main: the third connection asked for ${thirdReq.requestLine}`);
  check(s.resumeFailed.length === 0, `main: onResumeFailed was called: ${JSON.stringify(s.resumeFailed)}`);
  say(`main: an unacknowledged message was resent with its id ${stored.id} and acknowledged as a duplicate; stored once`);

  // 3. Resumes the server refuses, and the whole history --------------------------
  const lastOffset = published[total + 9].offset;
  await open('ahead', { url: link.url, agentId: AGENT, sessionId: sid, token, resumeFrom: { epoch, offset: '99999999999999-0' } });
  await open('stale', { url: link.url, agentId: AGENT, sessionId: sid, token, resumeFrom: { epoch: '1', offset: '0-0' } });
  await open('whole', { url: link.url, agentId: AGENT, sessionId: sid, token, resumeFrom: { epoch, offset: '0-0' } });
  for (const name of ['ahead', 'stale', 'whole']) {
    const r = await ready(name);
    check(r.welcome, `${name}: ready rejected: ${JSON.stringify(r)}`);
  }
  for (const [name, reason, from] of [['ahead', 'unknown_offset', '99999999999999-0'], ['stale', 'epoch_changed', '0-0']]) {
    s = await snap(name);
    const want = { reason, epoch, offset: lastOffset, from: { epoch: name === 'stale' ? '1' : epoch, offset: from } };
    check(s.resumeFailed.length === 1 && isDeepStrictEqual(s.resumeFailed[0], want), `${name}: onResumeFailed got ${JSON.stringify(s.resumeFailed)}, expected ${JSON.stringify(want)}`);
    check(s.position.epoch === epoch && s.position.offset === lastOffset, `${name}: continues from ${JSON.stringify(s.position)}, expected the welcome's offset`);
    check(s.messages.length === 0, `${name}: messages before any was published: ${JSON.stringify(s.messages)}`);
  }
  const all = await expectAll('whole', total + 10, 'whole: the replay from 0-0');
  check(all.messages.every((m) => m.replayed), 'whole: not every message of the history was flagged replayed');
  await publish(total + 11);
  for (const name of ['ahead', 'stale']) {
    await until(`${name}: the next message`, async () => (await snap(name)).messages.length >= 1, () => brief(name));
    await sleep(50);
    s = await snap(name);
    check(s.messages.length === 1 && s.messages[0].offset === published[total + 10].offset && !s.messages[0].replayed, `${name}: after the refused resume got ${JSON.stringify(s.messages)}`);
  }
  await expectAll('whole', total + 11, 'whole: live after the replay');
  await expectAll('main', total + 11, 'main: live');
  say('onResumeFailed: unknown_offset and epoch_changed reported, both continue from the welcome; {epoch, 0-0} replays the whole history');
  for (const name of ['main', 'ahead', 'stale', 'whole']) await page.evaluate((n) => window.rec[n].session.close(), name);

  // 4. A server that does not select wsproxy.v1 -------------------------------
  const fake = { connections: 0, offered: [] };
  started.fake = new WebSocketServer({ host: '127.0.0.1', port: 0, handleProtocols: () => false });
  await new Promise((resolve) => started.fake.once('listening', resolve));
  started.fake.on('connection', (_ws, req) => {
    fake.connections += 1;
    fake.offered.push(req.headers['sec-websocket-protocol']);
  });
  await open('unselected', { url: `ws://127.0.0.1:${started.fake.address().port}`, agentId: AGENT, sessionId: sid, token, backoff: { initialMs: 20, maxMs: 40 } });
  const sentEarly = await send('unselected', { early: true });
  const refused = await ready('unselected');
  check(refused.code === 'reliable_unavailable', `unselected: ready gave ${JSON.stringify(refused)}, expected the code reliable_unavailable`);
  await sleep(300);
  s = await snap('unselected');
  check(s.state === 'closed' && s.errors.some((e) => e.code === 'reliable_unavailable' && e.fatal), `unselected: state ${s.state}, errors ${JSON.stringify(s.errors)}`);
  check(s.sends[sentEarly].status === 'rejected' && s.sends[sentEarly].code === 'reliable_unavailable', `unselected: a waiting send: ${JSON.stringify(s.sends[sentEarly])}`);
  // Chromium fails a handshake that offered a subprotocol and got none back;
  // the module tells that from an unreachable server with a plain probe,
  // three attempts in a row.
  const pattern = ['wsproxy.v1', undefined, 'wsproxy.v1', undefined, 'wsproxy.v1', undefined];
  check(
    isDeepStrictEqual(fake.offered, pattern),
    `unselected: ${fake.connections} connections offering ${JSON.stringify(fake.offered)}, expected ${JSON.stringify(pattern)} (three attempts, each with a plain probe), then no retry`,
  );
  const hints = s.errors.filter((e) => e.code === 'connect_failed' && /plain connection succeeded/.test(e.message));
  check(hints.length === 2, `unselected: the first two attempts should say a plain connection succeeded: ${JSON.stringify(s.errors)}`);
  say(`a server without wsproxy.v1: ${refused.code} after three attempts with plain probes, not retried (${refused.message})`);

  // 5. A plain session ----------------------------------------------------------
  const plainSid = `js-e2e-plain-${nonce}`;
  const plainToken = await newSession(plainSid);
  const sub = await Redis.connectUrl(redisUrl);
  started.redis.push(sub);
  const up = [];
  await sub.command('SUBSCRIBE', `session:${plainSid}:up`);
  sub.onMessage = (channel, message) => up.push({ channel, message });
  const requestsPlain = link.requests.length;
  await open('plain', { url: link.url, agentId: AGENT, sessionId: plainSid, token: plainToken, reliable: false });
  const plainReady = await ready('plain');
  check(plainReady.welcome === null, `plain: ready gave ${JSON.stringify(plainReady)}`);
  check(link.requests[requestsPlain].headers['sec-websocket-protocol'] === undefined, `plain: offered ${link.requests[requestsPlain].headers['sec-websocket-protocol']}`);
  const plainK = await send('plain', { hello: 'plain', nonce });
  await until('session:{id}:up: the plain message', async () => up.length >= 1, async () => JSON.stringify(await snap('plain')));
  check(up[0].message === JSON.stringify({ hello: 'plain', nonce }), `session:{id}:up got ${JSON.stringify(up)}`);
  s = await snap('plain');
  check(s.sends[plainK].status === 'acked' && s.sends[plainK].ack === null, `plain: send gave ${JSON.stringify(s.sends[plainK])}`);
  await redis.command('PUBLISH', `session:${plainSid}:down`, 'raw text, not JSON');
  await redis.command('FCALL', 'wsproxy_publish', 1, `session:${plainSid}:history`, '{"via":"fcall"}');
  await until('plain: two frames', async () => (await snap('plain')).messages.length >= 2, () => brief('plain'));
  s = await snap('plain');
  check(
    isDeepStrictEqual(s.messages, [{ data: 'raw text, not JSON' }, { data: '{"via":"fcall"}' }]),
    `plain: got ${JSON.stringify(s.messages)}, expected the frames as published`,
  );
  await page.evaluate(() => window.rec.plain.session.close());
  const plainClosed = await page.evaluate(() => window.rec.plain.session.send({ after: 'close' }).catch((e) => e.code));
  check(plainClosed === 'closed', `plain: send after close gave ${plainClosed}`);
  say('plain: JSON up on session:{id}:up, raw frames down, no subprotocol offered');

  // 6. No server: a full queue, close(), the backoff ------------------------------
  const nowhere = `ws://127.0.0.1:${await freePort()}`;
  await open('nowhere', { url: nowhere, agentId: AGENT, sessionId: sid, token, maxUnacked: 2, backoff: { initialMs: 20, maxMs: 80 } });
  const n1 = await send('nowhere', 1);
  const n2 = await send('nowhere', 2);
  const n3 = await send('nowhere', 3);
  await sleep(20);
  s = await snap('nowhere');
  check(s.sends[n3].status === 'rejected' && s.sends[n3].code === 'queue_full', `nowhere: the third send: ${JSON.stringify(s.sends[n3])}`);
  check(s.sends[n1].status === 'pending' && s.sends[n2].status === 'pending' && s.unacked === 2, `nowhere: ${JSON.stringify(s.sends)}`);
  const invalid = await page.evaluate(() => window.rec.nowhere.session.send(undefined).catch((e) => e.code));
  check(invalid === 'invalid_data', `nowhere: send(undefined) gave ${invalid}`);
  await until('nowhere: 6 attempts', async () => (await snap('nowhere')).states.filter((x) => x.state === 'backoff').length >= 6, () => brief('nowhere'));
  await page.evaluate(() => window.rec.nowhere.session.close());
  await sleep(20);
  s = await snap('nowhere');
  const delays = s.states.filter((x) => x.state === 'backoff').map((x) => x.delayMs);
  delays.forEach((d, i) => {
    const ceiling = Math.min(80, 20 * 2 ** (i + 1));
    check(d >= ceiling / 2 - 1 && d <= ceiling + 1, `nowhere: backoff delay ${i + 1} is ${d} ms, outside [${ceiling / 2}, ${ceiling}] (delays ${delays})`);
  });
  check(s.state === 'closed' && s.sends[n1].code === 'closed' && s.sends[n2].code === 'closed', `nowhere: after close(): ${s.state}, ${JSON.stringify(s.sends)}`);
  check((await ready('nowhere')).code === 'closed', 'nowhere: ready did not reject with closed');
  const attempts = s.states.filter((x) => x.state === 'connecting').length;
  await sleep(200);
  check((await snap('nowhere')).states.filter((x) => x.state === 'connecting').length === attempts, 'nowhere: it kept connecting after close()');
  say(`no server: queue_full at maxUnacked, waiting sends rejected by close(), backoff delays ${delays.join(', ')} ms`);

  // 7. A scripted wsproxy.v1 server ------------------------------------------------
  const script = { urls: [], got: [] };
  started.scripted = new WebSocketServer({
    host: '127.0.0.1',
    port: 0,
    handleProtocols: (offered) => (offered.has('wsproxy.v1') ? 'wsproxy.v1' : false),
  });
  await new Promise((resolve) => started.scripted.once('listening', resolve));
  started.scripted.on('connection', (ws, req) => {
    script.urls.push(new URL(req.url, 'http://scripted'));
    const put = (frame) => ws.send(JSON.stringify(frame));
    if (script.urls.length > 1) {
      put({ type: 'welcome', session_id: sid, epoch: 'E1', offset: '8-0', resumed: true, replayed: 0 });
      return;
    }
    put({ type: 'welcome', session_id: sid, epoch: 'E1', offset: '5-0' });
    for (const [offset, n] of [['6-0', 6], ['7-0', 7], ['7-0', 7], ['6-0', 6], ['8-0', 8]]) put({ type: 'message', offset, data: { n } });
    const waiting = [];
    ws.on('message', (raw) => {
      const m = JSON.parse(String(raw));
      script.got.push(m);
      if (m.data.k === 'a' || m.data.k === 'b') {
        waiting.push(m);
        if (waiting.length === 2) {
          // Out of order: b's acknowledgement first.
          put({ type: 'ack', id: waiting[1].id, offset: '100-1' });
          put({ type: 'ack', id: waiting[0].id, offset: '100-0' });
        }
      } else if (m.data.k === 'c') {
        put({ type: 'error', error: 'not_stored', id: m.id, message: 'the message was not stored, Redis is unavailable' });
      } else if (m.data.k === 'd') {
        put({ type: 'error', error: 'invalid_message', message: 'scripted refusal' });
        ws.close(1009, 'too big');
      }
    });
  });
  await open('scripted', { url: `ws://127.0.0.1:${started.scripted.address().port}`, agentId: AGENT, sessionId: sid, token, backoff: { initialMs: 20, maxMs: 40 } });
  check((await ready('scripted')).welcome, `scripted: not ready: ${await brief('scripted')}`);
  const sk = {};
  for (const k of ['a', 'b', 'c', 'd']) sk[k] = await send('scripted', { k });
  await until('scripted: the second connection', async () => (await snap('scripted')).welcomes.length >= 2, () => brief('scripted'));
  await sleep(50);
  s = await snap('scripted');
  check(
    isDeepStrictEqual(s.messages.map((m) => [m.offset, m.data.n]), [['6-0', 6], ['7-0', 7], ['8-0', 8]]) && s.duplicatesDropped === 2,
    `scripted: delivered ${JSON.stringify(s.messages)} (dropped ${s.duplicatesDropped}), expected 6-0, 7-0, 8-0 once each and 2 dropped`,
  );
  const idOf = (k) => script.got.find((m) => m.data.k === k).id;
  for (const [k, offset] of [['a', '100-0'], ['b', '100-1']]) {
    const x = s.sends[sk[k]];
    check(x.status === 'acked' && x.ack.id === idOf(k) && x.ack.offset === offset, `scripted: send ${k} gave ${JSON.stringify(x)}, expected the ack for id ${idOf(k)} at ${offset}`);
  }
  check(s.sends[sk.c].status === 'rejected' && s.sends[sk.c].code === 'not_stored', `scripted: send c gave ${JSON.stringify(s.sends[sk.c])}, expected not_stored`);
  check(s.sends[sk.d].status === 'rejected' && s.sends[sk.d].code === 'too_large', `scripted: send d gave ${JSON.stringify(s.sends[sk.d])}, expected too_large after the 1009 close`);
  check(s.errors.some((e) => e.code === 'server_error' && /invalid_message/.test(e.message)), `scripted: the refusal was not reported: ${JSON.stringify(s.errors)}`);
  check(script.got.length === 4 && s.unacked === 0, `scripted: the server got ${JSON.stringify(script.got)}; ${s.unacked} still unacknowledged (nothing should be resent)`);
  check(script.urls[1].searchParams.get('epoch') === 'E1' && script.urls[1].searchParams.get('offset') === '8-0', `scripted: the reconnect asked for ${script.urls[1]}`);
  await page.evaluate(() => window.rec.scripted.session.close());
  say('scripted server: duplicates dropped, acks matched by id out of order, not_stored and 1009 rejected, not resent');

  check(diagnostics.pageErrors.length === 0, `page errors: ${diagnostics.pageErrors.join('\n')}`);
}

async function cleanup() {
  const { browser, staticServer, link, fake, scripted, redis } = started;
  started.browser = started.staticServer = started.link = started.fake = started.scripted = null;
  if (browser) await Promise.race([browser.close().catch(() => {}), sleep(10_000)]);
  for (const r of redis.splice(0)) r.close();
  for (const server of [fake, scripted]) {
    if (!server) continue;
    for (const c of server.clients) c.terminate();
    await new Promise((r) => server.close(() => r()));
  }
  if (link) {
    link.cut();
    await new Promise((r) => link.server.close(() => r()));
  }
  if (staticServer) {
    staticServer.closeAllConnections?.();
    await new Promise((r) => staticServer.close(() => r()));
  }
}

runMain({
  tag: 'session-e2e',
  run,
  cleanup,
  report: (err) => {
    console.error(`\n[session-e2e] FAILED: ${describeFailure(err)}`);
    printDiagnostics('session-e2e', diagnostics);
  },
  timeoutMs: TIMEOUT_MS,
  hardStopMs: 15_000,
});
