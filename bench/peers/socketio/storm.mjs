// `node bench.mjs storm`: wsproxy-bench's `storm` (a deploy's reconnect
// storm) against Socket.IO with connection state recovery on the Redis
// Streams adapter. Same steps and figures as bench/src/storm.rs:
//
// 1. Starts a redis-server on a free port (no persistence) and two
//    server.mjs on it, A and B (SIO_MAXLEN, the stream's maxLen: see
//    --maxlen).
// 2. --clients socket.io-client clients (transports: ["websocket"], no
//    automatic reconnection), in --procs child processes, each in its own
//    room s<i> on A.
// 3. The parent publishes {seq: k} to the rooms in turn, --rate a second in
//    total, from a Server instance with the same adapter (an XADD to the
//    stream each), before, during and after the storm.
// 4. Once every client has a message (it then holds an offset to recover
//    from) and --before-secs more have passed, A gets SIGTERM: server.mjs
//    then runs io.close(), which ends every socket with "server shutting
//    down" (a reason whose session Socket.IO persists for recovery) and
//    closes the transports.
// 5. Each client, on its disconnect, waits a random 0..--jitter-ms and
//    connects to B (the Manager's uri is changed: in a deploy the load
//    balancer does that) with the same Socket object, which sends its pid
//    and last offset. Failed attempts are retried after 100 ms, doubled up
//    to 1 s.
//
// Figures (as storm.rs): resume latency = reconnect start (after the pause)
// to the `ready` event server.mjs emits from its connection handler; the
// missed packets come before it on the same connection (Socket.IO sends
// them when it restores the session, the client emits buffered events
// before `connect`), so at `ready` the client is caught up. Downtime =
// disconnect to the same moment. All resumed = SIGTERM to the last `ready`.
// A client is resumed only with socket.recovered true; one that is not is a
// failed resume (it goes on in its room from then, as a new session).
// Lost / duplicated / out of order per client against what was published
// (every XADD answered: a PING after the last one). Redis's and B's CPU
// from /proc/PID/stat, from the SIGTERM until every client is back (seen by
// the parent within ~20 ms), and Redis's rate in the steady state before.
import { fork, spawn } from "node:child_process";
import { readFileSync, mkdtempSync, rmSync, openSync } from "node:fs";
import { createServer, connect as tcpConnect } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createClient } from "redis";
import { Server } from "socket.io";
import { createAdapter } from "@socket.io/redis-streams-adapter";
import { io as connect } from "socket.io-client";

const nowUs = () => Math.round((performance.timeOrigin + performance.now()) * 1000);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const fmt = (us) => (us >= 10_000 ? `${(us / 1000).toFixed(1)}ms` : `${Math.round(us)}us`);
function pct(sorted, p) {
  if (!sorted.length) return 0;
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1))];
}

// CPU time (user + system) of a process so far, in µs.
function cpuUs(pid) {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    const f = stat.slice(stat.lastIndexOf(") ") + 2).split(" ");
    return (Number(f[11]) + Number(f[12])) * 10_000;
  } catch {
    return 0;
  }
}

// The three commands that took Redis the most time, from INFO commandstats:
// "xrange 7005 calls 7730ms, ...".
function topCommands(info) {
  return info
    .split("\n")
    .map((l) => l.match(/^cmdstat_(\w+):calls=(\d+),usec=(\d+)/))
    .filter(Boolean)
    .map(([, cmd, calls, usec]) => [cmd, Number(calls), Number(usec)])
    .sort((x, y) => y[2] - x[2])
    .slice(0, 3)
    .map(([cmd, calls, usec]) => `${cmd}:${calls}:${(usec / 1000).toFixed(0)}ms`)
    .join(",");
}

// TcpExt ListenOverflows (machine-wide): connects dropped on a full accept queue.
function listenOverflows() {
  try {
    const lines = readFileSync("/proc/net/netstat", "utf8").split("\n").filter((l) => l.startsWith("TcpExt:"));
    const names = lines[0].split(/\s+/);
    return Number(lines[1].split(/\s+/)[names.indexOf("ListenOverflows")]) || 0;
  } catch {
    return 0;
  }
}

async function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

async function waitPort(port, child, name) {
  const start = Date.now();
  for (;;) {
    if (child.exitCode !== null) throw new Error(`${name} exited (${child.exitCode})`);
    const ok = await new Promise((r) => {
      const c = tcpConnect(port, "127.0.0.1", () => (c.end(), r(true)));
      c.once("error", () => r(false));
    });
    if (ok) return;
    if (Date.now() - start > 30_000) throw new Error(`${name} not listening on ${port} after 30 s`);
    await sleep(50);
  }
}

