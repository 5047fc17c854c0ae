// The one Node.js HTTP worker every router in scripts/bench puts in front of its clients.
// Answers "<worker id>\n" so the load generator can tell who served it.
//   node worker.js fd3                 socket-activated (ebpf-sticky launch -- node worker.js fd3)
//   node worker.js port PORT ID        its own port (behind nginx / haproxy)
//   node worker.js sticky PORT N       npm sticky-session 1.1.2: cluster master + N workers
const http = require("http");
const cluster = require("cluster");

function handler(id) {
  const body = `${id}\n`;
  return (req, res) => {
    res.setHeader("Content-Type", "text/plain");
    res.setHeader("Content-Length", Buffer.byteLength(body));
    res.end(body);
  };
}

const [mode, a, b] = process.argv.slice(2);
if (mode === "fd3") {
  http.createServer(handler(process.env.EBPF_STICKY_WORKER)).listen({ fd: 3 });
} else if (mode === "port") {
  http.createServer(handler(b)).listen(Number(a), "127.0.0.1");
} else if (mode === "sticky") {
  const sticky = require("sticky-session");
  const id = cluster.isMaster ? "master" : String(cluster.worker.id - 1);
  const server = http.createServer(handler(id));
  if (!sticky.listen(server, Number(a), { workers: Number(b) })) {
    server.once("listening", () => console.log("sticky-session listening"));
  }
} else {
  console.error("usage: worker.js fd3 | port PORT ID | sticky PORT N");
  process.exit(2);
}
