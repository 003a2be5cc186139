// forcekit page: WebRTC video from the server, held keys back over a data channel.
// State is mirrored on window.forcekit so that tests (and curious users) can read it.
"use strict";

const fk = (window.forcekit = {
  connected: false, peerId: null, error: null, info: null, rtt: null,
  applied: [], stats: null, held: [], seq: 0, sentAt: {}, messages: 0, serverErrors: [],
});

const $ = (id) => document.getElementById(id);
const video = $("video");
let pc = null, channel = null, pingTimer = null, fpsTimer = null;

const NAMES = {
  arrowup: "up", arrowdown: "down", arrowleft: "left", arrowright: "right", " ": "space",
  control: "ctrl", escape: "escape", enter: "enter", shift: "shift", alt: "alt", tab: "tab",
};
function keyName(ev) {
  const k = ev.key.toLowerCase();
  return NAMES[k] || k;
}

function setStatus(text, cls) {
  const el = $("status");
  el.textContent = text;
  el.className = cls || "";
}

function fmt(ms) { return ms == null ? "–" : `${ms.toFixed(0)} ms`; }

function renderKeys() {
  const rows = Object.entries(fk.info.bindings).map(([key, action]) => {
    const held = fk.held.includes(key) ? "held" : "";
    return `<tr><td><kbd class="${held}">${key}</kbd></td><td>${action}</td></tr>`;
  });
  $("keys").innerHTML = rows.join("") || "<tr><td>this bundle takes no keys</td></tr>";
}

function send(obj) {
  if (channel && channel.readyState === "open") channel.send(JSON.stringify(obj));
}

function sendKeys() {
  fk.seq += 1;
  fk.sentAt[fk.seq] = performance.now();
  send({ type: "keys", keys: fk.held, seq: fk.seq });
  renderKeys();
}

function updateHeld(name, down) {
  if (!fk.info || !(name in fk.info.bindings)) return false;
  const has = fk.held.includes(name);
  if (down && !has) fk.held = [...fk.held, name].sort();
  else if (!down && has) fk.held = fk.held.filter((k) => k !== name);
  else return true;
  sendKeys();
  return true;
}

window.addEventListener("keydown", (ev) => { if (updateHeld(keyName(ev), true)) ev.preventDefault(); });
window.addEventListener("keyup", (ev) => { if (updateHeld(keyName(ev), false)) ev.preventDefault(); });
window.addEventListener("blur", () => { if (fk.held.length) { fk.held = []; sendKeys(); } });

function onMessage(ev) {
  fk.messages += 1;
  let msg;
  try {
    msg = JSON.parse(ev.data);
  } catch (err) {
    return;  // not ours to show; the server only sends JSON
  }
  if (msg.type === "pong") {
    fk.rtt = performance.now() - msg.t;
    $("rtt").textContent = fmt(fk.rtt);
  } else if (msg.type === "applied") {
    const t0 = fk.sentAt[msg.seq];
    if (t0 !== undefined) {
      const ms = performance.now() - t0;
      fk.applied.push({ seq: msg.seq, ms, actions: msg.actions });
      $("applied").textContent = fmt(ms);
      for (const s of Object.keys(fk.sentAt)) if (+s <= msg.seq) delete fk.sentAt[s];
    }
  } else if (msg.type === "stats") {
    const s = (fk.stats = msg.stats);
    $("genfps").textContent = s.generated_fps == null ? "–" : s.generated_fps.toFixed(1);
    $("latency").textContent = `${fmt(s.input_to_frame_ms.p50)} / ${fmt(s.input_to_frame_ms.p95)}`;
    $("ttff").textContent = fmt(s.first_frame_ms);
    $("dropped").textContent = `${s.dropped}`;
    $("actions").textContent = msg.keys.length ? msg.keys.join(", ") : "(none)";
  } else if (msg.type === "error") {
    fk.serverErrors.push(msg.message);
    setStatus(`server: ${msg.message}`, "error");
  }
}

