// What the end-to-end tests of clients/js share: failures and checks,
// polling, a minimal Redis client, free ports, child processes (a private
// redis-server, wsproxy binaries) with their logs, and the main routine
// that runs a test with an overall timeout and always cleans up.
//
// Imported by the tests in this folder; it runs nothing by itself.

import net from 'node:net';
import { spawn } from 'node:child_process';

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** A failed expectation: reported by its message alone, without a stack. */
export class TestFailure extends Error {}

export function check(cond, msg) {
  if (!cond) throw new TestFailure(msg);
}

/** The value of environment variable `name`; a TestFailure when unset or empty. */
export function requireEnv(name) {
  const v = process.env[name];
  if (!v) throw new TestFailure(`environment variable ${name} is required`);
  return v;
}

/**
 * An `until(what, probe, detail, timeoutMs)` that polls `probe` every
 * `pauseMs` until it returns something truthy, failing with `what` and
 * `detail()` after `timeoutMs` (default `stepMs`).
 */
export function makeUntil(stepMs, pauseMs) {
  return async function until(what, probe, detail = async () => '', timeoutMs = stepMs) {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const got = await probe();
      if (got) return got;
      if (Date.now() > deadline) throw new TestFailure(`${what}: not within ${timeoutMs} ms; ${await detail()}`);
      await sleep(pauseMs);
    }
  };
}

// ---------------------------------------------------------------------------
// A minimal Redis client (RESP2): commands on one connection, answered in
// order; on a connection that subscribed, pushed messages go to onMessage.

class RedisReplyError extends Error {}

function parseReply(buf, start) {
  if (start >= buf.length) return undefined;
  const eol = buf.indexOf('\r\n', start);
  if (eol < 0) return undefined;
  const kind = String.fromCharCode(buf[start]);
  const line = buf.toString('utf8', start + 1, eol);
  const next = eol + 2;
  switch (kind) {
    case '+':
      return { value: line, end: next };
    case '-':
      return { value: new RedisReplyError(line), end: next };
    case ':':
      return { value: Number(line), end: next };
    case '$': {
      const n = Number(line);
      if (n < 0) return { value: null, end: next };
      if (buf.length < next + n + 2) return undefined;
      return { value: buf.toString('utf8', next, next + n), end: next + n + 2 };
    }
    case '*': {
      const n = Number(line);
      if (n < 0) return { value: null, end: next };
      const items = [];
      let at = next;
      for (let i = 0; i < n; i += 1) {
        const item = parseReply(buf, at);
        if (item === undefined) return undefined;
        items.push(item.value);
        at = item.end;
      }
      return { value: items, end: at };
    }
    default:
      throw new TestFailure(`redis: a reply starting with ${JSON.stringify(kind)}`);
  }
}

export class Redis {
  /** Connects to 127.0.0.1:`port`. */
  static async connect(port) {
    const sock = net.connect(port, '127.0.0.1');
    await new Promise((resolve, reject) => {
      sock.once('connect', resolve);
      sock.once('error', (e) => reject(new TestFailure(`redis at 127.0.0.1:${port}: ${e.message}`)));
    });
    return new Redis(sock);
  }

