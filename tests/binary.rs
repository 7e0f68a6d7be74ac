//! The `kotodama` binary as operators run it: `serve`, a clean exit on SIGTERM, and a one-line
//! reason with a non-zero exit on a bad configuration.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kotodama"));
    c.env_remove("OPENAI_API_KEY").env_remove("KOTODAMA_PROVIDER").env_remove("KOTODAMA_API_KEYS");
    c
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn help_lists_the_command_and_environment() {
    let out = bin().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for needle in
        ["kotodama serve", "--config", "KOTODAMA_BIND", "KOTODAMA_PUBLIC_IP", "KOTODAMA_API_KEYS", "OPENAI_API_KEY"]
    {
        assert!(text.contains(needle), "--help mentions {needle}");
    }
}

#[test]
fn bad_configuration_exits_non_zero_naming_the_key() {
    let out = bin().arg("serve").env("KOTODAMA_BIND", "0.0.0.0:0").output().unwrap();
    assert!(!out.status.success(), "a public bind without API keys must refuse to start");
    let err = String::from_utf8(out.stderr).unwrap();
    let last = err.lines().last().unwrap_or_default();
    assert!(last.contains("KOTODAMA_API_KEYS"), "the reason names the key: {err}");

    let out = bin().arg("serve").env("KOTODAMA_BIND", "not-an-address").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8(out.stderr).unwrap().contains("KOTODAMA_BIND"));

    let dir = std::env::temp_dir().join(format!("kotodama-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("bad.toml");
    std::fs::write(&cfg, "[media]\nvad_mode = 9\n").unwrap();
    let out = bin().args(["serve", "--config"]).arg(&cfg).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8(out.stderr).unwrap().contains("media.vad_mode"));

    // One shared port and a per-session range exclude each other: both keys are named.
    let out =
        bin().arg("serve").env("KOTODAMA_UDP_PORT", "3479").env("KOTODAMA_UDP_PORTS", "40000-40999").output().unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("KOTODAMA_UDP_PORT)") && err.contains("KOTODAMA_UDP_PORTS"), "{err}");
    // A TURN URL without the shared secret.
    let out = bin().arg("serve").env("KOTODAMA_TURN_URLS", "turn:turn.example.com:3478").output().unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8(out.stderr).unwrap().contains("KOTODAMA_TURN_SECRET"));
}

#[test]
fn serve_answers_then_exits_zero_on_sigterm() {
    let port = free_port();
    let child = bin()
        .arg("serve")
        .env("KOTODAMA_BIND", format!("127.0.0.1:{port}"))
        .env("KOTODAMA_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let ok = loop {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            use std::io::{Read, Write};
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
            let mut resp = String::new();
            let _ = s.read_to_string(&mut resp);
            break resp.starts_with("HTTP/1.1 200");
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let status = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(ok, "GET /healthz answered 200; log: {log}");
    assert_eq!(out.status.code(), Some(0), "clean exit on SIGTERM; log: {log}");
    assert!(log.contains(&format!("127.0.0.1:{port}")), "the start-up log shows the URL: {log}");
    assert!(log.contains("stopped cleanly"), "{log}");
}

#[test]
fn unreachable_database_or_redis_stops_the_start_naming_the_key() {
    let dir = std::env::temp_dir().join(format!("kotodama-unreachable-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (key, value, extra) in [
        ("KOTODAMA_DATABASE_URL", "postgres://nobody:hunter2@127.0.0.1:1/none", None),
        (
            "KOTODAMA_REDIS_URL",
            "redis://:hunter2@127.0.0.1:1",
            Some(("KOTODAMA_TOKEN_SECRET", "0123456789abcdef0123456789abcdef")),
        ),
    ] {
        let mut cmd = bin();
        cmd.arg("serve").current_dir(&dir).env("KOTODAMA_BIND", format!("127.0.0.1:{}", free_port())).env(key, value);
        if let Some((k, v)) = extra {
            cmd.env(k, v);
        }
        let started = Instant::now();
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        while child.try_wait().unwrap().is_none() {
            if started.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                panic!("kotodama kept running with {key} unreachable");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output().unwrap();
        assert!(!out.status.success(), "{key} unreachable must stop the start");
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().last().unwrap_or_default();
        assert!(last.contains(key), "the reason names {key}: {err}");
        assert!(!err.contains("hunter2"), "the password is not shown: {err}");
        eprintln!("{key}: refused after {:?}", started.elapsed());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// One HTTP/1.1 request to the server on `port`; returns the status and the body.
fn http(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    let status = resp.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

fn model_maps(pid: u32) -> Vec<String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    maps.lines().filter(|l| l.contains("/pocketsphinx/model/")).map(str::to_owned).collect()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Models load on first use: a server whose sessions use the OpenAI provider never maps the
/// PocketSphinx model (its acoustic model files are mmapped by PocketSphinx when a decoder
/// loads); the first session of the `local` provider loads it.
#[test]
#[cfg(feature = "local")]
fn pocketsphinx_loads_only_when_a_local_session_starts() {
    let port = free_port();
    let mut child = bin()
        .arg("serve")
        .env("KOTODAMA_BIND", format!("127.0.0.1:{port}"))
        .env("OPENAI_API_KEY", "sk-test-not-used")
        .env("KOTODAMA_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_ok(port).is_none() {
        assert!(Instant::now() < deadline, "the server answers /healthz");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let idle_maps = model_maps(pid);
    let idle_rss = rss_kib(pid);
    let (status, created) =
        http(port, "POST", "/v1/sessions", &[("Content-Type", "application/json")], r#"{"provider":"local"}"#);
    assert_eq!(status, 201, "{created}");
    let v: serde_json::Value = serde_json::from_str(&created).unwrap();
    let (token, offer_url) = (v["token"].as_str().unwrap(), v["offer_url"].as_str().unwrap());
    let offer = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/offers/chrome.sdp")).unwrap();
    let auth = format!("Bearer {token}");
    let (status, answer) =
        http(port, "POST", offer_url, &[("Content-Type", "application/sdp"), ("Authorization", &auth)], &offer);
    assert_eq!(status, 201, "{answer}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let loaded = loop {
        let maps = model_maps(pid);
        if !maps.is_empty() || Instant::now() > deadline {
            break maps;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // The model files are mapped early in a decoder's load: wait for its memory to settle (no
    // growth for 1 s) to measure the whole decoder.
    let mut loaded_rss = rss_kib(pid);
    let mut still = 0;
    while still < 5 && Instant::now() < deadline + Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(200));
        let now = rss_kib(pid);
        still = if now == loaded_rss { still + 1 } else { 0 };
        loaded_rss = now;
    }
    let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
    let _ = child.wait();
    eprintln!(
        "measured: idle server RSS with the OpenAI provider {idle_rss} KiB; after the first local session \
         loaded PocketSphinx {loaded_rss} KiB (+{} KiB)",
        loaded_rss.saturating_sub(idle_rss)
    );
    assert!(idle_maps.is_empty(), "an idle server maps no PocketSphinx model file: {idle_maps:?}");
    assert!(!loaded.is_empty(), "the first local session loads (maps) the PocketSphinx model");
}

fn http_ok(port: u16) -> Option<()> {
    std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    (http(port, "GET", "/healthz", &[], "").0 == 200).then_some(())
}
