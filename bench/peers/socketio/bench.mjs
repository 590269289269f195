// wsproxy-bench's `down --target reliable` and `resume`, against the
// Socket.IO peer (server.mjs).
//   node bench.mjs down   --url http://127.0.0.1:9400 --redis redis://... --n 1000 --m 100000 [--rate 2000]
//   node bench.mjs resume --url http://127.0.0.1:9400 --redis redis://... --n 50 --m 1000
//   node bench.mjs storm  --clients 10000 --rate 1000 --jitter-ms 1000 --procs 4
//     (starts its own redis-server and two server.mjs; see storm.mjs)
// Messages are published from a Server instance of this process with the
// same Redis Streams adapter, so each one goes through the Redis stream
// (XADD here, XREAD in server.mjs) as wsproxy's go through Redis.
import { createClient } from "redis";
import { Server } from "socket.io";
import { createAdapter } from "@socket.io/redis-streams-adapter";
import { io as connect } from "socket.io-client";

const [scenario, ...rest] = process.argv.slice(2);
const arg = (name, dflt) => {
  const i = rest.indexOf(`--${name}`);
  return i >= 0 ? rest[i + 1] : dflt;
};
const url = arg("url", "http://127.0.0.1:9400");
const redisUrl = arg("redis", "redis://127.0.0.1:6379");
const n = Number(arg("n", scenario === "resume" ? 50 : 1000));
const m = Number(arg("m", scenario === "resume" ? 1000 : 100000));
const rate = Number(arg("rate", 0));
const maxLen = Number(process.env.SIO_MAXLEN ?? 10_000);

// Wall clock in microseconds (the bench's clients and publisher share it).
const nowUs = () => Math.round((performance.timeOrigin + performance.now()) * 1000);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const procs = Number(arg("procs", 1));
let redis, pub;
if (scenario === "storm" || scenario === "storm-clients") {
  const { storm, stormClients } = await import("./storm.mjs");
  if (scenario === "storm") {
    await storm(arg);
    process.exit(process.exitCode ?? 0);
  }
  await stormClients(arg); // the child exits when told to stop
}
if (scenario !== "clients" && scenario !== "storm-clients") {
  redis = createClient({ url: redisUrl });
  await redis.connect();
  pub = new Server({ adapter: createAdapter(redis, { maxLen }) });
}

const fmt = (us) => (us >= 10_000 ? `${(us / 1000).toFixed(1)}ms` : `${Math.round(us)}us`);
function pct(sorted, p) {
  if (!sorted.length) return NaN;
  return sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)];
}
function summary(lat) {
  const s = Float64Array.from(lat).sort();
  return `p50 ${fmt(pct(s, 50))} p99 ${fmt(pct(s, 99))} p99.9 ${fmt(pct(s, 99.9))} max ${fmt(s[s.length - 1])}`;
}

function open(room) {
  const socket = connect(url, {
    transports: ["websocket"],
    query: { room },
    reconnection: false,
    forceNew: true,
  });
  const ready = new Promise((resolve, reject) => {
    socket.once("ready", resolve);
    socket.once("connect_error", reject);
  });
  return { socket, ready };
}

// Clients in rooms d<from>..d<to-1>; onMessage(msg, receivedAtUs).
async function openRooms(from, to, onMessage) {
  const sockets = [];
  for (let i = from; i < to; i += 100) {
    const batch = [];
    for (let j = i; j < Math.min(to, i + 100); j++) {
      const c = open(`d${j}`);
      c.socket.on("m", (msg) => onMessage(msg, nowUs()));
      sockets.push(c.socket);
      batch.push(c.ready);
    }
    await Promise.all(batch);
  }
  return sockets;
}

// --procs K: the clients of `down` in K child processes (this script,
// scenario `clients`), so that they are not one Node process's work.
async function clients() {
  const from = Number(arg("from", 0));
  const to = Number(arg("to", n));
  let expected = 0;
  for (let j = from; j < to; j++) expected += Math.floor(m / n) + (j < m % n ? 1 : 0);
  const lat = [];
  const seqs = [];
  let last = 0;
  const sockets = await openRooms(from, to, (msg, t) => {
    lat.push(t - msg.t);
    seqs.push(msg.seq);
    last = t;
    if (seqs.length === expected) process.send({ done: true });
  });
  process.on("message", () => {
    for (const s of sockets) s.disconnect();
    process.send({ lat, seqs, last }, () => process.exit(0));
  });
  process.send({ ready: true });
}

