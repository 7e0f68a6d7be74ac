//! A conversation survives a crash in the record: the real `kotodama` binary is killed with
//! SIGKILL in the middle of a conversation (a real WebRTC client speaking to it), restarted on
//! the same database, and then every final utterance the client saw before the kill is in the
//! stored transcript and the session is ended with `crash`. Run on SQLite (a file in a temp
//! dir) and on Postgres (a fresh database on the machine's server), with the same body.

mod common;

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const SECRET: &str = "crash-test-secret-0123456789abcdef0123456789";

struct Node {
    child: Child,
    base: String,
    log: std::path::PathBuf,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A private copy of the binary, so both runs of one test execute the same build even where a
/// shared target directory is rebuilt concurrently.
fn binary_copy(dir: &std::path::Path) -> std::path::PathBuf {
    let copy = dir.join("kotodama");
    // A hard link keeps this build's inode even if cargo replaces the file; no open write handle
    // exists for a concurrent fork to inherit (which would make exec fail with ETXTBSY).
    if !copy.exists() && std::fs::hard_link(env!("CARGO_BIN_EXE_kotodama"), &copy).is_err() {
        std::fs::copy(env!("CARGO_BIN_EXE_kotodama"), &copy).expect("copy the binary");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // Where several worktrees share one target directory, the file may be another checkout's
    // build: say so instead of failing obscurely.
    let help = Command::new(&copy).arg("--help").output().expect("run --help");
    assert!(
        String::from_utf8_lossy(&help.stdout).contains("KOTODAMA_NODE_ID"),
        "{} is not this checkout's build (a shared CARGO_TARGET_DIR rebuilt by another checkout?); rebuild and rerun",
        env!("CARGO_BIN_EXE_kotodama")
    );
    copy
}

async fn start_node(db_url: &str, port: u16, dir: &std::path::Path, run: u32) -> Node {
    let log = dir.join(format!("node-{run}.log"));
    let mut cmd = Command::new(binary_copy(dir));
    cmd.arg("serve")
        .env_remove("OPENAI_API_KEY")
        .env_remove("KOTODAMA_API_KEYS")
        .env_remove("KOTODAMA_REDIS_URL")
        .env("KOTODAMA_PROVIDER", "scripted")
        .env("KOTODAMA_BIND", format!("127.0.0.1:{port}"))
        .env("KOTODAMA_DATABASE_URL", db_url)
        .env("KOTODAMA_TOKEN_SECRET", SECRET)
        .env("KOTODAMA_LOG", "info,kotodama=debug");
    let (child, base) = spawn_node(cmd, dir, &log, port).await;
    Node { child, base, log }
}

async fn get_json(http: &reqwest::Client, url: &str, token: &str, node: &Node) -> Value {
    let res = http.get(url).bearer_auth(token).send().await.unwrap();
    let status = res.status();
    let body = res.text().await.unwrap();
    assert_eq!(status, 200, "GET {url}: {body}; node log:\n{}", std::fs::read_to_string(&node.log).unwrap_or_default());
    serde_json::from_str(&body).unwrap()
}

/// (role, text) of each transcript entry or event.
fn role_and_text<'a>(items: impl IntoIterator<Item = &'a Value>) -> Vec<(String, String)> {
    items
        .into_iter()
        .map(|t| (t["role"].as_str().unwrap().to_owned(), t["text"].as_str().unwrap().to_owned()))
        .collect()
}

/// The final transcripts `client` was shown, as (role, text).
fn finals_seen(client: &TestClient) -> Vec<(String, String)> {
    let events = client.events();
    role_and_text(events.iter().filter(|e| e["type"] == "transcript" && e["final"] == true))
}

async fn kill_mid_conversation_then_restart(db_url: &str) {
    let dir = temp_dir("crash");
    let port = free_port();
    let http = reqwest::Client::new();
    let mut node = start_node(db_url, port, &dir, 1).await;

    let created = create_session_at(&http, &node.base, None).await;
    let (id, token) = id_and_token(&created);
    let mut client = TestClient::connect_to(&node.base, &http, created["offer_url"].as_str().unwrap(), &token).await;
    client
        .wait_event("listening", Duration::from_secs(10), |e| e["type"] == "state" && e["state"] == "listening")
        .await;

    // Turn 1 by voice, answered in full.
    let (_, question) = wav("user_question.wav");
    client.speak(&question).await;
    client
        .silence_until("the first reply's final transcript", Duration::from_secs(30), |evs| {
            evs.iter().any(|e| e["type"] == "transcript" && e["role"] == "agent" && e["final"] == true)
        })
        .await;
    // Turn 2 typed; the kill comes while the character is answering it.
    client.send_text(r#"{"type":"text","text":"Tell me more about yourself."}"#).await;
    client
        .silence_until("the typed turn's transcript and the second reply", Duration::from_secs(20), |evs| {
            let typed = evs.iter().position(|e| e["type"] == "transcript" && e["role"] == "user" && e["final"] == true);
            typed.is_some_and(|i| evs[i..].iter().any(|e| e["type"] == "state" && e["state"] == "speaking"))
        })
        .await;
    // Half a second into the second reply: the turns before it are long past.
    let mark = client.log().len();
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.log()[mark..].iter().filter(|r| matches!(r, Received::Audio { .. })).count() < 25 {
        assert!(Instant::now() < deadline, "the second reply is not heard");
        client.silence(Duration::from_millis(20)).await;
    }
    let state = get_json(&http, &format!("{}/v1/sessions/{id}", node.base), &token, &node).await;
    assert_eq!(state["state"], "connected", "{state}");

    let seen_finals = finals_seen(&client);
    assert!(seen_finals.iter().any(|(r, _)| r == "agent"), "saw the first reply's final: {seen_finals:?}");
    assert!(
        seen_finals.iter().any(|(r, t)| r == "user" && t == "Tell me more about yourself."),
        "saw the typed turn's final: {seen_finals:?}"
    );

    node.child.kill().expect("SIGKILL");
    let status = node.child.wait().unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9), "killed by SIGKILL");
    client.close().await;

