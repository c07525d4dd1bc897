// The server of the Node.js cluster tutorial, unchanged in spirit, running under lb:
// CPU work on every request, and a users count that the primary (here: lb's feed)
// broadcasts so that N workers cost one database query instead of N.
//
// WORK sets the CPU work per request (loop iterations, default 1e7 as in the tutorial);
// CRASH_RANDOMLY=1 makes the worker crash at a random moment within 10 s.
const http = require("node:http");

const port = Number(process.env.PORT || 8080);
const work = Number(process.env.WORK ?? 1e7);
let usersCount = 0;

// Broadcasts from lb (lb broadcast, POST /broadcast, or the feed) arrive here.
process.on("message", (msg) => {
  if (msg && typeof msg.usersCount === "number") usersCount = msg.usersCount;
});

http
  .createServer((req, res) => {
    for (let i = 0; i < work; i++); // simulate CPU work
    res.end(`Users: ${usersCount} (worker ${process.env.LB_WORKER_ID}, pid ${process.pid})\n`);
  })
  .listen(port, process.env.HOST || "127.0.0.1", () => {
    // With `ready: message`, lb sends no connection before this (PM2's wait_ready).
    if (process.send) process.send("ready");
  });

if (process.env.CRASH_RANDOMLY) {
  setTimeout(() => process.exit(1), Math.random() * 10000);
}
