// kotodama web demo: API v1 over WebRTC, no build step. When WebRTC cannot connect (ICE fails, e.g.
// UDP is blocked and no TURN server helps) it falls back to the WebSocket transport
// (`GET /v1/sessions/{id}/ws`, PCM16 at 48 kHz both ways) and says so.
// Event names and value sets come from schema.js, generated from the server's Rust schema.
// @ts-check
import { CLIENT_EVENT_TYPES, EMOTIONS, PROTOCOL_VERSION, VISEMES } from "./schema.js";

/** @typedef {import("./events").ServerEvent} ServerEvent */

const $ = (/** @type {string} */ id) => /** @type {any} */ (document.getElementById(id));

/** Mouth openings per viseme: [width, height] in face units. */
const MOUTH = {
  sil: [40, 2], PP: [34, 0], FF: [38, 4], TH: [40, 6], DD: [40, 10], kk: [42, 12], CH: [32, 12], SS: [44, 5],
  nn: [40, 8], RR: [30, 10], aa: [44, 26], E: [48, 16], ih: [50, 10], oh: [30, 22], ou: [22, 14],
};
/** Expression per emotion: smile (mouth corners), brow lift, inner brow tilt, eye height. */
const FACE = {
  neutral: [0, 0, 0, 9], happy: [7, 3, 0, 7], sad: [-6, 0, 5, 8], angry: [-3, -3, -6, 8], surprised: [0, 8, 0, 12],
  fearful: [-3, 5, 5, 11], disgusted: [-5, -2, -3, 6], thinking: [-1, 4, 2, 8], relaxed: [3, 1, 0, 6],
};

/** What the page saw, for humans and for the browser tests. */
const state = {
  /** @type {{t: number, event: ServerEvent}[]} */ events: [],
  /** @type {{t: number, mic: number, voice: number}[]} */ levels: [],
  /** @type {number[]} */ latencies: [],
  /** @type {{t: number, viseme: string}[]} */ visemeRenders: [],
  viseme: "sil", emotion: "neutral", visemeChanges: 0, connected: false, error: "",
  /** Receiver-side delay between a packet's arrival and its sound (jitter buffer), ms. */
  renderDelay: 0,
  /** An ICE restart is under way after the connection failed. */
  reconnecting: false,
  /** How the page talks with the server: "webrtc", or "websocket" after a fallback. */
  transport: "webrtc",
  /** The selected character's emotion -> expression mapping. */
  /** @type {Record<string, string>} */ expressions: {},
};
// @ts-ignore: exposed for tests and debugging
window.kotodama = state;
// @ts-ignore: for tests and debugging: restart ICE now, as after a network change
window.kotodamaRestartIce = () => restartIce();

let pc = /** @type {RTCPeerConnection|null} */ (null);
let dc = /** @type {RTCDataChannel|null} */ (null);
let ws = /** @type {WebSocket|null} */ (null);
/** WebSocket playout: the next start time (AudioContext seconds) and the sources not yet played. */
let wsPlayAt = 0;
let wsSources = /** @type {AudioBufferSourceNode[]} */ ([]);
/** The WebSocket voice's node (analysed by the meter, then to the speakers). */
let wsVoice = /** @type {AudioNode|null} */ (null);
let iceFallbackTimer = 0;
/** How long WebRTC may take to connect before the page falls back to the WebSocket transport, ms. */
const ICE_FALLBACK_MS = 8000;
/** WebSocket audio: PCM16 mono at this rate both ways, 20 ms frames (README, "WebSocket transport"). */
const WS_RATE_HZ = 48000, WS_FRAME = 960;
let session = /** @type {any} */ (null);
let peerUrl = /** @type {string|null} */ (null);
let mic = /** @type {MediaStream|null} */ (null);
let audioCtx = /** @type {AudioContext|null} */ (null);
let visemeTimer = 0;
let lastMicVoice = 0, turnEnd = 0, awaitingReply = false;
const bubbles = new Map();

