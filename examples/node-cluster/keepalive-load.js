// Keep-alive clients for experiments.sh, like browsers or a connection pool in front of
// the app: CONNECTIONS clients, each sending GET / on its own kept-alive connection,
// pausing PAUSE_MS between requests, for SECONDS. A client whose connection the server
// closes opens a new one for its next request. Prints "OK FAILED": answers 200, and
// requests that failed (an error, a cut connection, another status, no answer in 5 s).
//
//   node keepalive-load.js PORT [CONNECTIONS=40] [PAUSE_MS=100] [SECONDS=10]
const http = require("node:http");

const [port, connections = 40, pause = 100, seconds = 10] = process.argv.slice(2).map(Number);
if (!port) {
  console.error("usage: node keepalive-load.js PORT [CONNECTIONS] [PAUSE_MS] [SECONDS]");
  process.exit(2);
}
const agent = new http.Agent({ keepAlive: true, maxSockets: connections });
const end = Date.now() + seconds * 1000;
let ok = 0;
let failed = 0;
let running = connections;

function client() {
  if (Date.now() >= end) {
    if (--running === 0) {
      console.log(`${ok} ${failed}`);
      process.exit(0);
    }
    return;
  }
  let finished = false;
  const finish = (good) => {
    if (finished) return;
    finished = true;
    if (good) ok++;
    else failed++;
    setTimeout(client, pause);
  };
  const req = http.get({ host: "127.0.0.1", port, path: "/", agent }, (res) => {
    res.resume();
    res.on("end", () => finish(res.statusCode === 200));
    res.on("error", () => finish(false));
  });
  req.setTimeout(5000, () => req.destroy(new Error("no answer in 5 s")));
  req.on("error", () => finish(false));
}

for (let i = 0; i < connections; i++) client();
