//! Browser tests' plumbing: a puppeteer-core runner of tests/browser drives Debian's Chromium
//! (the microphone is a WAV file) against a server and prints what its page saw as JSON.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

/// Run `node tests/browser/<runner> <base> <mic.wav> <screenshot.png> <args...>` with `mic`
/// (48 kHz mono) written to `target/browser/mic-<name>.wav` and the screenshot going to
/// `target/browser/<shot>`; returns the runner's JSON. Panics (naming the fix) when Chromium or
/// the npm packages are missing, or when the runner's output is not JSON.
pub async fn run_runner(runner: &str, base: &str, mic: &[i16], name: &str, shot: &str, args: &[&str]) -> Value {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    assert!(
        root.join("tests/browser/node_modules/puppeteer-core").exists(),
        "tests/browser/node_modules is missing: run ./test.sh (or `npm ci --prefix tests/browser`)"
    );
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&chromium).exists(),
        "{chromium} is missing: run ./test.sh (apt-get install chromium)"
    );
    let out_dir = root.join("target/browser");
    std::fs::create_dir_all(&out_dir).unwrap();
    let mic_path = out_dir.join(format!("mic-{name}.wav"));
    std::fs::write(&mic_path, media::wav::to_bytes(media::PcmRef::new(48_000, mic))).unwrap();
    let shot = out_dir.join(shot);
    let script = root.join("tests/browser").join(runner);
    let base = base.to_owned();
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(script)
            .arg(&base)
            .arg(&mic_path)
            .arg(&shot)
            .args(&args)
            .env("CHROMIUM", chromium)
            .output()
            .expect("node runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!("runner output is JSON ({e}): {stdout}\n{}", String::from_utf8_lossy(&output.stderr))
    })
}
