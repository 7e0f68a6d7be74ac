// Drive Debian's Chromium (fake microphone from a WAV file) against a running kotodama server and
// print what the page saw as JSON on stdout. Used by tests/browser.rs.
//   node run.mjs <base-url> <speech.wav> <screenshot.png> <timeout-ms> [restart]
// With `restart`: after the first reply the page restarts ICE (as after a network change) and the
// run ends after the second reply.
import { launch } from "./chromium.mjs";

const [url, wav, shot, timeoutArg, mode] = process.argv.slice(2);
const timeout = Number(timeoutArg || 40000);
const browser = await launch(wav);
const out = { ok: false, error: "", console: [] };
try {
  const page = await browser.newPage();
  page.on("console", (m) => out.console.push(m.text()));
  page.on("pageerror", (e) => out.console.push("pageerror: " + e.message));
  await page.goto(url, { waitUntil: "load" });
  await page.waitForSelector("#character option", { timeout: 10000 });
  await page.click("#connect");
  // Done when an agent reply has been played in full (its final transcript arrived and the agent
  // is listening again).
  await page.waitForFunction(() => {
    const k = window.kotodama;
    const finals = k.events.filter((e) => e.event.type === "transcript" && e.event.role === "agent" && e.event.final);
    const last = k.events.filter((e) => e.event.type === "state").pop();
    return finals.length > 0 && last && last.event.state === "listening";
  }, { timeout, polling: 100 });
  if (mode === "restart") {
    await page.evaluate(() => window.kotodamaRestartIce());
    await page.waitForFunction(() => document.getElementById("log").innerText.includes("Reconnected."),
      { timeout: 15000, polling: 100 });
    await page.waitForFunction(() => {
      const k = window.kotodama;
      const finals = k.events.filter((e) => e.event.type === "transcript" && e.event.role === "agent" && e.event.final);
      const last = k.events.filter((e) => e.event.type === "state").pop();
      return finals.length > 1 && last && last.event.state === "listening";
    }, { timeout, polling: 100 });
  }
  await new Promise((r) => setTimeout(r, 300));
  Object.assign(out, await page.evaluate(() => ({
    events: window.kotodama.events, levels: window.kotodama.levels, latencies: window.kotodama.latencies,
    visemeChanges: window.kotodama.visemeChanges, visemeRenders: window.kotodama.visemeRenders,
    renderDelay: window.kotodama.renderDelay, emotion: window.kotodama.emotion,
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
