// Debian's Chromium for the browser tests: headless, no network services of its own, autoplay
// allowed, and the fake microphone playing `wav` (looped) for getUserMedia; `extra` switches appended.
import puppeteer from "puppeteer-core";

export function launchChromium(wav, extra = []) {
  return puppeteer.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: [
      "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
      "--disable-component-update", "--disable-sync", "--autoplay-policy=no-user-gesture-required",
      "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
      `--use-file-for-fake-audio-capture=${wav}`,
      ...extra,
    ],
  });
}
