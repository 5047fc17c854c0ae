// Any-language worker: serves on the socket it inherits as fd 3 (systemd socket activation).
const http = require("http");
if (process.env.LISTEN_PID !== String(process.pid) || process.env.LISTEN_FDS !== "1") {
  console.error("not socket-activated for this pid");
  process.exit(3);
}
http
  .createServer((req, res) => {
    res.setHeader("Content-Type", "text/plain");
    res.end(`${process.env.EBPF_STICKY_WORKER} ${process.pid} ${process.getuid()}\n`);
  })
  .listen({ fd: 3 });
