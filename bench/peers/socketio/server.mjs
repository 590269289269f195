// A Socket.IO server with connection state recovery and the Redis Streams
// adapter, the peer of wsproxy's reliable sessions in BENCHMARKS.md.
//   node server.mjs PORT REDIS_URL
// A client joins the room named by its `room` query parameter. Messages
// reach rooms through the adapter's Redis stream (bench.mjs publishes them
// from its own Server instance on the same stream).
import { createServer } from "node:http";
import { createClient } from "redis";
import { Server } from "socket.io";
import { createAdapter } from "@socket.io/redis-streams-adapter";

const port = Number(process.argv[2] ?? 9400);
const url = process.argv[3] ?? "redis://127.0.0.1:6379";
const maxLen = Number(process.env.SIO_MAXLEN ?? 10_000);
// The adapter's entries per XREAD call (its default: 100).
const readCount = Number(process.env.SIO_READCOUNT ?? 100);

const redis = createClient({ url });
await redis.connect();
const http = createServer();
const io = new Server(http, {
  adapter: createAdapter(redis, { maxLen, readCount }),
  connectionStateRecovery: {
    maxDisconnectionDuration: 2 * 60 * 1000,
    skipMiddlewares: true,
  },
});
io.on("connection", (socket) => {
  // A recovered socket is already back in its rooms.
  if (!socket.recovered) {
    const room = socket.handshake.query.room;
    if (typeof room === "string") socket.join(room);
  }
  socket.emit("ready", { recovered: socket.recovered });
});
// A deploy's SIGTERM (bench.mjs storm): io.close() ends every socket with
// "server shutting down", one of the reasons whose session Socket.IO
// persists for recovery (a SET in Redis, sent before the transports
// close), then closes the transports and the HTTP server. The PING waits
// for those SETs before the process exits.
process.once("SIGTERM", async () => {
  await io.close();
  await redis.ping().catch(() => {});
  process.exit(0);
});
http.listen(port, "127.0.0.1", () => console.log(`socket.io peer on ${port}, redis ${url}`));