function note(text, cls = "note") {
  const el = document.createElement("div");
  el.className = cls; el.textContent = text;
  $("log").appendChild(el); $("log").scrollTop = $("log").scrollHeight;
}
function showError(msg) { state.error = msg; $("error").textContent = msg; if (msg) note(msg, "note error"); }

function drawFace() {
  const [w, h] = MOUTH[state.viseme] || MOUTH.sil;
  // A character may map an emotion to another of the face's expressions (GET /v1/characters).
  const face = (state.expressions && state.expressions[state.emotion]) || state.emotion;
  const [smile, lift, tilt, eye] = FACE[face] || FACE.neutral;
  const l = 100 - w / 2, r = 100 + w / 2, y = 140 - smile;
  $("mouth").setAttribute("d", `M ${l} ${y} Q 100 ${140 + smile * 0.6 - 2} ${r} ${y} Q 100 ${140 + h + smile * 0.3} ${l} ${y} Z`);
  $("brow-l").setAttribute("y1", 70 - lift + tilt); $("brow-l").setAttribute("y2", 70 - lift - tilt);
  $("brow-r").setAttribute("y1", 70 - lift - tilt); $("brow-r").setAttribute("y2", 70 - lift + tilt);
  $("eye-l").setAttribute("ry", eye); $("eye-r").setAttribute("ry", eye);
  $("viseme").textContent = state.viseme; $("emotion").textContent = state.emotion;
}

function setViseme(v, ms) {
  if (!VISEMES.includes(v)) v = "sil";
  if (v !== state.viseme) state.visemeChanges++;
  state.viseme = v; drawFace();
  clearTimeout(visemeTimer);
  // Close the mouth if no newer shape arrives in time.
  visemeTimer = setTimeout(() => { state.viseme = "sil"; drawFace(); }, ms + 60);
}

function setState(s) { $("state").textContent = s; $("state").dataset.state = s; }

function transcript(ev) {
  const key = ev.role + ":" + ev.item_id;
  let el = bubbles.get(key);
  if (!el) {
    el = document.createElement("div"); bubbles.set(key, el); $("log").appendChild(el);
  }
  el.className = `msg ${ev.role}${ev.final ? "" : " partial"}`;
  el.textContent = ev.text;
  $("log").scrollTop = $("log").scrollHeight;
}

/** @param {ServerEvent} ev */
function onEvent(ev) {
  state.events.push({ t: performance.now(), event: ev });
  switch (ev.type) {
    case "session.ready":
      if (ev.protocol !== PROTOCOL_VERSION) showError(`server speaks protocol ${ev.protocol}, this page ${PROTOCOL_VERSION}`);
      note(`connected to ${ev.character} (${ev.provider})`); break;
    case "state":
      setState(ev.state);
      if (ev.state === "thinking") { turnEnd = lastMicVoice || performance.now(); awaitingReply = true; }
      break;
    case "transcript": transcript(ev); break;
    case "emotion": state.emotion = EMOTIONS.includes(ev.emotion) ? ev.emotion : "neutral"; drawFace(); break;
    case "viseme":
      // Events arrive with their audio packets; the sound comes out after the jitter buffer.
      setTimeout(() => {
        setViseme(ev.viseme, ev.duration_ms);
        if (state.visemeRenders.length < 5000) state.visemeRenders.push({ t: performance.now(), viseme: ev.viseme });
      }, state.renderDelay);
      break;
    case "agent.interrupted": {
      const el = bubbles.get("agent:" + ev.item_id); if (el) el.classList.add("interrupted");
      flushWsPlayout(); setViseme("sil", 0); break;
    }
    case "error": note(`${ev.code}: ${ev.message}`, "note error"); break;
    case "session.ended": note(`session ended: ${ev.reason}`); break;
    case "gesture": note(`*${ev.gesture}*`); break;
  }
}

function level(analyser, buf) {
  analyser.getFloatTimeDomainData(buf);
  let sum = 0; for (const x of buf) sum += x * x;
  return Math.sqrt(sum / buf.length);
}

