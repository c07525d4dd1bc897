// The app of the availability bench: a small HTTP server, run either by lb (PORT) or
// as a worker of Node's cluster module (cluster.js). CRASH_WITHIN_MS=N makes it crash
// at a random moment between N/2 and N ms after it starts listening. It answers lb's
// drain message as examples/node-cluster/server.js does, but closes the idle connections
// DRAIN_GRACE_MS (default 200) after it rather than at once (0: at once, as the example
// does); IGNORE_DRAIN=1 leaves it unanswered.
const http = require("node:http");

const port = Number(process.env.PORT || 8080);
const host = process.env.HOST || "127.0.0.1";
const id = process.env.LB_WORKER_ID ?? process.env.WORKER_ID ?? "?";

let draining = false;

const server = http.createServer((req, res) => {
  // Once draining, each keep-alive client is told to take its next request elsewhere.
  if (draining) res.setHeader("Connection", "close");
  res.end(`ok from worker ${id}\n`);
});
server.listen(port, host);

// {"lb":"drain","timeout_ms":N} on lb's channel: this worker is out of rotation and gets
// no new connection. Closing the idle keep-alive connections sends their clients to the
// workers in rotation at once, instead of holding this one until drain_timeout.
// A connection that is idle here may already carry the client's next request (sent, not
// yet read): closing it loses that request (docs/benchmarks.md measures it). With a
// grace, every busy client first gets an answer with "Connection: close" and leaves on
// its own; what is still idle after it is a client that is not sending.
const grace = Number(process.env.DRAIN_GRACE_MS ?? 200);
process.on("message", (msg) => {
  if (msg && msg.lb === "drain" && !process.env.IGNORE_DRAIN) {
    draining = true;
    const close = () => {
      server.close();
      server.closeIdleConnections();
    };
    if (grace > 0) setTimeout(close, grace);
    else close();
  }
});

const crashWithin = Number(process.env.CRASH_WITHIN_MS || 0);
if (crashWithin > 0) {
  setTimeout(() => process.exit(4), crashWithin / 2 + Math.random() * (crashWithin / 2));
}

// A graceful stop, as the cluster tutorial's workers do on disconnect: finish what is
// in flight, then exit.
process.on("SIGTERM", () => server.close(() => process.exit(0)));
