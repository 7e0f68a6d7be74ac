//! Store writes outlive a database outage (issue 12, kind 6): with Postgres stopped for 60 s
//! (twice the writer's old ~28 s deadline) and a store queue of 4 writes, a conversation of 12
//! turns spills to the journal, every final is shown, and the turns and the session's end are
//! written once it is back; `/readyz` reports the store (`store`, `queued`, `journal_bytes`)
//! meanwhile. The test runs its own Postgres (initdb in a temporary directory, as the
//! `postgres` user), never the shared one.

mod common;

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use kotodama::store::Store;
use kotodama::store::sql::SqlStore;

/// A Postgres server of this test's own.
struct OwnPostgres {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
    uid: u32,
    gid: u32,
}

/// A PostgreSQL server binary: Debian keeps them in /usr/lib/postgresql/<version>/bin, off PATH.
fn pg_bin(name: &str) -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin").join(name))))
        .filter(|(_, p): &(u32, PathBuf)| p.exists())
        .collect();
    versions.sort();
    versions.pop().map(|(_, p)| p).unwrap_or_else(|| PathBuf::from(name))
}

/// The user and group Postgres runs as: `postgres` when we are root (it refuses to run as
/// root), else ourselves.
fn id_of(flag: &str) -> u32 {
    // SAFETY: geteuid/getegid have no preconditions and cannot fail.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    if euid != 0 {
        return if flag == "-u" { euid } else { egid };
    }
    let out = Command::new("id").args([flag, "postgres"]).output().expect("id postgres");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("the postgres user exists (.ci/setup.sh installs PostgreSQL)")
}