async function waitIceGathering(conn) {
  if (conn.iceGatheringState === "complete") return;
  await new Promise((resolve) => {
    const check = () => {
      if (conn.iceGatheringState === "complete") {
        conn.removeEventListener("icegatheringstatechange", check);
        resolve();
      }
    };
    conn.addEventListener("icegatheringstatechange", check);
  });
}

async function connect() {
  $("connect").disabled = true;
  fk.error = null;
  setStatus("connecting…");
  pc = new RTCPeerConnection();
  pc.addTransceiver("video", { direction: "recvonly" });
  pc.addEventListener("track", (ev) => {
    // Ask for the smallest jitter buffer (play frames as soon as they are decoded): this is a
    // game, where input-to-frame delay matters more than smoothness. Browsers without the
    // setting keep their own default.
    const r = ev.receiver;
    if ("jitterBufferTarget" in r) r.jitterBufferTarget = 0;
    if ("playoutDelayHint" in r) r.playoutDelayHint = 0;
    fk.jitterBufferTarget = "jitterBufferTarget" in r ? r.jitterBufferTarget : null;
    video.srcObject = ev.streams[0] || new MediaStream([ev.track]);
  });
  pc.addEventListener("connectionstatechange", () => {
    if (!pc) return;
    const state = pc.connectionState;
    fk.connected = state === "connected";
    if (state === "connected") setStatus(`connected (session ${fk.peerId})`, "ok");
    else if (state === "failed" || state === "closed") setStatus(`connection ${state}`, "error");
  });
  channel = pc.createDataChannel("input");
  channel.addEventListener("open", () => {
    sendKeys();
    pingTimer = setInterval(() => send({ type: "ping", t: performance.now() }), 1000);
  });
  channel.addEventListener("message", onMessage);

  await pc.setLocalDescription(await pc.createOffer());
  await waitIceGathering(pc);
  let res;
  try {
    res = await fetch("/offer", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ sdp: pc.localDescription.sdp, type: pc.localDescription.type }),
    });
  } catch (err) {
    return fail(`could not reach the server: ${err}`);
  }
  const body = await res.json().catch(() => ({ error: `HTTP ${res.status}` }));
  if (!res.ok) return fail(`${res.status}: ${body.error}`);
  fk.peerId = body.peer_id;
  await pc.setRemoteDescription({ sdp: body.sdp, type: body.type });
  $("disconnect").disabled = false;
  $("reset").disabled = false;
}

function fail(message) {
  fk.error = message;
  setStatus(message, "error");
  disconnect();
}

function disconnect() {
  clearInterval(pingTimer);
  if (channel) channel.close();
  if (pc) pc.close();
  pc = channel = null;
  fk.connected = false;
  $("connect").disabled = false;
  $("disconnect").disabled = true;
  $("reset").disabled = true;
  if (!fk.error) setStatus("disconnected");
}

function trackFps() {
  let lastFrames = 0, lastT = performance.now();
  fpsTimer = setInterval(() => {
    const q = video.getVideoPlaybackQuality ? video.getVideoPlaybackQuality() : null;
    if (!q) return;
    const t = performance.now();
    const fps = ((q.totalVideoFrames - lastFrames) * 1000) / (t - lastT);
    lastFrames = q.totalVideoFrames;
    lastT = t;
    fk.videoFps = fps;
    $("fps").textContent = fps.toFixed(1);
  }, 1000);
}

// Leaving the page (tab closed, navigation): say goodbye so the server frees the session now;
// a browser that dies without this is caught by the server's idle timeout instead.
window.addEventListener("pagehide", () => {
  send({ type: "bye" });
  if (pc) pc.close();
});

$("connect").addEventListener("click", connect);
$("disconnect").addEventListener("click", () => { send({ type: "bye" }); disconnect(); });
$("reset").addEventListener("click", () => send({ type: "reset", seed: Math.floor(Math.random() * 1e6) }));

(async () => {
  fk.info = await (await fetch("/info")).json();
  renderKeys();
  trackFps();
  if (!new URLSearchParams(location.search).has("manual")) connect();
  else setStatus("ready: press connect");
})();
