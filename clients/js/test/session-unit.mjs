// Unit tests of session.js that need no server and no browser: a fake
// WebSocket class stands in for the network. Run: node --test test/session-unit.mjs
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { openSession, PROTOCOL } from '../session.js';

/**
 * A WebSocket that opens, selects wsproxy.v1, sends a welcome and then
 * closes (code 1013) at once: a server that accepts the session, then
 * drops it, for ever.
 */
class FlappingWebSocket {
  static opened = 0;
  constructor(url, protocols) {
    this.url = url;
    this.protocol = '';
    this.readyState = 0;
    FlappingWebSocket.opened += 1;
    setTimeout(() => {
      this.readyState = 1;
      this.protocol = Array.isArray(protocols) && protocols.includes(PROTOCOL) ? PROTOCOL : '';
      this.onopen?.({});
      this.onmessage?.({ data: JSON.stringify({ type: 'welcome', session_id: 's1', epoch: 'e1', offset: '0-0' }) });
      this.readyState = 3;
      this.onclose?.({ code: 1013, reason: 'try again later' });
    }, 0);
  }
  send() {}
  close() {
    this.readyState = 3;
  }
}

function flapping(extra = {}) {
  FlappingWebSocket.opened = 0;
  const delays = [];
  const errors = [];
  let closedWith = null;
  const session = openSession({
    url: 'ws://127.0.0.1:1',
    agentId: 'agent',
    sessionId: 's1',
    token: 't',
    WebSocket: FlappingWebSocket,
    onMessage() {},
    onResumeFailed() {},
    onError: (e) => errors.push(e),
    onStateChange(state, info) {
      if (state === 'backoff') delays.push(info.delayMs);
      if (state === 'closed') closedWith = info.error ?? null;
    },
    ...extra,
  });
  session.ready.catch(() => {});
  return { session, delays, errors, done: () => closedWith };
}

const until = async (cond, ms = 5000) => {
  // performance.now: a test below moves Date.now.
  const end = performance.now() + ms;
  while (!cond()) {
    if (performance.now() > end) throw new Error('timed out');
    await new Promise((r) => setTimeout(r, 5));
  }
};

test('a connection dropped right after its welcome counts as a failed attempt: the backoff grows and maxAttempts ends it', { timeout: 20_000 }, async () => {
  const f = flapping({ backoff: { initialMs: 4, maxMs: 1000, maxAttempts: 5 } });
  try {
    await until(() => f.done() !== null || FlappingWebSocket.opened > 20);
  } finally {
    f.session.close();
  }
  // Five connections, each welcomed then dropped; the fifth drop is the fifth failure.
  assert.equal(FlappingWebSocket.opened, 5);
  assert.equal(f.done().code, 'gave_up');
  assert.equal(f.delays.length, 4);
  // Attempt n waits between half and all of initialMs * 2^n.
  f.delays.forEach((d, i) => {
    const ceiling = 4 * 2 ** (i + 1);
    assert.ok(d >= ceiling / 2 && d <= ceiling, `delay ${i}: ${d} not in [${ceiling / 2}, ${ceiling}] (delays ${f.delays})`);
  });
  assert.deepEqual(f.errors.filter((e) => e.code === 'connect_failed').map((e) => e.attempt), [1, 2, 3, 4, 5]);
});

test('a connection that lasted 10 s resets the backoff', { timeout: 20_000 }, async () => {
  const realNow = Date.now;
  try {
    const f = flapping({ backoff: { initialMs: 4, maxMs: 1000, maxAttempts: 3 } });
    await until(() => f.delays.length === 2);
    // From now on the clock moves 10 s at every look: each connection
    // "lasted" 10 s, and each drop resets the count.
    let t = realNow();
    Date.now = () => (t += 10_000);
    await until(() => f.delays.length >= 8 || f.done() !== null);
    const ended = f.done();
    f.session.close();
    assert.equal(ended, null, `ended early: ${ended?.message}`);
    // Every delay after the switch is the first step again.
    for (const d of f.delays.slice(3)) assert.ok(d >= 2 && d <= 4, `delays ${f.delays}`);
  } finally {
    Date.now = realNow;
  }
});

/**
 * A WebSocket that opens, selects wsproxy.v1 and sends a welcome, then
 * closes with `closeCode` (if any) after `closeAfterMs`. `bufferedAmount`
 * grows by each frame sent, as when the network does not take them.
 */
