// The peer of lb in the availability bench: Node's cluster module as its tutorial
// uses it. The primary forks WORKERS workers, forks a new one whenever one exits
// unasked, and on SIGUSR2 restarts them one at a time (disconnect the old one, fork
// its successor once it has exited, go on when the successor listens).
const cluster = require("node:cluster");

const count = Number(process.env.WORKERS || 2);

if (cluster.isPrimary) {
  for (let i = 0; i < count; i++) cluster.fork({ WORKER_ID: i });

  cluster.on("exit", (worker, code) => {
    if (worker.exitedAfterDisconnect) return;
    console.log(`worker exited with code ${code}; forking a new one`);
    cluster.fork();
  });

  process.on("SIGUSR2", () => {
    const workers = Object.values(cluster.workers);
    const restart = (i) => {
      const worker = workers[i];
      if (!worker) return;
      worker.on("exit", () => {
        if (!worker.exitedAfterDisconnect) return;
        cluster.fork().on("listening", () => restart(i + 1));
      });
      worker.disconnect();
    };
    restart(0);
  });
} else {
  require("./server.js");
}
