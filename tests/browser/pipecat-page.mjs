// The test page for the unchanged Pipecat client (@pipecat-ai/client-js + small-webrtc-transport)
// against kotodama, bundled by pipecat.mjs with esbuild. The transport's default media manager
// (Daily's) loads code from the internet; this page passes a small getUserMedia one instead (the
// fake microphone of Chromium is the test's WAV file). What the page saw goes to window.pipecatTest.
import { PipecatClient } from "@pipecat-ai/client-js";
import { SmallWebRTCTransport } from "@pipecat-ai/small-webrtc-transport";

const t0 = performance.now();
const now = () => performance.now() - t0;
const state = { events: [], levels: [], error: "", connected: null, response: undefined };
window.pipecatTest = state;
const record = (type, data) => state.events.push({ t: now(), type, data: data ?? null });

/** The microphone from getUserMedia, no camera, no screen share: what the transport asks of a
 * media manager (`mediaManager.*` in smallWebRTCTransport.ts). */
class MicMediaManager {
  constructor() {
    this._stream = null;
    this._micEnabled = true;
    this._options = null;
  }
  setUserAudioCallback() {}
  setClientOptions(options) { this._options = options; this._micEnabled = options.enableMic ?? true; }
  async initialize() {}
  async connect() {
    if (!this._stream) this._stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  }
  async disconnect() {
    this._stream?.getTracks().forEach((t) => t.stop());
    this._stream = null;
  }
  async userStartedSpeaking() {}
  bufferBotAudio() { return undefined; }
  async getAllMics() { return (await navigator.mediaDevices.enumerateDevices()).filter((d) => d.kind === "audioinput"); }
  async getAllCams() { return []; }
  async getAllSpeakers() { return []; }
  updateMic() {}
  updateCam() {}
  updateSpeaker() {}
  get selectedMic() { return {}; }
  get selectedCam() { return {}; }
  get selectedSpeaker() { return {}; }
  enableMic(enable) { this._micEnabled = enable; this._stream?.getAudioTracks().forEach((t) => (t.enabled = enable)); }
  enableCam() {}
  enableScreenShare() {}
  get isCamEnabled() { return false; }
  get isMicEnabled() { return this._micEnabled; }
  get isSharingScreen() { return false; }
  get supportsScreenShare() { return false; }
  tracks() { return { local: { audio: this._stream?.getAudioTracks()[0] } }; }
}

/** Level (RMS) of the bot's audio every 20 ms, as heard through WebAudio. */
function listen(track) {
  const stream = new MediaStream([track]);
  // Chromium only pulls a remote WebRTC track into WebAudio when a media element plays it.
  const element = new Audio();
  element.srcObject = stream;
  element.muted = true;
  element.play().catch(() => {});
  const ctx = new AudioContext();
  const analyser = ctx.createAnalyser();
  analyser.fftSize = 1024;
  ctx.createMediaStreamSource(stream).connect(analyser);
  const buf = new Float32Array(analyser.fftSize);
  setInterval(() => {
    analyser.getFloatTimeDomainData(buf);
    let sum = 0;
    for (const v of buf) sum += v * v;
    state.levels.push({ t: now(), rms: Math.sqrt(sum / buf.length) });
  }, 20);
}

let listening = false;
const client = new PipecatClient({
  transport: new SmallWebRTCTransport({ mediaManager: new MicMediaManager() }),
  enableMic: true,
  enableCam: false,
  callbacks: {
    onBotReady: (d) => record("bot-ready", d),
    onUserStartedSpeaking: () => record("user-started-speaking"),
    onUserStoppedSpeaking: () => record("user-stopped-speaking"),
    onBotStartedSpeaking: () => record("bot-started-speaking"),
    onBotStoppedSpeaking: () => record("bot-stopped-speaking"),
    onUserTranscript: (d) => record("user-transcription", d),
    onBotOutput: (d) => record("bot-output", d),
    onBotTtsText: (d) => record("bot-tts-text", d),
    onBotLlmStarted: () => record("bot-llm-started"),
    onMetrics: (d) => record("metrics", d),
    onServerMessage: (d) => record("server-message", d),
    onError: (m) => record("error", m.data),
    onDisconnected: () => record("disconnected"),
    onTrackStarted: (track) => {
      record("track-started", { kind: track.kind });
      if (track.kind === "audio" && !listening) {
        listening = true;
        listen(track);
      }
    },
  },
});

/** connect() resolves on bot-ready (it waits forever without it). */
window.pipecatConnect = async (endpoint, headers) => {
  try {
    const ready = await client.connect({ webrtcRequestParams: { endpoint, headers: new Headers(headers || {}) } });
    state.connected = ready;
  } catch (e) {
    state.error = "connect: " + String((e && e.message) || e);
  }
};
window.pipecatSendText = (text) => {
  record("text-sent", { text });
  return client.sendText(text);
};
window.pipecatRequest = async (t, d) => {
  try {
    state.response = { d: await client.sendClientRequest(t, d, 5000) };
  } catch (e) {
    state.response = { error: JSON.stringify(e) };
  }
};
window.pipecatDisconnect = () => client.disconnect();