class ScriptedWebSocket {
  static sockets = [];
  static closeCode = null;
  constructor(url, protocols) {
    this.url = url;
    this.protocol = '';
    this.readyState = 0;
    this.bufferedAmount = 0;
    this.sent = [];
    ScriptedWebSocket.sockets.push(this);
    setTimeout(() => {
      this.readyState = 1;
      this.protocol = Array.isArray(protocols) && protocols.includes(PROTOCOL) ? PROTOCOL : '';
      this.onopen?.({});
      if (this.protocol) this.onmessage?.({ data: JSON.stringify({ type: 'welcome', session_id: 's1', epoch: 'e1', offset: '0-0' }) });
      const code = ScriptedWebSocket.closeCode;
      if (code !== null) {
        this.readyState = 3;
        this.onclose?.({ code, reason: 'revoked' });
      }
    }, 0);
  }
  send(frame) {
    this.sent.push(frame);
    this.bufferedAmount += frame.length;
  }
  close() {
    this.readyState = 3;
  }
}

function scripted(closeCode, extra = {}) {
  ScriptedWebSocket.sockets = [];
  ScriptedWebSocket.closeCode = closeCode;
  return flapping({ WebSocket: ScriptedWebSocket, ...extra });
}

test('a backend close code (4000-4999) over WebSocket ends the session, as over SSE: server_closed, no reconnect', { timeout: 10_000 }, async () => {
  const f = scripted(4001, { backoff: { initialMs: 1, maxMs: 10, maxAttempts: 20 } });
  try {
    await until(() => f.done() !== null || ScriptedWebSocket.sockets.length > 3, 2000);
  } finally {
    f.session.close();
  }
  assert.equal(ScriptedWebSocket.sockets.length, 1);
  const fatal = f.done();
  assert.equal(fatal.code, 'server_closed');
  assert.equal(fatal.fatal, true);
  assert.equal(fatal.closeCode, 4001);
  assert.equal(fatal.closeReason, 'revoked');
  assert.equal(f.session.state, 'closed');
});

test('a close code below 4000 (1013) over WebSocket still reconnects', { timeout: 10_000 }, async () => {
  const f = scripted(1013, { backoff: { initialMs: 1, maxMs: 10, maxAttempts: 20 } });
  try {
    await until(() => ScriptedWebSocket.sockets.length >= 3 || f.done() !== null, 2000);
  } finally {
    f.session.close();
  }
  assert.ok(ScriptedWebSocket.sockets.length >= 3, `${ScriptedWebSocket.sockets.length} connections`);
});

test('a token function that never settles fails the attempt after tokenTimeoutMs: backoff, then gave_up', { timeout: 10_000 }, async () => {
  let calls = 0;
  const f = scripted(null, {
    token: () => {
      calls += 1;
      return new Promise(() => {});
    },
    tokenTimeoutMs: 20,
    backoff: { initialMs: 1, maxMs: 10, maxAttempts: 3 },
  });
  try {
    await until(() => f.done() !== null, 2000);
  } finally {
    f.session.close();
  }
  assert.equal(calls, 3);
  assert.equal(ScriptedWebSocket.sockets.length, 0);
  assert.equal(f.done().code, 'gave_up');
  assert.deepEqual(f.errors.filter((e) => e.code === 'token_failed').map((e) => e.attempt), [1, 2, 3]);
  assert.match(f.errors[0].message, /20 ms/);
});

test('tokenTimeoutMs must be a number >= 0', () => {
  const base = { url: 'ws://127.0.0.1:1', agentId: 'a', sessionId: 's', token: 't', onMessage() {}, onResumeFailed() {}, WebSocket: ScriptedWebSocket };
  assert.throws(() => openSession({ ...base, tokenTimeoutMs: -1 }), TypeError);
  assert.throws(() => openSession({ ...base, tokenTimeoutMs: '5' }), TypeError);
});


test('a plain send refuses with queue_full while the socket buffers maxBufferedBytes or more', { timeout: 10_000 }, async () => {
  const f = scripted(null, { reliable: false, maxBufferedBytes: 10 });
  try {
    await f.session.ready;
    const ws = ScriptedWebSocket.sockets[0];
    await f.session.send('0123456'); // 9 bytes of JSON: under the limit when sent
    assert.equal(ws.bufferedAmount, 9);
    await f.session.send('x'); // 9 < 10: still taken
    assert.equal(ws.bufferedAmount, 12);
    await assert.rejects(f.session.send('y'), { code: 'queue_full' });
    assert.equal(ws.sent.length, 2);
    ws.bufferedAmount = 0; // the network took it
    await f.session.send('z');
    assert.equal(ws.sent.length, 3);
  } finally {
    f.session.close();
  }
});

/**
 * An EventSource that opens and (reliable) sends a welcome at once, and
 * then stays open.
 */
