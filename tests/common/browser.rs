//! Browser tests' plumbing: a puppeteer-core script of tests/browser drives Debian's Chromium
//! (the microphone is a WAV file) against a server and prints what its page saw as one JSON
//! object on stdout.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// The repository's `tests/browser` folder, once its npm packages and Chromium are there (panics
/// naming the fix otherwise).
pub fn browser_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    assert!(
        dir.join("node_modules/puppeteer-core").exists(),
        "tests/browser/node_modules is missing: run ./test.sh (or `npm ci --prefix tests/browser`)"
    );
    assert!(Path::new(&chromium()).exists(), "{} is missing: run ./test.sh (apt-get install chromium)", chromium());
    dir
}

fn chromium() -> String {
    std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into())
}

/// `target/browser/`, where mic files and screenshots go.
pub fn out_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/browser");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Run `node tests/browser/<script> <args...>` off the async runtime; its stdout as JSON (panics
/// when it is not JSON, with the script's stderr).
pub async fn run_node(script: &str, args: Vec<String>) -> Value {
    let path = browser_dir().join(script);
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node").arg(path).args(args).env("CHROMIUM", chromium()).output().expect("node runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!("runner output is JSON ({e}): {stdout}\n{}", String::from_utf8_lossy(&output.stderr))
    })
}

/// Run `node tests/browser/<runner> <base> <mic.wav> <screenshot.png> <args...>` with `mic`
/// (48 kHz mono) written to `target/browser/mic-<name>.wav` and the screenshot going to
/// `target/browser/<shot>`; returns the runner's JSON.
pub async fn run_runner(runner: &str, base: &str, mic: &[i16], name: &str, shot: &str, args: &[&str]) -> Value {
    let out = out_dir();
    let mic_path = out.join(format!("mic-{name}.wav"));
    std::fs::write(&mic_path, media::wav::to_bytes(media::PcmRef::new(48_000, mic))).unwrap();
    let mut all = vec![base.to_owned(), mic_path.display().to_string(), out.join(shot).display().to_string()];
    all.extend(args.iter().map(|a| (*a).to_owned()));
    run_node(runner, all).await
}
