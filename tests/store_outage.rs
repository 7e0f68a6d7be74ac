//! Store writes outlive a database outage (issue 12, kind 6): with Postgres stopped for longer
//! than the writer's old retry budget, the turns of a conversation and the session's end are
//! written once it is back, and `/readyz` says the store is unavailable meanwhile. The test runs
//! its own Postgres (initdb in a temporary directory, as the `postgres` user), never the shared
//! one.

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

async fn readyz(ts: &TestServer) -> u16 {
    ts.http.get(format!("{}/readyz", ts.base)).send().await.map(|r| r.status().as_u16()).unwrap_or(0)
}

async fn wait_readyz(ts: &TestServer, want: u16, within: Duration) {
    let deadline = Instant::now() + within;
    while readyz(ts).await != want {
        assert!(Instant::now() < deadline, "/readyz never became {want}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turns_and_the_end_made_during_an_outage_are_written_when_postgres_returns() {
    let mut pg = OwnPostgres::init();
    pg.start().await;
    let url = pg.url();
    let ts = TestServer::start_with(|c| c.database_url = url.clone()).await;
    let (id, token, offer_url) = ts.create_session().await;
    let client = TestClient::connect(&ts, &offer_url, &token).await;
    client.wait_event("session.ready", Duration::from_secs(10), |e| e["type"] == "session.ready").await;
    assert_eq!(readyz(&ts).await, 200);

    pg.stop();
    let outage = Instant::now();
    // A conversation during the outage: a typed turn and the agent's reply, then the end.
    client.send_text(r#"{"type":"text","text":"are you still there"}"#).await;
    let agent_final = |e: &serde_json::Value| e["type"] == "transcript" && e["role"] == "agent" && e["final"] == true;
    client.wait_event("the agent's reply", Duration::from_secs(10), agent_final).await;
    let res = ts.http.delete(format!("{}/v1/sessions/{id}", ts.base)).bearer_auth(&token).send().await.unwrap();
    assert_eq!(res.status(), 200);
    wait_readyz(&ts, 503, Duration::from_secs(10)).await;
    // Longer than the old budget (5 attempts, ~3 s against a refused connection).
    tokio::time::sleep(Duration::from_secs(12).saturating_sub(outage.elapsed())).await;

    pg.start().await;
    wait_readyz(&ts, 200, Duration::from_secs(20)).await;
    ts.server.manager().writer().flush().await;
    let store = SqlStore::connect(&pg.url()).await.expect("own Postgres back");
    let stored = store.session(&id).await.unwrap().expect("the session row");
    assert_eq!(format!("{:?}", stored.state), "Ended", "the end made during the outage was written");
    assert_eq!(stored.end_reason.as_deref(), Some("client_request"));
    let turns = store.turns(&id).await.unwrap();
    let roles: Vec<String> = turns.iter().map(|t| format!("{:?}", t.role)).collect();
    assert!(turns.len() >= 2, "the user's and the agent's turn from the outage were written: {roles:?}");
    assert!(turns.iter().any(|t| t.text.contains("still there")), "the user's turn: {roles:?}");
    client.close().await;
}
