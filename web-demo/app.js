// kotodama minimal web client: API v1 (POST /v1/sessions, POST offer), one audio track and the
// `events` data channel. No build step.
"use strict";
const $ = (id) => document.getElementById(id);
let pc = null, dc = null, session = null, peerUrl = null;
const partials = new Map();

function log(cls, text, key) {
  let el = key && partials.get(key);
  if (!el) { el = document.createElement("div"); $("log").appendChild(el); if (key) partials.set(key, el); }
  el.className = cls; el.textContent = text;
  $("log").scrollTop = $("log").scrollHeight;
}
// Visemes are timed from the start of their item's audio; the demo takes the moment the agent
// starts speaking as that start (good to a jitter buffer, enough to watch the mouth move).
// Visemes that arrive before the audio starts wait for it.
let speakingSince = null;
const mouthTimers = [], pendingVisemes = [];
function clearMouth() {
  while (mouthTimers.length) clearTimeout(mouthTimers.pop());
  $("mouth").textContent = "sil";
}
function scheduleViseme(ev) {
  if (speakingSince === null) { if (pendingVisemes.length < 2000) pendingVisemes.push(ev); return; }
  const wait = speakingSince + ev.start_ms - performance.now();
  mouthTimers.push(setTimeout(() => { $("mouth").textContent = ev.viseme; }, Math.max(0, wait)));
}
function setState(s) {
  if (s === "speaking" && speakingSince === null) {
    speakingSince = performance.now();
    pendingVisemes.splice(0).forEach(scheduleViseme);
  }
  if (s === "listening" || s === "idle") { speakingSince = null; pendingVisemes.length = 0; clearMouth(); }
  $("state").textContent = s; $("state").dataset.state = s;
}
function showError(msg) { $("error").textContent = msg; }

async function loadCharacters() {
  try {
    const res = await fetch("/v1/characters");
    for (const c of await res.json()) {
      const o = document.createElement("option"); o.value = c.id; o.textContent = `${c.name} (${c.language})`;
      $("character").appendChild(o);
    }
  } catch (e) { showError("Server unreachable: " + e.message); }
}

function onEvent(ev) {
  switch (ev.type) {
    case "session.ready": log("meta", `session ${ev.session_id} ready (${ev.character} via ${ev.provider})`); break;
    case "state": setState(ev.state); break;
    case "transcript": {
      const key = ev.role + ":" + ev.item_id;
      log(ev.role + (ev.final ? "" : " partial"), (ev.role === "user" ? "You: " : "Agent: ") + ev.text, key);
      if (ev.final) partials.delete(key);
      break;
    }
    case "emotion": log("meta", `emotion: ${ev.emotion}`); break;
    case "viseme": scheduleViseme(ev); break;
    case "agent.interrupted": log("meta", `interrupted after ${ev.played_ms} ms`); break;
    case "user.speech_started": log("meta", "(you started speaking)"); break;
    case "error": log("error", `error ${ev.code}: ${ev.message}`); break;
  }
}

async function connect() {
  showError(""); $("connect").disabled = true;
  try {
    let mic;
    try { mic = await navigator.mediaDevices.getUserMedia({ audio: { echoCancellation: true, noiseSuppression: true } }); }
    catch (e) { throw new Error("Microphone denied or unavailable: " + e.message); }
    const res = await fetch("/v1/sessions", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ character: $("character").value || undefined }) });
    if (!res.ok) throw new Error(`Session refused: ${res.status} ${(await res.json().catch(() => ({}))).detail || ""}`);
    session = await res.json();
    pc = new RTCPeerConnection({ iceServers: session.ice_servers });
    pc.addTransceiver(mic.getAudioTracks()[0], { direction: "sendrecv" });
    pc.ontrack = (e) => { $("voice").srcObject = e.streams[0] || new MediaStream([e.track]); };
    pc.onconnectionstatechange = () => {
      if (pc && pc.connectionState === "failed") showError("ICE failed: no network path to the server (TURN needed?)");
    };
    dc = pc.createDataChannel("events", { ordered: true });
    dc.onmessage = (m) => { try { onEvent(JSON.parse(m.data)); } catch (_) {} };
    await pc.setLocalDescription(await pc.createOffer());
    await new Promise((resolve) => {
      if (pc.iceGatheringState === "complete") return resolve();
      const t = setTimeout(resolve, 2000);
      pc.onicegatheringstatechange = () => { if (pc.iceGatheringState === "complete") { clearTimeout(t); resolve(); } };
    });
    const ans = await fetch(session.offer_url, { method: "POST",
      headers: { "Content-Type": "application/sdp", "Authorization": "Bearer " + session.token },
      body: pc.localDescription.sdp });
    if (!ans.ok) throw new Error(`Offer refused: ${ans.status} ${(await ans.json().catch(() => ({}))).detail || ""}`);
    peerUrl = ans.headers.get("Location");
    await pc.setRemoteDescription({ type: "answer", sdp: await ans.text() });
    for (const id of ["disconnect", "interrupt", "text", "send"]) $(id).disabled = false;
  } catch (e) {
    showError(e.message); await disconnect();
  }
}

async function disconnect() {
  if (session) {
    fetch(peerUrl || `/v1/sessions/${session.session_id}`, { method: "DELETE",
      headers: { "Authorization": "Bearer " + session.token } }).catch(() => {});
  }
  if (pc) pc.close();
  pc = dc = session = peerUrl = null; setState("idle");
  $("connect").disabled = false;
  for (const id of ["disconnect", "interrupt", "text", "send"]) $(id).disabled = true;
}

$("connect").onclick = connect;
$("disconnect").onclick = disconnect;
$("interrupt").onclick = () => dc && dc.readyState === "open" && dc.send(JSON.stringify({ type: "interrupt" }));
$("say").onsubmit = (e) => {
  e.preventDefault();
  const text = $("text").value.trim();
  if (text && dc && dc.readyState === "open") { dc.send(JSON.stringify({ type: "text", text })); $("text").value = ""; }
};
loadCharacters();