/** Mic and voice levels every 10 ms: the latency readout and the browser tests use them.
 * `remote` is the character's voice: a MediaStream (WebRTC) or an AudioNode of `audioCtx` (WebSocket). */
function meter(remote) {
  if (!audioCtx) audioCtx = new AudioContext();
  const a = audioCtx.createAnalyser(), b = audioCtx.createAnalyser();
  a.fftSize = b.fftSize = 512;
  if (mic) audioCtx.createMediaStreamSource(mic).connect(a);
  if (remote instanceof MediaStream) audioCtx.createMediaStreamSource(remote).connect(b);
  else remote.connect(b);
  const ba = new Float32Array(a.fftSize), bb = new Float32Array(b.fftSize);
  const tick = () => {
    if (!audioCtx) return;
    const t = performance.now(), m = level(a, ba), v = level(b, bb);
    if (m > 0.02) lastMicVoice = t;
    if (awaitingReply && v > 0.02 && t > turnEnd) {
      const ms = Math.round(t - turnEnd); awaitingReply = false;
      state.latencies.push(ms); $("latency").textContent = `${ms} ms (end of your speech → first voice)`;
    }
    if (state.levels.length < 20000) state.levels.push({ t, mic: m, voice: v });
    setTimeout(tick, 10);
  };
  tick();
}

/** Follow the receiver's jitter-buffer delay so visemes show when their sound plays. */
function trackRenderDelay(receiver) {
  let last = { delay: 0, count: 0 };
  const poll = async () => {
    if (!pc) return;
    const stats = await receiver.getStats().catch(() => null);
    stats && stats.forEach((r) => {
      if (r.type === "inbound-rtp" && r.jitterBufferEmittedCount > last.count) {
        const d = (r.jitterBufferDelay - last.delay) / (r.jitterBufferEmittedCount - last.count);
        state.renderDelay = Math.max(0, Math.min(300, Math.round(d * 1000)));
        last = { delay: r.jitterBufferDelay, count: r.jitterBufferEmittedCount };
      }
    });
    setTimeout(poll, 500);
  };
  poll();
}

function send(obj) {
  if (!CLIENT_EVENT_TYPES.includes(obj.type)) throw new Error(`unknown client event ${obj.type}`);
  if (dc && dc.readyState === "open") dc.send(JSON.stringify(obj));
  else if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(obj));
}

/** A new session (POST /v1/sessions) for the selected character. */
async function createSession() {
  let res;
  try {
    res = await fetch("/v1/sessions", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ character: $("character").value || undefined }) });
  } catch (e) {
    throw new Error("Server unreachable: is kotodama running?");
  }
  if (!res.ok) throw new Error(`The server refused the session: ${await problem(res)}`);
  return res.json();
}

/** WebRTC could not connect: end that session and talk over the WebSocket transport instead (a
 * session token is single-use and the first one went to the offer, so this is a new session). */
async function fallbackToWebSocket() {
  clearTimeout(iceFallbackTimer);
  if (!pc || state.connected || state.transport !== "webrtc") return;
  note("WebRTC could not connect (ICE failed): falling back to the WebSocket transport.");
  const old = session;
  pc.close(); pc = dc = peerUrl = null;
  if (old) fetch(`/v1/sessions/${old.session_id}`, { method: "DELETE",
    headers: { "Authorization": "Bearer " + old.token } }).catch(() => {});
  state.transport = "websocket";
  try {
    session = await createSession();
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    ws = new WebSocket(`${scheme}://${location.host}/v1/sessions/${session.session_id}/ws?token=${encodeURIComponent(session.token)}`);
    ws.binaryType = "arraybuffer";
    await new Promise((resolve, reject) => {
      if (!ws) return reject(new Error("closed"));
      ws.onopen = resolve;
      ws.onerror = () => reject(new Error("the WebSocket transport could not connect either"));
    });
    ws.onmessage = (m) => {
      if (typeof m.data === "string") { try { onEvent(JSON.parse(m.data)); } catch (_) { /* not JSON */ } }
      else playWsFrame(m.data);
    };
    ws.onclose = (c) => { if (ws) { note(`WebSocket closed (${c.code}${c.reason ? " " + c.reason : ""})`); disconnect(false); } };
    ws.send(JSON.stringify({ type: "audio.format", codec: "pcm16", rate_hz: WS_RATE_HZ }));
    await startWsAudio();
    state.connected = true;
    note("Connected over WebSocket.");
  } catch (e) {
    showError(`WebSocket fallback failed: ${e.message}`); await disconnect(false);
  }
}

