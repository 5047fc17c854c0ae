// sio_bare: the cheapest Engine.IO v4 server we can write, to measure the Socket.IO load
// generator's ceiling (run under `ebpf-sticky launch -- node sio_bare.js`, one per slot, fd 3).
// It speaks just what sioload.py sends: the polling handshake, "40", "42" echoed verbatim, and
// the WebSocket upgrade (probe, "5") or a direct WebSocket session. No Socket.IO library, no
// parsing beyond the packet type.
const http = require("http");
const crypto = require("crypto");
const { WebSocketServer } = require("ws");

const sessions = new Map(); // sid -> {queue: [], poll: res|null}
const OPEN = (sid) =>
  "0" + JSON.stringify({ sid, upgrades: ["websocket"], pingInterval: 25000, pingTimeout: 20000, maxPayload: 1e6 });
const id = process.env.EBPF_STICKY_WORKER || "0";

function reply(sid, packet) {
  if (packet === "40") return `40{"sid":"${sid}"}`;
  if (packet.startsWith("42")) return packet;
  return null;
}

function send(res, text) {
  res.writeHead(200, { "Content-Type": "text/plain; charset=UTF-8", "Content-Length": Buffer.byteLength(text) });
  res.end(text);
}

function flush(s) {
  if (s.poll && s.queue.length) {
    send(s.poll, s.queue.join("\x1e"));
    s.poll = null;
    s.queue = [];
  }
}

const server = http.createServer((req, res) => {
  const url = new URL(req.url, "http://x");
  if (url.pathname !== "/socket.io/") return send(res, `${id}\n`);
  const sid = url.searchParams.get("sid");
  if (!sid) {
    const fresh = crypto.randomBytes(8).toString("hex");
    sessions.set(fresh, { queue: [], poll: null });
    return send(res, OPEN(fresh));
  }
  const s = sessions.get(sid);
  if (!s) {
    res.writeHead(400);
    return res.end("unknown sid");
  }
  if (req.method === "POST") {
    let body = "";
    req.on("data", (chunk) => (body += chunk));
    req.on("end", () => {
      for (const packet of body.split("\x1e")) {
        const out = reply(sid, packet);
        if (out) s.queue.push(out);
      }
      send(res, "ok");
      flush(s);
    });
  } else {
    s.poll = res;
    res.on("close", () => s.poll === res && (s.poll = null));
    flush(s);
  }
});

const wss = new WebSocketServer({ noServer: true });
server.on("upgrade", (req, socket, head) => {
  const url = new URL(req.url, "http://x");
  let sid = url.searchParams.get("sid");
  if (sid && !sessions.has(sid)) return socket.destroy();
  wss.handleUpgrade(req, socket, head, (ws) => {
    if (!sid) {
      sid = crypto.randomBytes(8).toString("hex");
      ws.send(OPEN(sid));
    }
    ws.on("message", (data) => {
      const text = data.toString();
      if (text === "2probe") return ws.send("3probe");
      const out = reply(sid, text);
      if (out) ws.send(out);
    });
    ws.on("close", () => sessions.delete(sid));
  });
});
server.listen({ fd: 3 });
