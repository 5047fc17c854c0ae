// node sio_swarm.js URL TRANSPORTS ROUNDS TIMEOUT_MS SOURCE... → JSON {ok, failed, errors, workers, hosts}
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
    const answered = new Set();
    for (let i = 0; i < Number(rounds); i++) {
      const answer = await socket.timeout(timeout).emitWithAck("whoami");
      answered.add(JSON.stringify([answer.host, answer.worker]));
    }
    if (transports.includes("websocket") && socket.io.engine.transport.name !== "websocket") {
      throw new Error(`still on ${socket.io.engine.transport.name}`);
    }
    if (answered.size !== 1) throw new Error(`answered from (host, worker) ${[...answered]}`);
    const [host, worker] = JSON.parse([...answered][0]);
    return { source, host, worker };
  } finally {
    socket.disconnect();
    agent.destroy();
  }
}

(async () => {
  const results = await Promise.allSettled(sources.map(one));
  const out = { ok: 0, failed: 0, errors: [], workers: {}, hosts: {} };
  results.forEach((r, i) => {
    if (r.status === "fulfilled") {
      out.ok += 1;
      out.workers[r.value.source] = r.value.worker;
      out.hosts[r.value.source] = r.value.host;
    } else {
      out.failed += 1;
      out.errors.push(`${sources[i]}: ${r.reason && r.reason.message}`);
    }
  });
  console.log(JSON.stringify(out));
})();