/** Microphone -> 20 ms PCM16 frames behind the 4-byte audio header (kind 1, flags 0, u16 BE sequence);
 * the character's voice is scheduled frame after frame on the same AudioContext at 48 kHz. */
async function startWsAudio() {
  if (audioCtx) audioCtx.close();
  audioCtx = new AudioContext({ sampleRate: WS_RATE_HZ });
  const worklet = `registerProcessor("pcm-tap", class extends AudioWorkletProcessor {
    process(inputs) { const ch = inputs[0] && inputs[0][0]; if (ch) this.port.postMessage(ch.slice(0)); return true; }
  });`;
  await audioCtx.audioWorklet.addModule(URL.createObjectURL(new Blob([worklet], { type: "text/javascript" })));
  const tap = new AudioWorkletNode(audioCtx, "pcm-tap");
  if (mic) audioCtx.createMediaStreamSource(mic).connect(tap);
  const frame = new Int16Array(WS_FRAME);
  let fill = 0, seq = 0;
  tap.port.onmessage = (m) => {
    for (const x of /** @type {Float32Array} */ (m.data)) {
      frame[fill++] = Math.max(-32768, Math.min(32767, Math.round(x * 32767)));
      if (fill === WS_FRAME) {
        fill = 0;
        const msg = new Uint8Array(4 + WS_FRAME * 2);
        msg[0] = 1; /* kind: audio; msg[1] flags = 0 */ msg[2] = (seq >> 8) & 0xff; msg[3] = seq & 0xff; seq = (seq + 1) & 0xffff;
        const view = new DataView(msg.buffer, 4);
        for (let i = 0; i < WS_FRAME; i++) view.setInt16(i * 2, frame[i], true);
        if (ws && ws.readyState === WebSocket.OPEN) ws.send(msg);
      }
    }
  };
  const voice = audioCtx.createGain();
  voice.connect(audioCtx.destination);
  wsVoice = voice;
  meter(voice);
}

/** One server frame (header + PCM16 LE at 48 kHz): play it right after the previous one. */
function playWsFrame(/** @type {ArrayBuffer} */ data) {
  if (!audioCtx || !wsVoice || data.byteLength <= 4 || new Uint8Array(data)[0] !== 1) return;
  const n = (data.byteLength - 4) >> 1, view = new DataView(data, 4);
  const buf = audioCtx.createBuffer(1, n, WS_RATE_HZ), ch = buf.getChannelData(0);
  for (let i = 0; i < n; i++) ch[i] = view.getInt16(i * 2, true) / 32768;
  const src = audioCtx.createBufferSource();
  src.buffer = buf; src.connect(wsVoice);
  // A small lead absorbs network jitter; a gap (a new talk spurt) restarts the schedule.
  wsPlayAt = Math.max(wsPlayAt, audioCtx.currentTime + 0.06);
  src.start(wsPlayAt); wsPlayAt += n / WS_RATE_HZ;
  wsSources.push(src);
  src.onended = () => { wsSources = wsSources.filter((s) => s !== src); };
}

/** Barge-in over WebSocket: drop the voice already scheduled. */
function flushWsPlayout() {
  for (const s of wsSources) { try { s.stop(); } catch (_) { /* not started */ } }
  wsSources = []; wsPlayAt = 0;
}

