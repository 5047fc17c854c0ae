// The Node.js Socket.IO worker of the Socket.IO workloads: echoes each "echo" event to its sender,
// answers plain HTTP with its worker id (the routers' readiness check).
//   node sio_worker.js fd3                 socket-activated (ebpf-sticky launch -- node sio_worker.js fd3)
//   node sio_worker.js sticky PORT N       npm sticky-session 1.1.2: cluster master + N workers
//   node sio_worker.js socketio-sticky PORT N   @socket.io/sticky: cluster master + N workers
const http = require("http");
const cluster = require("cluster");
const { Server } = require("socket.io");

function serve(id) {
  const body = `${id}\n`;
  const server = http.createServer((req, res) => {
    res.setHeader("Content-Type", "text/plain");
    res.setHeader("Content-Length", Buffer.byteLength(body));
    res.end(body);
  });
  const io = new Server(server);
  io.on("connection", (socket) => socket.on("echo", (data) => socket.emit("echo", data)));
  return { server, io };
}

const [mode, a, b] = process.argv.slice(2);
if (mode === "fd3") {
  serve(process.env.EBPF_STICKY_WORKER).server.listen({ fd: 3 });
} else if (mode === "sticky") {
  const sticky = require("sticky-session");
  const { server } = serve(cluster.isMaster ? "master" : String(cluster.worker.id - 1));
  sticky.listen(server, Number(a), { workers: Number(b) });
} else if (mode === "socketio-sticky") {
  const { setupMaster, setupWorker } = require("@socket.io/sticky");
  if (cluster.isPrimary) {
    const server = http.createServer();
    setupMaster(server, { loadBalancingMethod: "least-connection" });
    server.listen(Number(a), "127.0.0.1");
    for (let i = 0; i < Number(b); i++) cluster.fork();
  } else {
    const { io } = serve(String(cluster.worker.id - 1));
    setupWorker(io);
  }
} else {
  console.error("usage: sio_worker.js fd3 | sticky PORT N | socketio-sticky PORT N");
  process.exit(2);
}
