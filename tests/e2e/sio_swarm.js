// node sio_swarm.js URL TRANSPORTS ROUNDS TIMEOUT_MS SOURCE... → JSON {ok, failed, errors, workers}
// One socket.io-client per source address, all at once, each bound with its own http(s).Agent.
// For https URLs, NODE_EXTRA_CA_CERTS names the test CA.
const http = require("http");
const https = require("https");
const { io } = require("socket.io-client");

const [url, transports, rounds, timeoutMs, ...sources] = process.argv.slice(2);
const timeout = Number(timeoutMs);

async function one(source) {
  const Agent = url.startsWith("https:") ? https.Agent : http.Agent;
  const agent = new Agent({ localAddress: source, keepAlive: false });
  const socket = io(url, {
    transports: transports.split(","),
    agent,
    localAddress: source,
    reconnection: false,
    forceNew: true,
    timeout,
  });
  try {
    await new Promise((resolve, reject) => {
      socket.once("connect", resolve);
      socket.once("connect_error", reject);
    });
    const workers = new Set();
    for (let i = 0; i < Number(rounds); i++) {
      const answer = await socket.timeout(timeout).emitWithAck("whoami");
      workers.add(answer.worker);
    }
    if (transports.includes("websocket") && socket.io.engine.transport.name !== "websocket") {
      throw new Error(`still on ${socket.io.engine.transport.name}`);
    }
    if (workers.size !== 1) throw new Error(`answered from workers ${[...workers]}`);
    return { source, worker: [...workers][0] };
  } finally {
    socket.disconnect();
    agent.destroy();
  }
}

(async () => {
  const results = await Promise.allSettled(sources.map(one));
  const out = { ok: 0, failed: 0, errors: [], workers: {} };
  results.forEach((r, i) => {
    if (r.status === "fulfilled") {
      out.ok += 1;
      out.workers[r.value.source] = r.value.worker;
    } else {
      out.failed += 1;
      out.errors.push(`${sources[i]}: ${r.reason && r.reason.message}`);
    }
  });
  console.log(JSON.stringify(out));
})();
