// Drive Debian's Chromium (fake microphone from a WAV file) against a running kotodama server and
// print what the page saw as JSON on stdout. Used by tests/browser.rs.
//   node run.mjs <base-url> <speech.wav> <screenshot.png> <timeout-ms> [restart]
// With `restart`: after the first reply the page restarts ICE (as after a network change) and the
// run ends after the second reply. With `fallback`: Chromium may not use UDP for WebRTC (as on a
// network that blocks it, with no proxy or TURN), so ICE cannot connect and the page must fall back
// to the WebSocket transport.
// With `dtx`: after the first reply, 1.8 s of silence, then a typed turn; the second reply is cut
// with `interrupt` once it has played for a second. The receiver's inbound-rtp audio stats are
// read 300 ms into the pause, before the typed turn and at the end (`rtp.pause`, `rtp.before`,
// `rtp.after`).
import { launchChromium } from "./chromium.mjs";

const [url, wav, shot, timeoutArg, mode] = process.argv.slice(2);
const timeout = Number(timeoutArg || 40000);
const browser = await launchChromium(wav,
  mode === "fallback" ? ["--webrtc-ip-handling-policy=disable_non_proxied_udp"] : []);
const out = { ok: false, error: "", console: [] };
try {
  const page = await browser.newPage();
  page.on("console", (m) => out.console.push(m.text()));
  page.on("pageerror", (e) => out.console.push("pageerror: " + e.message));
  // Keep the page's peer connections reachable for getStats (the page does not expose them).
  await page.evaluateOnNewDocument(() => {
    const Native = window.RTCPeerConnection;
    window.__pcs = [];
    window.RTCPeerConnection = function (...args) {
      const pc = new Native(...args);
      window.__pcs.push(pc);
      return pc;
    };
    window.RTCPeerConnection.prototype = Native.prototype;
  });
  await page.goto(url, { waitUntil: "load" });
  await page.waitForSelector("#character option", { timeout: 10000 });
  await page.click("#connect");
  // Done when `n` agent replies have been played in full (their final transcripts arrived and the
  // agent is listening again).
  const repliesPlayed = (n) => page.waitForFunction((n) => {
    const k = window.kotodama;
    const finals = k.events.filter((e) => e.event.type === "transcript" && e.event.role === "agent" && e.event.final);
    const last = k.events.filter((e) => e.event.type === "state").pop();
    return finals.length >= n && last && last.event.state === "listening";
  }, { timeout, polling: 100 }, n);
  await repliesPlayed(1);
  if (mode === "restart") {
    await page.evaluate(() => window.kotodamaRestartIce());
    await page.waitForFunction(() => document.getElementById("log").innerText.includes("Reconnected."),
      { timeout: 15000, polling: 100 });
    await repliesPlayed(2);
  }
  if (mode === "dtx") {
    const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
    const audioIn = () => page.evaluate(async () => {
      const pc = window.__pcs[window.__pcs.length - 1];
      let found = null;
      (await pc.getStats()).forEach((s) => {
        if (s.type === "inbound-rtp" && s.kind === "audio") {
          found = {
            packetsReceived: s.packetsReceived, packetsLost: s.packetsLost,
            concealmentEvents: s.concealmentEvents, concealedSamples: s.concealedSamples,
            silentConcealedSamples: s.silentConcealedSamples, totalSamplesReceived: s.totalSamplesReceived,
            jitterBufferDelay: s.jitterBufferDelay, jitterBufferEmittedCount: s.jitterBufferEmittedCount,
            t: performance.now(),
          };
        }
      });
      return found;
    });
    await sleep(300);
    const pause = await audioIn();
    await sleep(1500);
    const before = await audioIn();
    await page.type("#text", "Tell me more, please.");
    await page.$eval("#say", (f) => f.requestSubmit());
    await page.waitForFunction(() => {
      const k = window.kotodama;
      return k.events.filter((e) => e.event.type === "state" && e.event.state === "speaking").length > 1;
    }, { timeout, polling: 20 });
    await sleep(1000);
    await page.click("#interrupt");
    await page.waitForFunction(() => window.kotodama.events.some((e) => e.event.type === "agent.interrupted"),
      { timeout: 10000, polling: 50 });
    await sleep(1500);
    out.rtp = { pause, before, after: await audioIn() };
  }
  await new Promise((r) => setTimeout(r, 300));
  Object.assign(out, await page.evaluate(() => ({
    events: window.kotodama.events, levels: window.kotodama.levels, latencies: window.kotodama.latencies,
    visemeChanges: window.kotodama.visemeChanges, visemeRenders: window.kotodama.visemeRenders,
    renderDelay: window.kotodama.renderDelay, emotion: window.kotodama.emotion,
    transport: window.kotodama.transport,
    pageError: window.kotodama.error,
    log: document.getElementById("log").innerText, state: document.getElementById("state").textContent,
    mouth: document.getElementById("mouth").getAttribute("d"),
  })));
  await page.screenshot({ path: shot });
  out.ok = true;
} catch (e) {
  out.error = String((e && e.stack) || e);
  try {
    const pages = await browser.pages();
    if (pages.length) {
      const p = pages[pages.length - 1];
      out.log = await p.evaluate(() => document.body.innerText).catch(() => "");
      await p.screenshot({ path: shot }).catch(() => {});
    }
  } catch (_) { /* best effort */ }
} finally {
  await browser.close();
}
process.stdout.write(JSON.stringify(out));
