// The server of the Node.js cluster tutorial, unchanged in spirit, running under lb:
// CPU work on every request, and a users count that the primary (here: lb's feed)
// broadcasts so that N workers cost one database query instead of N.
//
// WORK sets the CPU work per request (loop iterations, default 1e7 as in the tutorial);
// CRASH_RANDOMLY=1 makes the worker crash at a random moment within 10 s;
// IGNORE_DRAIN=1 leaves lb's drain message unanswered (for the keep-alive experiment).
const http = require("node:http");

const port = Number(process.env.PORT || 8080);
const work = Number(process.env.WORK ?? 1e7);
let usersCount = 0;
let draining = false;

const server = http.createServer((req, res) => {
  for (let i = 0; i < work; i++); // simulate CPU work
  // Once draining, each keep-alive client is told to take its next request elsewhere.
  if (draining) res.setHeader("Connection", "close");
  res.end(`Users: ${usersCount} (worker ${process.env.LB_WORKER_ID}, pid ${process.pid})\n`);
});

// Messages from lb arrive here: broadcasts (lb broadcast, POST /broadcast, the feed)
// and, when this worker leaves rotation (rollout, scale-down, lb's own stop),
// {"lb":"drain","timeout_ms":N}. lb sends no new connection after it; closing the idle
// keep-alive connections sends their clients to the other workers at once, instead of
// holding this worker until drain_timeout. lb sends the stop signal once they are gone.
// They are closed after a short grace: a connection Node counts as idle may hold a
// request already on its way (sent, not yet read), which closing at once would lose;
// within the grace every busy client gets its answer with "Connection: close" instead.
const DRAIN_GRACE_MS = 200;
process.on("message", (msg) => {
  if (msg && typeof msg.usersCount === "number") usersCount = msg.usersCount;
  if (msg && msg.lb === "drain" && !process.env.IGNORE_DRAIN) {
    draining = true;
    setTimeout(() => {
      server.close();
      server.closeIdleConnections();
    }, DRAIN_GRACE_MS);
  }
});

server.listen(port, process.env.HOST || "127.0.0.1", () => {
  // With `ready: message`, lb sends no connection before this (PM2's wait_ready).
  if (process.send) process.send("ready");
});

if (process.env.CRASH_RANDOMLY) {
  setTimeout(() => process.exit(1), Math.random() * 10000);
}
