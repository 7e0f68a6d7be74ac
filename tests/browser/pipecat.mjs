// Drive the unchanged Pipecat client (client-js + small-webrtc-transport, bundled from
// node_modules with esbuild) in Debian's Chromium against a running kotodama; print what the page
// saw as JSON on stdout. Used by tests/pipecat_browser.rs.
//   node pipecat.mjs <base-url> <speech.wav> <screenshot.png> <timeout-ms>
// The page is served on kotodama's own origin through request interception (nothing is fetched
// from outside loopback). Steps: connect() to <base>/api/offer (resolves on bot-ready), the fake
// microphone's question gets a spoken reply, a client request gets its server-response, then
// sendText() gets a second spoken reply.
import path from "node:path";
import { fileURLToPath } from "node:url";
import { build } from "esbuild";
import { launchChromium } from "./chromium.mjs";

const [base, wav, shot, timeoutArg] = process.argv.slice(2);
const timeout = Number(timeoutArg || 40000);
const here = path.dirname(fileURLToPath(import.meta.url));
const bundle = await build({
  entryPoints: [path.join(here, "pipecat-page.mjs")],
  bundle: true, write: false, format: "iife", platform: "browser", target: "chrome120", logLevel: "silent",
});
const pageUrl = `${base}/__pipecat_test__/index.html`;
const jsUrl = `${base}/__pipecat_test__/page.js`;
const html = `<!doctype html><html><head><meta charset="utf-8"><title>pipecat</title></head>
<body><p id="log">pipecat test page</p><script src="${jsUrl}"></script></body></html>`;

const browser = await launchChromium(wav);
const out = { ok: false, error: "", console: [], external: [] };
const count = (type) => `window.pipecatTest.events.filter((e) => e.type === "${type}").length`;
try {
  const page = await browser.newPage();
  page.on("console", (m) => out.console.push(m.text()));
  page.on("pageerror", (e) => out.console.push("pageerror: " + e.message));
  await page.setRequestInterception(true);
  page.on("request", (req) => {
    const url = req.url();
    if (url === pageUrl) return req.respond({ status: 200, contentType: "text/html", body: html });
    if (url === jsUrl) return req.respond({ status: 200, contentType: "text/javascript", body: bundle.outputFiles[0].text });
    if (!url.startsWith(base) && !url.startsWith("data:") && !url.startsWith("blob:")) {
      out.external.push(url);
      return req.abort();
    }
    return req.continue();
  });
  await page.goto(pageUrl, { waitUntil: "load" });
  await page.evaluate((endpoint) => window.pipecatConnect(endpoint), `${base}/api/offer`);
  const connectError = await page.evaluate(() => window.pipecatTest.error);
  if (connectError) throw new Error(connectError);
  // The spoken question is answered: a bot-output, then the bot stops speaking.
  await page.waitForFunction(`${count("bot-output")} >= 1 && ${count("bot-stopped-speaking")} >= 1`,
    { timeout, polling: 100 });
  await page.evaluate(() => window.pipecatRequest("kotodama-test", { hello: 1 }));
  const firstOutputs = await page.evaluate(count("bot-output"));
  const stops = await page.evaluate(count("bot-stopped-speaking"));
  await page.evaluate(() => window.pipecatSendText("Please tell me about the weather."));
  await page.waitForFunction(
    `${count("bot-output")} > ${firstOutputs} && ${count("bot-stopped-speaking")} > ${stops}`,
    { timeout, polling: 100 });
  await new Promise((r) => setTimeout(r, 300));
  Object.assign(out, await page.evaluate(() => window.pipecatTest));
  await page.screenshot({ path: shot });
  await page.evaluate(() => window.pipecatDisconnect());
  out.ok = true;
} catch (e) {
  const failure = String((e && e.stack) || e);
  try {
    const pages = await browser.pages();
    const p = pages[pages.length - 1];
    Object.assign(out, await p.evaluate(() => window.pipecatTest || {}).catch(() => ({})));
  } catch (_) { /* best effort */ }
  out.error = failure + (out.error ? ` (page: ${out.error})` : "");
} finally {
  await browser.close();
}
process.stdout.write(JSON.stringify(out));