  /** Connects to a redis://[user:password@]host:port[/db] URL (AUTH and SELECT as it says). */
  static async connectUrl(redisUrl) {
    const u = new URL(redisUrl);
    check(u.protocol === 'redis:', `REDIS_URL must be redis://host:port (got ${redisUrl})`);
    const sock = net.connect(Number(u.port || 6379), u.hostname || '127.0.0.1');
    await new Promise((resolve, reject) => {
      sock.once('connect', resolve);
      sock.once('error', (e) => reject(new TestFailure(`redis at ${u.host}: ${e.message}`)));
    });
    const client = new Redis(sock);
    if (u.password) {
      const auth = u.username ? [decodeURIComponent(u.username)] : [];
      await client.command('AUTH', ...auth, decodeURIComponent(u.password));
    }
    const db = u.pathname.replace(/^\//, '');
    if (db) await client.command('SELECT', db);
    return client;
  }

  constructor(sock) {
    this.sock = sock;
    this.buf = Buffer.alloc(0);
    this.waiting = [];
    this.broken = null;
    /** On a connection that subscribed: called with each pushed message. */
    this.onMessage = null;
    sock.on('data', (chunk) => {
      this.buf = this.buf.length ? Buffer.concat([this.buf, chunk]) : chunk;
      this.drain();
    });
    sock.on('error', (e) => this.fail(e));
    sock.on('close', () => this.fail(new Error('connection closed')));
  }

  fail(e) {
    this.broken ??= e;
    for (const w of this.waiting.splice(0)) w.reject(new TestFailure(`redis: ${e.message}`));
  }

  drain() {
    for (;;) {
      const reply = parseReply(this.buf, 0);
      if (reply === undefined) return;
      this.buf = this.buf.subarray(reply.end);
      const v = reply.value;
      if (this.onMessage && Array.isArray(v) && v[0] === 'message') {
        this.onMessage(v[1], v[2]);
        continue;
      }
      const w = this.waiting.shift();
      if (!w) continue;
      if (v instanceof RedisReplyError) w.reject(new TestFailure(`redis: ${v.message} (${w.what})`));
      else w.resolve(v);
    }
  }

  /** One command; each argument a Buffer as it is, or anything else as its string. */
  command(...args) {
    if (this.broken) return Promise.reject(new TestFailure(`redis: ${this.broken.message}`));
    const parts = [Buffer.from(`*${args.length}\r\n`)];
    for (const arg of args) {
      const b = Buffer.isBuffer(arg) ? arg : Buffer.from(String(arg));
      parts.push(Buffer.from(`$${b.length}\r\n`), b, Buffer.from('\r\n'));
    }
    this.sock.write(Buffer.concat(parts));
    return new Promise((resolve, reject) => this.waiting.push({ resolve, reject, what: String(args[0]) }));
  }

  close() {
    this.onMessage = null;
    this.sock.destroy();
  }
}

// ---------------------------------------------------------------------------
// Processes: free ports, children with their logs, a private redis-server.

export function freePort() {
  return new Promise((resolve, reject) => {
    const probe = net.createServer();
    probe.once('error', reject);
    probe.listen(0, '127.0.0.1', () => {
      const { port } = probe.address();
      probe.close(() => resolve(port));
    });
  });
}

/**
 * What was started here, for cleanup and the failure report: Redis
 * clients to close, running children, each child's last 200 log lines.
 */
export const processes = { redis: [], children: new Set(), logs: [] };

/**
 * Spawns `command`, keeping the last 200 lines of its output in
 * `processes.logs` under `name`; `child.exited` resolves with
 * `{ code, signal }`.
 */
export function launch(name, command, args, env) {
  const child = spawn(command, args, { env, stdio: ['ignore', 'pipe', 'pipe'] });
  const log = { name, lines: [] };
  processes.logs.push(log);
  for (const stream of [child.stdout, child.stderr]) {
    stream.setEncoding('utf8');
    stream.on('data', (text) => {
      log.lines.push(...text.split('\n').filter(Boolean));
      if (log.lines.length > 200) log.lines.splice(0, log.lines.length - 200);
    });
  }
  processes.children.add(child);
  child.exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
  child.exited.then(() => processes.children.delete(child));
  child.once('error', (e) => log.lines.push(`spawn failed: ${e.message}`));
  return child;
}

/** A redis-server on a free port (no persistence), once it answers PING; with a client on it. */
export async function startRedis(until) {
  const port = await freePort();
  const child = launch('redis-server', 'redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], process.env);
  const client = await until(`redis-server on ${port}`, async () => {
    try {
      const c = await Redis.connect(port);
      if ((await c.command('PING')) === 'PONG') return c;
      c.close();
    } catch {
      /* not yet */
    }
    return null;
  });
  processes.redis.push(client);
  return { port, child, client };
}

/** Closes every Redis client in `processes.redis`. */
export function closeRedisClients() {
  for (const r of processes.redis.splice(0)) r.close();
}

/** SIGKILLs every child still running, waiting at most 5 s for each. */
export async function killChildren() {
  for (const child of [...processes.children]) {
    child.kill('SIGKILL');
    await Promise.race([child.exited, sleep(5_000)]);
  }
}

/** Prints each child's last 10 log lines to stderr, tagged. */
export function printChildLogs(tag) {
  for (const log of processes.logs) {
    if (log.lines.length) console.error(`[${tag}] ${log.name} (last 10 lines):\n  ${log.lines.slice(-10).join('\n  ')}`);
  }
}

// ---------------------------------------------------------------------------
// Running a test.

/** The browser's page errors and console (last 30 lines), tagged, to stderr. */
export function printDiagnostics(tag, diagnostics) {
  if (diagnostics.pageErrors.length) console.error(`[${tag}] page errors:\n  ${diagnostics.pageErrors.join('\n  ')}`);
  if (diagnostics.console.length) console.error(`[${tag}] browser console (last 30):\n  ${diagnostics.console.slice(-30).join('\n  ')}`);
}

/** A failure as the report shows it: a TestFailure by its message, anything else by its stack. */
export function describeFailure(err) {
  return err instanceof TestFailure ? err.message : err && err.stack ? err.stack : err;
}

/**
 * Runs `run()` within `timeoutMs`, then, however it ended (or on SIGINT or
 * SIGTERM): on a failure `report(err)` (which prints what helps), then
 * `cleanup()` (at most `hardStopMs`), and exits 0 on success ("PASS"),
 * 1 otherwise.
 */
export function runMain({ tag, run, cleanup, report, timeoutMs, hardStopMs }) {
  let finished = false;
  async function finish(code, err) {
    if (finished) return;
    finished = true;
    const hardStop = setTimeout(() => process.exit(1), hardStopMs);
    if (err) await report(err);
    await cleanup().catch((e) => console.error(`[${tag}] cleanup: ${e.message}`));
    clearTimeout(hardStop);
    if (code === 0) console.log(`[${tag}] PASS`);
    process.exit(code);
  }

  for (const sig of ['SIGINT', 'SIGTERM']) process.on(sig, () => finish(1, new TestFailure(`interrupted by ${sig}`)));
  const overall = setTimeout(() => finish(1, new TestFailure(`the test did not finish within ${timeoutMs} ms`)), timeoutMs);
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
}