    let mut node = start_node(db_url, port, &dir, 2).await;
    let info = get_json(&http, &format!("{}/v1/sessions/{id}", node.base), &token, &node).await;
    assert_eq!(info["state"], "ended", "the restarted node marked the session ended: {info}");
    assert_eq!(info["end_reason"], "crash", "{info}");
    assert!(info["ended_at"].is_string(), "{info}");

    let transcript = get_json(&http, &format!("{}/v1/sessions/{id}/transcript", node.base), &token, &node).await;
    let stored = role_and_text(transcript.as_array().unwrap());
    // Every final the client saw is stored, in the order it was seen.
    let mut rest = stored.iter();
    for f in &seen_finals {
        assert!(rest.any(|s| s == f), "final {f:?} missing or out of order in the stored transcript {stored:?}");
    }
    let seqs: Vec<u64> = transcript.as_array().unwrap().iter().map(|t| t["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "seq strictly increasing: {seqs:?}");

    // The restarted node shuts down cleanly.
    let _ = Command::new("kill").arg("-TERM").arg(node.child.id().to_string()).status();
    let status = node.child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{}", std::fs::read_to_string(&node.log).unwrap_or_default());
    // Tokens never reach the logs (both runs logged at debug level for kotodama).
    for run in [1, 2] {
        let log = std::fs::read_to_string(dir.join(format!("node-{run}.log"))).unwrap();
        assert!(log.contains(&id), "node {run} logged the session");
        assert!(!log.contains(&token), "node {run}'s log holds the session token");
        assert!(!log.contains(token.split('.').nth(2).unwrap()), "node {run}'s log holds the token's signature");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_conversation_keeps_every_final_turn_sqlite() {
    let dir = temp_dir("crash-db");
    kill_mid_conversation_then_restart(&format!("sqlite://{}/kotodama.db", dir.display())).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_conversation_keeps_every_final_turn_postgres() {
    let db = PgTestDb::create().await;
    kill_mid_conversation_then_restart(&db.url).await;
}

/// Kills per run of [`kill_9_right_after_a_final_keeps_it`]: the issue saw 6 of 25 kills 8-15 ms
/// after a final lose it.
const KILLS: u32 = 8;

/// Crash right after a final: the node is killed (SIGKILL) as soon as the client has received a
/// final transcript (the user's typed turn in even runs, the agent's reply in odd ones), over
/// and over on one database; after each restart every final that client saw is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_right_after_a_final_keeps_it() {
    let dir = temp_dir("crash-final");
    let db_url = format!("sqlite://{}/kotodama.db", dir.display());
    let port = free_port();
    let http = reqwest::Client::new();
    let mut node = start_node(&db_url, port, &dir, 0).await;
    let mut gaps_ms = Vec::new();
    for run in 0..KILLS {
        let created = create_session_at(&http, &node.base, None).await;
        let (id, token) = id_and_token(&created);
        let mut client =
            TestClient::connect_to(&node.base, &http, created["offer_url"].as_str().unwrap(), &token).await;
        client
            .wait_event("listening", Duration::from_secs(10), |e| e["type"] == "state" && e["state"] == "listening")
            .await;
        client.send_text(&format!(r#"{{"type":"text","text":"Final number {run}, keep it."}}"#)).await;
        let role = if run % 2 == 0 { "user" } else { "agent" };
        let is_final = |e: &Value| e["type"] == "transcript" && e["final"] == true && e["role"] == role;
        client.silence_until("the final", Duration::from_secs(20), |evs| evs.iter().any(is_final)).await;
        let seen = Instant::now();
        node.child.kill().expect("SIGKILL");
        gaps_ms.push(seen.elapsed().as_secs_f64() * 1000.0);
        node.child.wait().unwrap();
        let seen_finals = finals_seen(&client);
        client.close().await;

        node = start_node(&db_url, port, &dir, run + 1).await;
        let transcript = get_json(&http, &format!("{}/v1/sessions/{id}/transcript", node.base), &token, &node).await;
        let stored = role_and_text(transcript.as_array().unwrap());
        for f in &seen_finals {
            assert!(stored.contains(f), "run {run}: final {f:?} shown before the kill is not stored: {stored:?}");
        }
        assert!(seen_finals.iter().any(|(r, _)| r == role), "run {run}: saw the {role}'s final");
    }
    eprintln!("kill after the final (ms): {gaps_ms:?}");
    let _ = Command::new("kill").arg("-TERM").arg(node.child.id().to_string()).status();
    let _ = node.child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