class FakeEventSource {
  static CLOSED = 2;
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.listeners = {};
    setTimeout(() => {
      this.readyState = 1;
      this.onopen?.({});
      if (url.includes('reliable=true')) {
        for (const l of this.listeners.welcome ?? []) l({ data: JSON.stringify({ type: 'welcome', session_id: 's1', epoch: 'e1', offset: '0-0' }) });
      }
    }, 0);
  }
  addEventListener(type, listener) {
    (this.listeners[type] ??= []).push(listener);
  }
  close() {
    this.readyState = FakeEventSource.CLOSED;
  }
}

/**
 * A fetch that answers each POST with the next of `answers`
 * (`{status, body, headers}`; an ack for the posted id once they run out)
 * and records `{at, body}` of each.
 */
function fakeFetch(answers) {
  const posts = [];
  const fetch = async (url, init) => {
    const body = JSON.parse(init.body);
    posts.push({ at: performance.now(), body });
    const a = answers.shift() ?? { status: 200, body: { type: 'ack', id: body.id } };
    const headers = new Map(Object.entries(a.headers ?? {}).map(([k, v]) => [k.toLowerCase(), v]));
    return { status: a.status, headers: { get: (k) => headers.get(k.toLowerCase()) ?? null }, text: async () => JSON.stringify(a.body) };
  };
  return { fetch, posts };
}

const RATE_LIMITED = { status: 429, body: { error: 'rate_limited', message: 'this session sends faster than its rate' } };

test('SSE: a reliable message answered 429 rate_limited is sent again with its id after Retry-After, else after 1 s growing, before later ones', { timeout: 20_000 }, async () => {
  const { fetch, posts } = fakeFetch([{ ...RATE_LIMITED, headers: { 'Retry-After': '1' } }, RATE_LIMITED]);
  const f = flapping({ url: 'http://127.0.0.1:1', transport: 'sse', EventSource: FakeEventSource, fetch, backoff: { initialMs: 5, maxMs: 30_000 } });
  try {
    await f.session.ready;
    const sent = Promise.all([f.session.send({ n: 1 }, { id: 'm-1' }), f.session.send({ n: 2 }, { id: 'm-2' })]);
    await sent;
    // m-2 waited behind m-1: one POST at a time, in send order.
    assert.deepEqual(posts.map((p) => p.body.id), ['m-1', 'm-1', 'm-1', 'm-2']);
    const gaps = posts.slice(1).map((p, i) => p.at - posts[i].at);
    assert.ok(gaps[0] >= 950, `Retry-After: 1 honoured (gaps ${gaps})`);
    // The second 429 in a row, without Retry-After: 1 s doubled.
    assert.ok(gaps[1] >= 1950, `2 s without Retry-After (gaps ${gaps})`);
    // Pacing is not a failure: reported as rate_limited, the stream untouched.
    assert.deepEqual(f.errors.map((e) => e.code), ['rate_limited', 'rate_limited']);
    assert.deepEqual(f.errors.map((e) => e.delayMs), [1000, 2000]);
    assert.equal(f.session.state, 'open');
  } finally {
    f.session.close();
  }
});

test('SSE: a plain send answered 429 rate_limited rejects with rate_limited; the session stays open', { timeout: 10_000 }, async () => {
  const { fetch, posts } = fakeFetch([{ ...RATE_LIMITED, headers: { 'Retry-After': '2' } }, { status: 200, body: { status: 'published' } }]);
  const f = flapping({ url: 'http://127.0.0.1:1', transport: 'sse', reliable: false, EventSource: FakeEventSource, fetch });
  try {
    await f.session.ready;
    await assert.rejects(f.session.send({ n: 1 }), { code: 'rate_limited', status: 429, retryAfterMs: 2000 });
    assert.equal(f.session.state, 'open');
    await f.session.send({ n: 2 });
    assert.equal(posts.length, 2);
  } finally {
    f.session.close();
  }
});

test('a reconnect whose welcome says nothing of the resume asked for is a failed resume: not_answered', { timeout: 10_000 }, async () => {
  // Every welcome of FlappingWebSocket lacks "resumed": the first is a
  // fresh join (nothing asked), the second answers a resume from e1:0-0.
  const failures = [];
  const f = flapping({
    reliable: true,
    backoff: { initialMs: 4, maxMs: 10, maxAttempts: 2 },
    onResumeFailed: (failure) => failures.push(failure),
  });
  try {
    await until(() => f.done() !== null);
  } finally {
    f.session.close();
  }
  assert.equal(FlappingWebSocket.opened, 2);
  assert.deepEqual(failures, [{ reason: 'not_answered', epoch: 'e1', offset: '0-0', from: { epoch: 'e1', offset: '0-0' } }]);
});