async function down() {
  let lat = [];
  const seen = new Uint8Array(m);
  let delivered = 0;
  let last = 0;
  let sockets = [];
  const children = [];
  if (procs > 1) {
    const { fork } = await import("node:child_process");
    const self = new URL(import.meta.url).pathname;
    const ready = [];
    for (let k = 0; k < procs; k++) {
      const from = Math.floor((k * n) / procs);
      const to = Math.floor(((k + 1) * n) / procs);
      const child = fork(self, ["clients", "--url", url, "--n", `${n}`, "--m", `${m}`, "--from", `${from}`, "--to", `${to}`]);
      const c = { child, done: false };
      ready.push(new Promise((r) => child.on("message", (msg) => {
        if (msg.ready) r();
        if (msg.done) c.done = true;
      })));
      children.push(c);
    }
    await Promise.all(ready);
  } else {
    sockets = await openRooms(0, n, (msg, t) => {
      lat.push(t - msg.t);
      seen[msg.seq] = 1;
      delivered++;
      last = t;
    });
  }
  await sleep(200);
  const t0 = nowUs();
  let lagMax = 0;
  for (let i = 0; i < m; ) {
    if (rate > 0) {
      const due = Math.min(m, Math.floor(((nowUs() - t0) / 1e6) * rate) + 1);
      if (due <= i) {
        await sleep(1);
        continue;
      }
      lagMax = Math.max(lagMax, nowUs() - (t0 + (i / rate) * 1e6));
      for (; i < due; i++) pub.to(`d${i % n}`).emit("m", { t: nowUs(), seq: i });
      await new Promise((r) => setImmediate(r));
    } else {
      const end = Math.min(m, i + 500);
      for (; i < end; i++) pub.to(`d${i % n}`).emit("m", { t: nowUs(), seq: i });
      await new Promise((r) => setImmediate(r));
    }
  }
  await redis.ping();
  const deadline = Date.now() + (rate > 0 ? (m / rate) * 1000 : 0) + 10_000;
  if (procs > 1) {
    while (children.some((c) => !c.done) && Date.now() < deadline) await sleep(20);
    const results = await Promise.all(children.map(({ child }) => new Promise((r) => {
      child.on("message", (msg) => msg.lat && r(msg));
      child.send("stop");
    })));
    for (const res of results) {
      lat = lat.concat(res.lat);
      for (const q of res.seqs) seen[q] = 1;
      delivered += res.seqs.length;
      last = Math.max(last, res.last);
    }
  }
  while (delivered < m && Date.now() < deadline) await sleep(20);
  const seconds = (last - t0) / 1e6;
  console.log(
    `down socketio n=${n} procs=${procs} sent=${m} delivered=${delivered} rate=${Math.round(delivered / seconds)}/s ` +
      `offered=${rate > 0 ? rate : "max"} ${summary(lat)}` +
      (rate > 0 ? ` publisher lag max ${fmt(lagMax)}` : ""),
  );
  if (delivered < m) {
    // Where the lost messages were: runs of consecutive sequence numbers.
    const runs = [];
    for (let i = 0; i < m; i++) {
      if (seen[i]) continue;
      let j = i;
      while (j + 1 < m && !seen[j + 1]) j++;
      runs.push(`${i}-${j}`);
      i = j;
    }
    console.log(`lost ${m - delivered} in ${runs.length} runs: ${runs.slice(0, 10).join(" ")}`);
  }
  for (const s of sockets) s.disconnect();
}

async function resume() {
  const lat = [];
  let delivered = 0;
  let errors = 0;
  let dups = 0;
  const settle = Number(arg("settle", 0));
  const started = Date.now();
  for (let k = 0; k < n; k++) {
    const room = `r${k}`;
    const { socket, ready } = open(room);
    await ready;
    // One message first, so the client holds an offset to resume from
    // (wsproxy's welcome gives its client one).
    const primed = new Promise((r) => socket.once("m", r));
    pub.to(room).emit("m", { t: nowUs(), seq: -1 });
    await primed;
    // A network drop: the transport closes without a Socket.IO disconnect,
    // so the server keeps the session for recovery.
    const gone = new Promise((r) => socket.once("disconnect", r));
    socket.io.engine.close();
    await gone;
    for (let i = 0; i < m; i++) pub.to(room).emit("m", { t: nowUs(), seq: i });
    await redis.ping(); // every XADD above is in the stream
    // --settle MS: give server.mjs's stream reader time to catch up before
    // the reconnect (without it, some replayed messages also come live).
    if (settle > 0) await sleep(settle);
    let next = 0;
    let bad = null;
    const done = new Promise((resolve) => {
      socket.on("m", (msg) => {
        if (msg.seq === -1) return;
        if (msg.seq < next) dups++; // delivered twice: replay and live
        else if (msg.seq !== next) bad ??= `expected ${next}, got ${msg.seq}`;
        else next++;
        if (next === m) resolve();
      });
    });
    const t0 = nowUs();
    const back = new Promise((r) => socket.once("ready", r));
    socket.connect();
    const hello = await back;
    await Promise.race([done, sleep(10_000)]);
    const t1 = nowUs();
    if (!hello.recovered || !socket.recovered || next !== m || bad) {
      errors++;
      console.error(`resume ${k}: recovered=${socket.recovered} got ${next}/${m} ${bad ?? ""}`);
    } else {
      lat.push(t1 - t0);
      delivered += m;
    }
    socket.disconnect();
  }
  const seconds = (Date.now() - started) / 1000;
  console.log(
    `resume socketio n=${n} sent=${n * m} delivered=${delivered} errors=${errors} duplicates=${dups} settle=${settle}ms ` +
      `rate=${Math.round(delivered / seconds)}/s ${summary(lat)} (reconnect to last missed)`,
  );
}

if (scenario === "storm-clients") {
  // stormClients above runs until the parent says stop.
} else if (scenario === "down") await down();
else if (scenario === "resume") await resume();
else if (scenario === "clients") await clients(); // exits when told to stop
else throw new Error("scenario: down, resume or storm");
if (scenario !== "clients" && scenario !== "storm-clients") {
  await redis.quit().catch(() => {});
  process.exit(0);
}
