// A visits counter that every worker shares: the count lives in Redis, not in the
// worker's memory, so `GET /` answers `visits=N worker=ID` with one sequence of N
// whichever worker lb picked. No npm package: the few lines of Redis protocol (RESP)
// it needs are below, over Node's own `net`.
//
// REDIS_ADDR is lb's listen address for the Redis service (lb.yaml), a fixed address
// that outlives Redis restarts; this worker keeps one connection to it and reconnects
// whenever it closes (Redis not started yet, restarted, lb's idle timeout).
const http = require("node:http");
const net = require("node:net");

const [redisHost, redisPort] = splitAddr(process.env.REDIS_ADDR || "127.0.0.1:6380");
const worker = process.env.LB_WORKER_ID;
let draining = false;
let listening = false;
let redisSeen = false; // Redis has answered once: the worker may say it is ready
let saidReady = false;

// --- Redis client: one connection, replies matched to requests in order. ---

let redis = null; // the open connection, or null while (re)connecting
let pending = []; // callbacks of the commands sent on `redis`, oldest first
let received = "";
let retryDelay = 50;

function splitAddr(addr) {
  const colon = addr.lastIndexOf(":");
  return [addr.slice(0, colon), Number(addr.slice(colon + 1))];
}

// A command as RESP: an array of bulk strings.
function encode(args) {
  return `*${args.length}\r\n` + args.map((a) => `$${Buffer.byteLength(a)}\r\n${a}\r\n`).join("");
}

// Calls `done(err, reply)`. Only one-line replies are parsed (`+OK`, `:42`, `-ERR …`):
// the commands this app sends (PING, INCR) answer nothing else.
function command(args, done) {
  if (!redis) return done(new Error("not connected to Redis at " + process.env.REDIS_ADDR));
  pending.push(done);
  redis.write(encode(args));
}

function connect() {
  const socket = net.connect(redisPort, redisHost);
  socket.setNoDelay(true);
  socket.setEncoding("utf8");
  socket.on("connect", () => {
    redis = socket;
    received = "";
    // Connected to lb is not connected to Redis: lb holds the connection until a Redis
    // worker is ready (up to timeouts.connect). The PING answer is the proof.
    command(["PING"], (err) => {
      if (err) return;
      retryDelay = 50;
      redisSeen = true;
      maybeReady();
    });
  });
  socket.on("data", (chunk) => {
    received += chunk;
    let end;
    while ((end = received.indexOf("\r\n")) >= 0) {
      const line = received.slice(0, end);
      received = received.slice(end + 2);
      const done = pending.shift();
      if (!done) continue;
      if (line[0] === "-") done(new Error(line.slice(1)));
      else if (line[0] === ":") done(null, Number(line.slice(1)));
      else done(null, line.slice(1));
    }
  });
  socket.on("error", () => {}); // "close" follows and handles it
  socket.on("close", () => {
    if (redis === socket) redis = null;
    const failed = pending;
    pending = [];
    for (const done of failed) done(new Error("Redis connection closed"));
    setTimeout(connect, retryDelay);
    retryDelay = Math.min(retryDelay * 2, 1000);
  });
}

// --- HTTP server. ---

const server = http.createServer((req, res) => {
  // Once draining, each keep-alive client is told to take its next request elsewhere.
  if (draining) res.setHeader("Connection", "close");
  if (req.url !== "/") {
    res.statusCode = 404; // a browser's /favicon.ico is not a visit
    return res.end("not found\n");
  }
  command(["INCR", "visits"], (err, visits) => {
    if (err) {
      res.statusCode = 503;
      return res.end(`redis unavailable: ${err.message} (worker=${worker})\n`);
    }
    res.end(`visits=${visits} worker=${worker}\n`);
  });
});

// With `ready: message`, lb sends this worker no client before it says "ready": only
// once it listens and Redis has answered, so no visitor sees a 503 at startup.
function maybeReady() {
  if (listening && redisSeen && !saidReady && process.send) {
    saidReady = true;
    process.send("ready");
  }
}

// lb's drain message: this worker leaves rotation (rollout, scale-down, lb's stop), so
// stop taking requests and close idle keep-alive connections; their clients move to the
// other workers. lb sends the stop signal once the connections are gone. The 200 ms
// grace lets a request already on its way on an "idle" connection be answered first.
process.on("message", (msg) => {
  if (msg && msg.lb === "drain") {
    draining = true;
    setTimeout(() => {
      server.close();
      server.closeIdleConnections();
    }, 200);
  }
});

server.listen(Number(process.env.PORT || 8080), process.env.HOST || "127.0.0.1", () => {
  listening = true;
  maybeReady();
});
connect();
