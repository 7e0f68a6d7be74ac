// WHIP + WHEP in Debian's Chromium against a running kotodama server; prints what the player saw
// as JSON on stdout. Used by tests/whip_browser.rs.
//   node whip.mjs <base-url> <speech.wav> <character> <timeout-ms>
// The publisher page runs the unchanged @eyevinn/whip-web-client (bundled here with esbuild) on
// the fake microphone (the WAV); the player page pulls the character's voice with a plain
// RTCPeerConnection (receive-only audio + an `events` data channel, WHEP: one POST of a complete
// offer). Both pages are served from another origin (a port of their own), so CORS is exercised
// for real: the OPTIONS probe, the preflights of POST/PATCH/DELETE, the exposed Location/ETag.
import http from "node:http";
import path from "node:path";
import { fileURLToPath } from "node:url";
import * as esbuild from "esbuild";
import { launchChromium } from "./chromium.mjs";

const [base, wav, character, timeoutArg] = process.argv.slice(2);
const timeout = Number(timeoutArg || 45000);
const here = path.dirname(fileURLToPath(import.meta.url));
const out = { ok: false, error: "", console: [] };

// The package as published, bundled for a page (its `events` and `sdp-transform` dependencies too).
const bundle = await esbuild.build({
  stdin: { contents: 'export { WHIPClient } from "@eyevinn/whip-web-client";', resolveDir: here },
  bundle: true, format: "iife", globalName: "Eyevinn", platform: "browser", write: false, logLevel: "silent",
});
const clientJs = bundle.outputFiles[0].text;

const pages = {
  "/whip.js": ["text/javascript", clientJs],
  "/": ["text/html", "<!doctype html><meta charset=utf-8><title>whip test</title><script src=/whip.js></script>"],
};
const server = http.createServer((req, res) => {
  const [type, body] = pages[req.url] || ["text/plain", "not found"];
  res.writeHead(pages[req.url] ? 200 : 404, { "content-type": type });
  res.end(body);
});
await new Promise((r) => server.listen(0, "127.0.0.1", r));
const origin = `http://127.0.0.1:${server.address().port}`;

const browser = await launchChromium(wav);
try {
  const publisher = await browser.newPage();
  const player = await browser.newPage();
  for (const [name, p] of [["publisher", publisher], ["player", player]]) {
    p.on("console", (m) => out.console.push(`${name}: ${m.text()}`));
    p.on("pageerror", (e) => out.console.push(`${name} pageerror: ${e.message}`));
    await p.goto(origin + "/", { waitUntil: "load" });
  }

  // Publish the microphone with the unchanged client (trickle ICE on: it PATCHes candidates with
  // its `ETag:` header once OPTIONS lists PATCH).
  out.resource = await publisher.evaluate(async (endpoint) => {
    const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    const client = new Eyevinn.WHIPClient({ endpoint, opts: { debug: true, iceServers: [] } });
    window.whip = client;
    await client.ingest(stream);
    return await client.getResourceUrl();
  }, `${base}/v1/characters/${character}/whip`);
  await publisher.waitForFunction(() => window.whip.peer.connectionState === "connected", { timeout: 40000, polling: 100 });

  // The WHEP player: a complete offer (no trickle), the answer, the voice measured by WebAudio.
  out.playerLocation = await player.evaluate(async (resource) => {
    const k = (window.k = { events: [], levels: [], status: 0, location: "" });
    const pc = new RTCPeerConnection();
    pc.addTransceiver("audio", { direction: "recvonly" });
    const dc = pc.createDataChannel("events");
    dc.onmessage = (m) => k.events.push({ t: performance.now(), event: JSON.parse(m.data) });
    pc.ontrack = (e) => {
      const stream = new MediaStream([e.track]);
      const el = new Audio();
      el.srcObject = stream;
      el.muted = true;
      el.play().catch(() => {});
      const ctx = new AudioContext();
      const an = ctx.createAnalyser();
      ctx.createMediaStreamSource(stream).connect(an);
      const buf = new Float32Array(an.fftSize);
      setInterval(() => {
        an.getFloatTimeDomainData(buf);
        let s = 0;
        for (const x of buf) s += x * x;
        k.levels.push({ t: performance.now(), voice: Math.sqrt(s / buf.length) });
      }, 20);
    };
    await pc.setLocalDescription(await pc.createOffer());
    await new Promise((r) => {
      if (pc.iceGatheringState === "complete") return r();
      pc.onicegatheringstatechange = () => pc.iceGatheringState === "complete" && r();
      setTimeout(r, 3000);
    });
    const res = await fetch(resource + "/whep", {
      method: "POST", headers: { "Content-Type": "application/sdp" }, body: pc.localDescription.sdp,
    });
    k.status = res.status;
    k.location = res.headers.get("Location");
    const answer = await res.text();
    if (res.status !== 201) throw new Error(`WHEP ${res.status}: ${answer}`);
    await pc.setRemoteDescription({ type: "answer", sdp: answer });
    window.pc = pc;
    return k.location;
  }, out.resource);

  // Done when the character's reply has been heard in full (final transcript, listening again).
  await player.waitForFunction(() => {
    const evs = window.k.events.map((e) => e.event);
    const finals = evs.filter((e) => e.type === "transcript" && e.role === "agent" && e.final);
    const last = evs.filter((e) => e.type === "state").pop();
    return finals.length > 0 && last && last.state === "listening";
  }, { timeout, polling: 100 });
  await new Promise((r) => setTimeout(r, 300));
  Object.assign(out, await player.evaluate(() => ({ events: window.k.events, levels: window.k.levels })));
  out.publisherState = await publisher.evaluate(() => window.whip.peer.connectionState);
  out.trickled = out.console.some((l) => l.includes("Endpoint says it supports Trickle ICE"));
  // The unchanged client's teardown: DELETE of its resource (the test checks the session ended).
  await publisher.evaluate(() => window.whip.destroy());
  out.ok = true;
} catch (e) {
  out.error = String((e && e.stack) || e);
} finally {
  await browser.close();
  server.close();
}
process.stdout.write(JSON.stringify(out));
