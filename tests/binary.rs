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
