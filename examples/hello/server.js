// A tiny HTTP app for lb's example config: says which worker answered.
const http = require("node:http");

const port = Number(process.env.PORT);
const host = process.env.HOST || "127.0.0.1";
const id = process.env.LB_WORKER_ID;

http
  .createServer((req, res) => {
    res.end(`${process.env.GREETING || "hello"} from worker ${id} (pid ${process.pid})\n`);
  })
  .listen(port, host, () => {
    console.log(`listening on ${host}:${port}`);
  });