async function problem(res) {
  const body = await res.json().catch(() => ({}));
  return `${res.status} ${body.title || ""}${body.detail ? ": " + body.detail : ""}`;
}

async function connect() {
  showError(""); $("connect").disabled = true;
  try {
    try {
      mic = await navigator.mediaDevices.getUserMedia({ audio: { echoCancellation: true, noiseSuppression: true } });
    } catch (e) {
      throw new Error(`Microphone denied or unavailable (${e.name}). Allow the microphone and try again.`);
    }
    state.transport = "webrtc";
    session = await createSession();
    pc = new RTCPeerConnection({ iceServers: session.ice_servers });
    pc.addTransceiver(mic.getAudioTracks()[0], { direction: "sendrecv" });
    pc.ontrack = (e) => {
      const stream = e.streams[0] || new MediaStream([e.track]);
      $("voice").srcObject = stream; meter(stream);
      trackRenderDelay(e.receiver);
    };
    pc.onconnectionstatechange = () => {
      if (!pc) return;
      if (pc.connectionState === "connected") {
        clearTimeout(iceFallbackTimer);
        if (state.reconnecting) { state.reconnecting = false; showError(""); note("Reconnected."); }
        state.connected = true;
      }
      if (pc.connectionState === "failed") {
        if (state.connected) restartIce();
        else fallbackToWebSocket();
      }
    };
    dc = pc.createDataChannel("events", { ordered: true });
    dc.onmessage = (m) => { try { onEvent(JSON.parse(m.data)); } catch (_) { /* not JSON: ignore */ } };
    await pc.setLocalDescription(await pc.createOffer());
    await new Promise((resolve) => {
      if (!pc || pc.iceGatheringState === "complete") return resolve(null);
      const t = setTimeout(resolve, 2000);
      pc.onicegatheringstatechange = () => { if (pc && pc.iceGatheringState === "complete") { clearTimeout(t); resolve(null); } };
    });
    const ans = await fetch(session.offer_url, { method: "POST",
      headers: { "Content-Type": "application/sdp", "Authorization": "Bearer " + session.token },
      body: pc.localDescription ? pc.localDescription.sdp : "" });
    if (!ans.ok) throw new Error(`The server refused the offer: ${await problem(ans)}`);
    peerUrl = ans.headers.get("Location");
    await pc.setRemoteDescription({ type: "answer", sdp: await ans.text() });
    iceFallbackTimer = setTimeout(fallbackToWebSocket, ICE_FALLBACK_MS);
    for (const id of ["disconnect", "interrupt", "text", "send"]) $(id).disabled = false;
  } catch (e) {
    showError(e.message); await disconnect(false);
  }
}

/** The sdpfrag of our restarted offer (RFC 8840): credentials, first m-line and mid, candidates. */
function offerSdpfrag(/** @type {string} */ sdp) {
  const lines = sdp.split(/\r?\n/);
  const first = (/** @type {string} */ p) => lines.find((l) => l.startsWith(p)) || "";
  const cands = [...new Set(lines.filter((l) => l.startsWith("a=candidate:")))];
  return [first("a=ice-ufrag:"), first("a=ice-pwd:"), first("m="), first("a=mid:"), ...cands, "a=end-of-candidates", ""]
    .join("\r\n");
}

/** `sdp` (the server's answer) with the credentials and candidates of the server's sdpfrag. */
function applySdpfrag(/** @type {string} */ sdp, /** @type {string} */ frag) {
  const fl = frag.split(/\r?\n/);
  const get = (/** @type {string} */ p) => (fl.find((l) => l.startsWith(p)) || "");
  const cands = fl.filter((l) => l.startsWith("a=candidate:"));
  const out = [];
  for (const l of sdp.split(/\r?\n/)) {
    if (l.startsWith("a=candidate:") || l === "a=end-of-candidates" || l === "") continue;
    out.push(l.startsWith("a=ice-ufrag:") ? get("a=ice-ufrag:") : l.startsWith("a=ice-pwd:") ? get("a=ice-pwd:") : l);
    if (l.startsWith("a=mid:")) out.push(...cands);
  }
  return out.join("\r\n") + "\r\n";
}

