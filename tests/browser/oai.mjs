// Drive Debian's Chromium (fake microphone from a WAV file) through oai.html: the unchanged OpenAI
// Agents SDK connects to kotodama, the user's spoken question is answered, then a typed message's
// reply is interrupted. Prints what the page saw as JSON on stdout. Used by tests/oai_agents_sdk.rs.
// Mode `tool`: the spoken question makes the model call the page's get_weather tool; the run ends
// once the reply after the tool's output was heard (no second turn).
//   node oai.mjs <page-url> <kotodama-base> <ek_...> <speech.wav> <timeout-ms> [talk|tool]
import { launchChromium } from "./chromium.mjs";

const [pageUrl, base, ek, wav, timeoutArg, mode] = process.argv.slice(2);
const timeout = Number(timeoutArg || 45000);
const browser = await launchChromium(wav);
const out = { ok: false, error: "", console: [], requests: [] };
const read = (page) => page.evaluate(() => window.oai);
try {
  const page = await browser.newPage();
  page.on("console", (m) => out.console.push(m.text()));
  page.on("pageerror", (e) => out.console.push("pageerror: " + e.message));
  // Every request the page makes: nothing may leave the two local origins.
  page.on("request", (r) => out.requests.push(r.url()));
  await page.goto(pageUrl, { waitUntil: "load" });
  out.callId = await page.evaluate((b, k) => window.oaiConnect(b, k), base, ek);

  // 1. The spoken question and the agent's answer, as the SDK's history shows them.
  await page.waitForFunction(() => {
    const h = window.oai.history;
    const user = h.find((i) => i.role === "user" && i.content.some((c) => c.transcript));
    const agent = h.find((i) => i.role === "assistant" && i.status === "completed" &&
      i.content.some((c) => c.transcript));
    const stopped = window.oai.events.some((e) => e.ev.type === "output_audio_buffer.stopped");
    return user && agent && stopped;
  }, { timeout, polling: 100 });
  out.first = await read(page);
  if (mode === "tool") {
    // The reply after the tool ran: its audio stopped after the tool call.
    await page.waitForFunction(() => {
      const o = window.oai;
      const call = o.toolCalls[0];
      return call && o.events.some((e) => e.ev.type === "output_audio_buffer.stopped" && e.t > call.t) &&
        o.history.some((i) => i.type === "function_call" && i.status === "completed" && i.output);
    }, { timeout, polling: 100 });
    await new Promise((r) => setTimeout(r, 500));
    out.first = await read(page);
  } else {
    // 2. A typed message; its reply is interrupted 1.5 s after its audio started.
    const before = out.first.events.length;
    await page.evaluate(() => window.session.sendMessage("Tell me about the weather."));
    await page.waitForFunction((n) => window.oai.events.slice(n).some((e) => e.ev.type === "output_audio_buffer.started"),
      { timeout, polling: 20 }, before);
    await new Promise((r) => setTimeout(r, 1500));
    out.interruptAt = await page.evaluate(() => { window.session.interrupt(); return performance.now() - window.oai.t0; });
    await page.waitForFunction((n) => {
      const truncated = window.oai.events.slice(n).find((e) => e.ev.type === "conversation.item.truncated");
      if (!truncated) return false;
      const item = window.oai.history.find((i) => i.itemId === truncated.ev.item_id);
      return item && item.status === "incomplete";
    }, { timeout: 15000, polling: 50 }, before);
    await new Promise((r) => setTimeout(r, 1500));
    out.second = await read(page);
  }
  out.ok = true;
} catch (e) {
  out.error = String((e && e.stack) || e);
  try {
    const pages = await browser.pages();
    if (pages.length) out.partial = await read(pages[pages.length - 1]).catch(() => null);
  } catch (_) { /* best effort */ }
} finally {
  await browser.close();
}
process.stdout.write(JSON.stringify(out));