export async function storm(arg) {
  const n = Number(arg("clients", 10_000));
  const rate = Number(arg("rate", 1000));
  const jitterMs = Number(arg("jitter-ms", 1000));
  const procs = Number(arg("procs", 4));
  const beforeSecs = Number(arg("before-secs", 5));
  const afterSecs = Number(arg("after-secs", 3));
  const timeoutSecs = Number(arg("timeout-secs", 120));
  // The stream keeps every message of a run (a run publishes < 100,000):
  // nothing a client missed is trimmed before its recovery reads it.
  const maxLen = Number(arg("maxlen", 1_000_000));
  const redisBin = arg("redis-bin", "redis-server");
  const dir = mkdtempSync(join(tmpdir(), "sio-storm-"));
  const children = [];
  const kill = () => {
    for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill("SIGKILL");
  };
  process.on("exit", () => {
    kill();
    if (!arg("keep", null)) rmSync(dir, { recursive: true, force: true });
  });
  const redisPort = await freePort();
  const redisProc = spawn(
    redisBin,
    ["--port", `${redisPort}`, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", dir],
    { stdio: "ignore" },
  );
  children.push(redisProc);
  await waitPort(redisPort, redisProc, "redis-server");
  const redisUrl = `redis://127.0.0.1:${redisPort}`;
  const server = new URL("./server.mjs", import.meta.url).pathname;
  const startServer = (port, name) => {
    const log = openSync(join(dir, `server-${name}.log`), "a");
    const c = spawn(process.execPath, [server, `${port}`, redisUrl], {
      env: { ...process.env, SIO_MAXLEN: `${maxLen}` },
      stdio: ["ignore", log, log],
    });
    children.push(c);
    return c;
  };
  const [aPort, bPort] = [await freePort(), await freePort()];
  const a = startServer(aPort, "a");
  const b = startServer(bPort, "b");
  await waitPort(aPort, a, "server A");
  await waitPort(bPort, b, "server B");
  console.error(
    `storm: redis :${redisPort} A :${aPort} (pid ${a.pid}) B :${bPort} (pid ${b.pid}); ` +
      `${n} clients in ${procs} processes, ${rate}/s, jitter ${jitterMs} ms, maxLen ${maxLen}`,
  );
  const redis = createClient({ url: redisUrl });
  await redis.connect();
  const pub = new Server({ adapter: createAdapter(redis, { maxLen }) });

  // The clients.
  const self = new URL("./bench.mjs", import.meta.url).pathname;
  const kids = [];
  const started = Date.now();
  for (let k = 0; k < procs; k++) {
    const from = Math.floor((k * n) / procs);
    const to = Math.floor(((k + 1) * n) / procs);
    const child = fork(self, [
      "storm-clients", "--from", `${from}`, "--to", `${to}`, "--jitter-ms", `${jitterMs}`,
      "--a", `http://127.0.0.1:${aPort}`, "--b", `http://127.0.0.1:${bPort}`,
    ]);
    children.push(child);
    const kid = { child, from, to, ready: false, progress: { withMessage: 0, resumed: 0, received: 0 }, result: null };
    child.on("message", (msg) => {
      if (msg.ready) kid.ready = true;
      if (msg.progress) kid.progress = msg.progress;
      if (msg.result) kid.result = msg.result;
    });
    child.on("exit", (code) => {
      if (!kid.result) kid.failed = `client process exited (${code})`;
    });
    kids.push(kid);
  }
  const sum = (f) => kids.reduce((s, k) => s + f(k), 0);
  const waitUntil = async (what, ms, done) => {
    const start = Date.now();
    while (!done()) {
      for (const c of [a, b, redisProc]) {
        if (c !== a && c.exitCode !== null) throw new Error(`${what}: a server exited (${c.exitCode})`);
      }
      const dead = kids.find((k) => k.failed);
      if (dead) throw new Error(`${what}: ${dead.failed}`);
      if (Date.now() - start > ms) throw new Error(`${what}: not within ${ms / 1000} s`);
      await sleep(5);
    }
  };
  await waitUntil("every client on A", 180_000, () => kids.every((k) => k.ready));
  console.error(`storm: ${n} clients on A in ${((Date.now() - started) / 1000).toFixed(1)} s`);

  // The publisher.
  const confirmed = new Uint32Array(n);
  let publishing = true;
  const publisher = (async () => {
    const t0 = performance.now();
    let sent = 0;
    let cursor = 0;
    while (publishing) {
      const due = Math.floor(((performance.now() - t0) / 1000) * rate);
      for (; sent < due; sent++) {
        const k = ++confirmed[cursor];
        pub.to(`s${cursor}`).emit("m", { seq: k });
        cursor = (cursor + 1) % n;
      }
      await sleep(5);
    }
    await redis.ping(); // every XADD above is answered
  })();

  await waitUntil("a message on every client", (n / rate) * 3000 + 30_000, () => sum((k) => k.progress.withMessage) === n);
  const redis0 = cpuUs(redisProc.pid);
  const steadyStart = performance.now();
  await sleep(beforeSecs * 1000);
  const [redis1, b1] = [cpuUs(redisProc.pid), cpuUs(b.pid)];
  const steadySecs = (performance.now() - steadyStart) / 1000;

  // The deploy.
  // Redis's per-command figures from here to all resumed.
  await redis.sendCommand(["CONFIG", "RESETSTAT"]);
  const overflows0 = listenOverflows();
  const tTerm = nowUs();
  a.kill("SIGTERM");
  let aExit = ["still running", 0];
  a.once("exit", (code, sig) => (aExit = [`exit ${code ?? sig}`, (nowUs() - tTerm) / 1e6]));
  const deadline = Date.now() + timeoutSecs * 1000;
  while (sum((k) => k.progress.resumed) < n && Date.now() < deadline) {
    if (b.exitCode !== null || redisProc.exitCode !== null) throw new Error("B or Redis exited during the storm");
    await sleep(5);
  }
  const [redis2, b2] = [cpuUs(redisProc.pid), cpuUs(b.pid)];
  const overflows = listenOverflows() - overflows0;
  const storm = (nowUs() - tTerm) / 1e6;
  const resumedInTime = sum((k) => k.progress.resumed);
  const redisTop = topCommands(await redis.sendCommand(["INFO", "commandstats"]));
  console.error(`storm: ${resumedInTime} of ${n} resumed ${storm.toFixed(2)} s after the SIGTERM`);
  await sleep(afterSecs * 1000);
  publishing = false;
  await publisher;
  const total = confirmed.reduce((s, c) => s + c, 0);
  const settle = Date.now();
  while (sum((k) => k.progress.received) < total && Date.now() - settle < 15_000) await sleep(20);
  if (aExit[1] === 0) {
    const end = Date.now() + 35_000;
    while (aExit[1] === 0 && Date.now() < end) await sleep(20);
  }
  for (const k of kids) k.child.send({ stop: true, confirmed: Array.from(confirmed.subarray(k.from, k.to)) });
  await waitUntil("the clients' results", 60_000, () => kids.every((k) => k.result));

  const r = kids.map((k) => k.result);
  const all = (f) => r.reduce((s, x) => s + x[f], 0);
  const cat = (f) => Float64Array.from(r.flatMap((x) => x[f])).sort();
  const resume = cat("resume");
  const downtime = cat("downtime");
  const close = cat("close").map((t) => t - tTerm);
  const lastCaught = Math.max(...r.map((x) => x.lastCaught));
  const allResumed = resumedInTime === n ? (lastCaught - tTerm) / 1e6 : storm;
  const codes = {};
  for (const x of r) for (const [c, v] of Object.entries(x.reasons)) codes[c] = (codes[c] ?? 0) + v;
  const f = {
    clients: n, rate, jitterMs, procs, maxLen,
    allResumedS: allResumed, resumed: resumedInTime, resumeFailed: all("failed"),
    resumeP50Us: pct(resume, 50), resumeP99Us: pct(resume, 99), resumeMaxUs: resume[resume.length - 1] ?? 0,
    downtimeP50Us: pct(downtime, 50), downtimeP99Us: pct(downtime, 99), downtimeMaxUs: downtime[downtime.length - 1] ?? 0,
    closeP50Us: pct(close, 50), closeMaxUs: close[close.length - 1] ?? 0,
    reasons: codes, retries: all("retries"), clientsWithRetries: all("clientsWithRetries"),
    confirmed: total, lost: all("lost"), duplicated: all("duplicated"), outOfOrder: all("outOfOrder"),
    redisCpuStormMs: (redis2 - redis1) / 1000, redisCpuSteadyMsPerS: (redis1 - redis0) / 1000 / steadySecs,
    bCpuStormMs: (b2 - b1) / 1000, aExit: aExit[0], aExitS: aExit[1], redisTop, listenOverflows: overflows,
  };
  console.log(
    `storm socketio n=${n} rate=${rate}/s jitter=${jitterMs}ms all_resumed=${allResumed.toFixed(2)}s` +
      `${resumedInTime < n ? ` (only ${resumedInTime} of ${n})` : ""} resume p50=${fmt(f.resumeP50Us)} p99=${fmt(f.resumeP99Us)} ` +
      `max=${fmt(f.resumeMaxUs)} downtime p50=${fmt(f.downtimeP50Us)} p99=${fmt(f.downtimeP99Us)} lost=${f.lost} ` +
      `dup=${f.duplicated} ooo=${f.outOfOrder} failed=${f.resumeFailed} retries=${f.retries} ` +
      `redis_cpu=${f.redisCpuStormMs.toFixed(0)}ms (steady ${f.redisCpuSteadyMsPerS.toFixed(0)}ms/s) ` +
      `B_cpu=${f.bCpuStormMs.toFixed(0)}ms redis_top=${redisTop} listen_overflows=${overflows} close=${JSON.stringify(codes)} A_exit=${f.aExit} at ${f.aExitS.toFixed(2)}s`,
  );
  if (arg("json", null)) {
    const { appendFileSync } = await import("node:fs");
    appendFileSync(arg("json", null), JSON.stringify({ scenario: "storm", target: "socketio", ...f }) + "\n");
  }
  await redis.quit().catch(() => {});
  kill();
  if (f.lost || f.duplicated || f.outOfOrder || f.resumeFailed || resumedInTime < n) process.exitCode = 1;
}

// A child: clients from..to-1 in rooms s<i>, on A, then B.
export async function stormClients(arg) {
  const from = Number(arg("from", 0));
  const to = Number(arg("to", 0));
  const jitterMs = Number(arg("jitter-ms", 1000));
  const urlA = arg("a", "");
  const urlB = arg("b", "");
  const books = [];
  let withMessage = 0;
  let resumed = 0;
  let received = 0;
  let stopping = false;
  let dirty = true;
  const progress = setInterval(() => {
    if (dirty) process.send({ progress: { withMessage, resumed, received } });
    dirty = false;
  }, 20);
  const open = (i) => {
    const book = {
      seen: new Set(), maxSeen: 0, duplicated: 0, outOfOrder: 0, reason: null,
      tClose: 0, tReconnect: 0, tCaught: 0, retries: 0, recovered: null, welcomed: false,
    };
    books.push(book);
    const socket = connect(urlA, {
      transports: ["websocket"], query: { room: `s${i}` }, reconnection: false, forceNew: true,
    });
    book.socket = socket;
    socket.on("m", (msg) => {
      if (book.seen.has(msg.seq)) book.duplicated++;
      else {
        if (book.seen.size === 0) withMessage++;
        book.seen.add(msg.seq);
        received++;
        if (msg.seq < book.maxSeen) book.outOfOrder++;
        book.maxSeen = Math.max(book.maxSeen, msg.seq);
      }
      dirty = true;
    });
    let retry = 100;
    const reconnect = () => {
      socket.io.uri = urlB;
      socket.connect();
    };
    socket.on("disconnect", (reason) => {
      if (stopping || book.tClose) return;
      book.tClose = nowUs();
      book.reason = reason;
      setTimeout(() => {
        book.tReconnect = nowUs();
        reconnect();
      }, Math.random() * jitterMs);
    });
    socket.on("connect_error", () => {
      if (stopping || !book.tClose) return;
      book.retries++;
      setTimeout(reconnect, retry);
      retry = Math.min(retry * 2, 1000);
    });
    return new Promise((resolve, reject) => {
      socket.on("ready", (hello) => {
        if (!book.welcomed) {
          book.welcomed = true;
          return resolve();
        }
        if (book.tCaught) return;
        book.tCaught = nowUs();
        book.recovered = Boolean(hello.recovered && socket.recovered);
        resumed++;
        dirty = true;
      });
      socket.once("connect_error", (e) => !book.welcomed && reject(e));
    });
  };
  for (let i = from; i < to; i += 100) {
    const batch = [];
    for (let j = i; j < Math.min(to, i + 100); j++) batch.push(open(j));
    await Promise.all(batch);
  }
  process.send({ ready: true });
  process.on("message", (msg) => {
    if (!msg.stop) return;
    stopping = true;
    clearInterval(progress);
    const res = {
      lost: 0, duplicated: 0, outOfOrder: 0, failed: 0, retries: 0, clientsWithRetries: 0,
      resume: [], downtime: [], close: [], lastCaught: 0, reasons: {},
    };
    books.forEach((b, j) => {
      for (let k = 1; k <= msg.confirmed[j]; k++) if (!b.seen.has(k)) res.lost++;
      res.duplicated += b.duplicated;
      res.outOfOrder += b.outOfOrder;
      res.retries += b.retries;
      res.clientsWithRetries += b.retries > 0 ? 1 : 0;
      if (b.tCaught && !b.recovered) res.failed++;
      if (b.tCaught && b.recovered) {
        res.resume.push(b.tCaught - b.tReconnect);
        res.downtime.push(b.tCaught - b.tClose);
      }
      if (b.tClose) res.close.push(b.tClose);
      res.lastCaught = Math.max(res.lastCaught, b.tCaught);
      const r = b.reason ?? "none";
      res.reasons[r] = (res.reasons[r] ?? 0) + 1;
      b.socket.disconnect();
    });
    process.send({ result: res }, () => process.exit(0));
  });
}