/** `Link: <url>; rel="ice-server"; username=...; credential=...` headers as RTCIceServer entries. */
function linkIceServers(/** @type {string|null} */ header) {
  if (!header) return [];
  return header.split(/,(?=\s*<)/).map((v) => {
    const url = (v.match(/<([^>]*)>/) || [])[1];
    const param = (/** @type {string} */ k) => (v.match(new RegExp(`${k}="([^"]*)"`)) || [])[1];
    return url ? { urls: [url], username: param("username"), credential: param("credential") } : null;
  }).filter(Boolean);
}

/** ICE restart after the path failed (a new network): new credentials over PATCH If-Match "*". */
async function restartIce() {
  if (!pc || !peerUrl || !session || state.reconnecting) return;
  state.reconnecting = true;
  $("error").textContent = "Connection lost: reconnecting…"; note("Connection lost: reconnecting…");
  try {
    await pc.setLocalDescription(await pc.createOffer({ iceRestart: true }));
    await new Promise((resolve) => setTimeout(resolve, 1000)); // a moment to gather on the new network
    const res = await fetch(peerUrl, { method: "PATCH", headers: { "Content-Type": "application/trickle-ice-sdpfrag",
      "If-Match": "*", "Authorization": "Bearer " + session.token }, body: offerSdpfrag(pc.localDescription.sdp) });
    if (res.status !== 200) throw new Error(await problem(res));
    // Fresh TURN credentials for the next restart (coturn checks them at every allocation).
    const servers = linkIceServers(res.headers.get("Link"));
    if (servers.length) pc.setConfiguration({ ...pc.getConfiguration(), iceServers: servers });
    await pc.setRemoteDescription({ type: "answer", sdp: applySdpfrag(pc.remoteDescription.sdp, await res.text()) });
    // A restart that never left "connected" (the old path still worked) gets no state change.
    if (pc.connectionState === "connected") { state.reconnecting = false; $("error").textContent = ""; note("Reconnected."); }
  } catch (e) {
    state.reconnecting = false; showError(`Reconnecting failed: ${e.message}`);
  }
}

async function disconnect(clearError = true) {
  clearTimeout(iceFallbackTimer);
  if (ws) { const w = ws; ws = null; w.close(1000); }
  flushWsPlayout(); wsVoice = null;
  if (session) {
    fetch(peerUrl || `/v1/sessions/${session.session_id}`, { method: "DELETE",
      headers: { "Authorization": "Bearer " + session.token } }).catch(() => {});
  }
  if (pc) pc.close();
  if (mic) mic.getTracks().forEach((t) => t.stop());
  if (audioCtx) audioCtx.close();
  pc = dc = session = peerUrl = mic = audioCtx = null; setState("idle"); state.connected = state.reconnecting = false;
  if (clearError) $("error").textContent = "";
  $("connect").disabled = false;
  for (const id of ["disconnect", "interrupt", "text", "send"]) $(id).disabled = true;
}

async function loadCharacters() {
  try {
    const res = await fetch("/v1/characters");
    const list = await res.json();
    for (const c of list) {
      const o = document.createElement("option"); o.value = c.id; o.textContent = `${c.name} (${c.language})`;
      $("character").appendChild(o);
    }
    const pick = () => { const c = list.find((x) => x.id === $("character").value); state.expressions = (c && c.expressions) || {}; };
    $("character").onchange = pick; pick();
  } catch (e) { showError("Server unreachable: is kotodama running?"); }
}

$("connect").onclick = connect;
$("disconnect").onclick = () => disconnect();
$("interrupt").onclick = () => send({ type: "interrupt" });
$("say").onsubmit = (/** @type {Event} */ e) => {
  e.preventDefault();
  const text = $("text").value.trim();
  if (text) { send({ type: "text", text }); $("text").value = ""; }
};
drawFace();
loadCharacters();