impl OwnPostgres {
    fn init() -> OwnPostgres {
        let (uid, gid) = (id_of("-u"), id_of("-g"));
        let dir = temp_dir("own-postgres");
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).expect("chown data dir");
        let status = Command::new(pg_bin("initdb"))
            .args(["-D", dir.to_str().unwrap(), "-A", "trust", "-U", "postgres", "--no-sync"])
            .uid(uid)
            .gid(gid)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("initdb");
        assert!(status.success(), "initdb failed");
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        OwnPostgres { dir, port, child: None, uid, gid }
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    async fn start(&mut self) {
        let child = Command::new(pg_bin("postgres"))
            .args(["-D", self.dir.to_str().unwrap(), "-p", &self.port.to_string(), "-k", self.dir.to_str().unwrap()])
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .uid(self.uid)
            .gid(self.gid)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("postgres");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.is_err() {
            assert!(Instant::now() < deadline, "own Postgres did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    /// Fast shutdown (SIGINT), waited for.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            let _ = child.wait();
        }
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn readyz(ts: &TestServer) -> (u16, serde_json::Value) {
    match ts.http.get(format!("{}/readyz", ts.base)).send().await {
        Ok(r) => (r.status().as_u16(), r.json().await.unwrap_or_default()),
        Err(_) => (0, serde_json::Value::Null),
    }
}

async fn wait_readyz(ts: &TestServer, want: u16, within: Duration) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let (status, body) = readyz(ts).await;
        if status == want {
            return body;
        }
        assert!(Instant::now() < deadline, "/readyz never became {want}: {status} {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The outage the issue reports losing a turn at (50 s) and more: 60 s, twice the old ~28 s
/// retry deadline.
const OUTAGE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_60_s_postgres_outage_loses_no_turn_and_the_end_is_written() {
    let mut pg = OwnPostgres::init();
    pg.start().await;
    let url = pg.url();
    // A queue of 4 writes: most of the conversation spills to the journal during the outage.
    let journal_dir = temp_dir("outage-journal");
    let jd = journal_dir.clone();
    let ts = TestServer::start_with(|c| {
        c.database_url = url.clone();
        c.store_queue = 4;
        c.journal_dir = Some(jd);
    })
    .await;
    let (id, token, offer_url) = ts.create_session().await;
    let mut client = TestClient::connect(&ts, &offer_url, &token).await;
    client.wait_event("session.ready", Duration::from_secs(10), |e| e["type"] == "session.ready").await;
    let body = wait_readyz(&ts, 200, Duration::from_secs(5)).await;
    assert_eq!(body["store"], "available", "{body}");

    pg.stop();
    let outage = Instant::now();
    // Six exchanges during the outage: 12 turns, each final shown to the client.
    let agent_final = |e: &serde_json::Value| e["type"] == "transcript" && e["role"] == "agent" && e["final"] == true;
    for i in 0..6 {
        client
            .send_text(&format!(r#"{{"type":"text","text":"question number {i} while the database is down"}}"#))
            .await;
        client
            .silence_until(&format!("reply {i}"), Duration::from_secs(20), |evs| {
                evs.iter().filter(|e| agent_final(e)).count() > i
            })
            .await;
    }
    let finals: Vec<serde_json::Value> =
        client.events().into_iter().filter(|e| e["type"] == "transcript" && e["final"] == true).collect();
    assert_eq!(finals.len(), 12, "12 finals shown: {finals:?}");
    assert!(
        !client.events().iter().any(|e| e["type"] == "error" && e["code"] == "transcript_not_durable"),
        "every final was journaled before it was shown"
    );
    let body = wait_readyz(&ts, 503, Duration::from_secs(10)).await;
    assert_eq!(body["store"], "unavailable", "{body}");
    assert!(body["queued"].as_u64().unwrap() >= 8, "writes wait in the queue and the journal: {body}");
    assert!(body["journal_bytes"].as_u64().unwrap() > 0, "{body}");
    // The delay durability added to each final (journal append + fdatasync), for BENCHMARKS.md.
    let (sum, count) = (
        ts.metric("kotodama_transcript_durable_seconds_sum").await,
        ts.metric("kotodama_transcript_durable_seconds_count").await,
    );
    assert!(count >= 12.0, "every final turn waited for the journal: {count}");
    let bucket = |le: &str| format!("kotodama_transcript_durable_seconds_bucket{{le=\"{le}\"}}");
    let (le10, le20) = (ts.metric(&bucket("0.01")).await, ts.metric(&bucket("0.02")).await);
    eprintln!(
        "final held for the journal: mean {:.3} ms over {count} turns; {le10} within 10 ms, {le20} within 20 ms",
        sum / count * 1000.0
    );
    let res = ts.http.delete(format!("{}/v1/sessions/{id}", ts.base)).bearer_auth(&token).send().await.unwrap();
    assert_eq!(res.status(), 200);
    tokio::time::sleep(OUTAGE.saturating_sub(outage.elapsed())).await;

    pg.start().await;
    let body = wait_readyz(&ts, 200, Duration::from_secs(30)).await;
    ts.server.manager().writer().flush().await;
    assert_eq!(body["store"], "available", "{body}");
    let store = SqlStore::connect(&pg.url()).await.expect("own Postgres back");
    let stored = store.session(&id).await.unwrap().expect("the session row");
    assert_eq!(format!("{:?}", stored.state), "Ended", "the end made during the outage was written");
    assert_eq!(stored.end_reason.as_deref(), Some("client_request"));
    let turns = store.turns(&id).await.unwrap();
    let texts: Vec<&str> = turns.iter().map(|t| t.text.as_str()).collect();
    assert_eq!(turns.len(), 12, "12 of 12 turns stored: {texts:?}");
    for (f, t) in finals.iter().zip(&turns) {
        assert_eq!(f["text"].as_str().unwrap().trim(), t.text, "stored in the order shown");
    }
    let (_, body) = readyz(&ts).await;
    assert_eq!(body["queued"], 0, "{body}");
    assert_eq!(body["journal_bytes"], 0, "the journal is emptied once everything is stored: {body}");
    client.close().await;
    let _ = std::fs::remove_dir_all(&journal_dir);
}
