// Any-language worker: serves on the socket it inherits as fd 3 (systemd socket activation).
const http = require("http");
if (process.env.LISTEN_PID !== String(process.pid) || process.env.LISTEN_FDS !== "1") {
  console.error("not socket-activated for this pid");
  process.exit(3);
}
const server = http
  .createServer((req, res) => {
    res.setHeader("Content-Type", "text/plain");
    res.end(`${process.env.EBPF_STICKY_WORKER} ${process.pid} ${process.getuid()}\n`);
  })
  .listen({ fd: 3 });
// Asked to stop (a reload, an upgrade): finish the connections already accepted, as uvicorn does;
// node's default for TERM is to die with them open. Closing fd 3 leaves the master's socket be.
process.on("SIGTERM", () => server.close(() => process.exit(0)));
