//! Running a tests/browser Node script that drives Debian's Chromium (puppeteer-core) and prints
//! what the page saw as one JSON object on stdout.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// The repository's `tests/browser` folder, once its npm packages and Chromium are there.
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

/// Run `node tests/browser/<script> <args...>` off the async runtime; its stdout as JSON.
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
