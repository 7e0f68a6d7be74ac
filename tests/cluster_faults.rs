//! Cluster faults, each test with its own Redis (a `redis-server` started on a free port, never
//! the shared one) and short heartbeat periods (200 ms, dead after 1 s):
//!
//! * a node killed for good (`kill -9` of the real binary): the survivor ends its sessions
//!   `node_lost` at the dead node's last heartbeat, stops redirecting to it, and answers DELETE
//!   as for any ended session;
//! * a node killed and restarted: its sessions ended `crash` at its last heartbeat, not at the
//!   restart;
//! * Redis restarted empty: the owner re-asserts its heartbeat and registry entries, and the
//!   other node redirects to it again;
//! * least-loaded placement: six creations sent to one node of two end three on each.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use common::*;
use kotodama::config::{Config, Placement};
use serde_json::Value;

const SECRET: &str = "cluster-faults-secret-0123456789abcdef0123";
const INTERVAL_MS: &str = "200";
const EXPIRY_MS: &str = "1000";
const PREFIX: &str = "kotodama:";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A `redis-server` of this test's own, in memory only (no RDB, no AOF): a restart comes back empty.
struct OwnRedis {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl OwnRedis {
    fn start() -> OwnRedis {
        let dir = temp_dir("own-redis");
        let port = free_port();
        let child = Self::spawn(port, &dir);
        let redis = OwnRedis { child, port, dir };
        redis.wait_ready();
        redis
    }

    fn spawn(port: u16, dir: &Path) -> Child {
        Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (apt install redis-server)")
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ping = redis::Client::open(self.url())
                .and_then(|c| c.get_connection())
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
            if ping.is_ok() {
                return;
            }
            assert!(Instant::now() < deadline, "own redis-server on port {} did not start", self.port);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL and start again on the same port, with nothing in it.
    fn restart_empty(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Self::spawn(self.port, &self.dir);
        self.wait_ready();
    }

    async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url()).unwrap().get_multiplexed_async_connection().await.unwrap()
    }

    /// The last heartbeat node `node_id` wrote: unix ms.
    async fn last_seen_ms(&self, node_id: &str) -> i64 {
        let json: Option<String> = redis::cmd("GET")
            .arg(format!("{PREFIX}node-seen:{node_id}"))
            .query_async(&mut self.conn().await)
            .await
            .unwrap();
        let beat: Value = serde_json::from_str(&json.expect("the node's last heartbeat is kept")).unwrap();
        beat["last_seen_ms"].as_i64().unwrap()
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The real binary, started with the cluster settings of these tests.
struct Node {
    child: Child,
    base: String,
}

impl Node {
    async fn start(dir: &Path, db_url: &str, redis_url: &str, node_id: &str, port: u16, run: u32) -> Node {
        let log = dir.join(format!("{node_id}-{run}.log"));
        // A hard link keeps this build's inode even if cargo replaces the file meanwhile.
        let exe = dir.join("kotodama");
        if !exe.exists() && std::fs::hard_link(env!("CARGO_BIN_EXE_kotodama"), &exe).is_err() {
            std::fs::copy(env!("CARGO_BIN_EXE_kotodama"), &exe).expect("copy the binary");
        }
        let mut cmd = Command::new(&exe);
        cmd.arg("serve")
            .env_remove("OPENAI_API_KEY")
            .env_remove("KOTODAMA_API_KEYS")
            .env("KOTODAMA_PROVIDER", "scripted")
            .env("KOTODAMA_BIND", format!("127.0.0.1:{port}"))
            .env("KOTODAMA_DATABASE_URL", db_url)
            .env("KOTODAMA_REDIS_URL", redis_url)
            .env("KOTODAMA_NODE_ID", node_id)
            .env("KOTODAMA_TOKEN_SECRET", SECRET)
            .env("KOTODAMA_CLUSTER_PLACEMENT", "local")
            .env("KOTODAMA_CLUSTER_HEARTBEAT_INTERVAL_MS", INTERVAL_MS)
            .env("KOTODAMA_CLUSTER_HEARTBEAT_EXPIRY_MS", EXPIRY_MS)
            .env("KOTODAMA_LOG", "info");
        let (child, base) = spawn_node(cmd, dir, &log, port).await;
        Node { child, base }
    }

    fn kill_9(&mut self) {
        self.child.kill().expect("SIGKILL");
        let status = self.child.wait().unwrap();
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9), "killed by SIGKILL");
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An in-process node on `db_url` and `redis_url` with the short heartbeat.
fn in_process(db_url: String, redis_url: String, placement: Placement) -> impl FnOnce(&mut Config) {
    move |c: &mut Config| {
        c.database_url = db_url;
        c.redis_url = Some(redis_url);
        c.token_secret = Some(SECRET.into());
        c.cluster.placement = placement;
        c.cluster.heartbeat_interval_ms = INTERVAL_MS.parse().unwrap();
        c.cluster.heartbeat_expiry_ms = EXPIRY_MS.parse().unwrap();
    }
}

/// Two in-process nodes with least-loaded placement on their own Redis and Postgres (kept alive
/// by the caller).
async fn two_least_loaded_nodes() -> (OwnRedis, PgTestDb, TestServer, TestServer) {
    let redis = OwnRedis::start();
    let db = PgTestDb::create().await;
    let a = TestServer::start_with(in_process(db.url.clone(), redis.url(), Placement::LeastLoaded)).await;
    let b = TestServer::start_with(in_process(db.url.clone(), redis.url(), Placement::LeastLoaded)).await;
    (redis, db, a, b)
}

/// A client that follows no redirect (credentials must be re-sent to the other node by hand).
fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

fn rfc3339_ms(v: &Value) -> i64 {
    let t = time::OffsetDateTime::parse(v.as_str().unwrap(), &time::format_description::well_known::Rfc3339).unwrap();
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap()
}

fn unix_ms(t: SystemTime) -> i64 {
    i64::try_from(t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_millis()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_for_good_has_its_sessions_ended_node_lost_at_its_last_heartbeat() {
    let redis = OwnRedis::start();
    let db = PgTestDb::create().await;
    let dir = temp_dir("cluster-death");
    let mut a = Node::start(&dir, &db.url, &redis.url(), "node-a", free_port(), 1).await;
    let b = TestServer::start_with(in_process(db.url.clone(), redis.url(), Placement::Local)).await;
    let http = no_redirects();

    // One session connected (a real WebRTC client) and one only created, both on A.
    let created = create_session_at(&http, &a.base, None).await;
    let (live_id, live_token) = id_and_token(&created);
    let client = TestClient::connect_to(&a.base, &http, created["offer_url"].as_str().unwrap(), &live_token).await;
    client
        .wait_event("listening", Duration::from_secs(20), |e| e["type"] == "state" && e["state"] == "listening")
        .await;
    let (idle_id, idle_token) = id_and_token(&create_session_at(&http, &a.base, None).await);
    // While A lives, B sends its clients there.
    let r = http.get(format!("{}/v1/sessions/{live_id}", b.base)).bearer_auth(&live_token).send().await.unwrap();
    assert_eq!(r.status(), 307);
    assert_eq!(r.headers()["location"], format!("{}/v1/sessions/{live_id}", a.base));

    a.kill_9();
    let killed_at = unix_ms(SystemTime::now());

    // B: redirects to A only until A is found dead, then the stored end, never a redirect again.
    let deadline = Instant::now() + Duration::from_secs(30);
    let info = loop {
        let r = http.get(format!("{}/v1/sessions/{live_id}", b.base)).bearer_auth(&live_token).send().await.unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        if status == 200 && body["state"] == "ended" {
            break body;
        }
        assert!(matches!(status, 200 | 307), "before the end is found: {status} {body}");
        assert!(Instant::now() < deadline, "B never reported A's session ended: {status} {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(info["end_reason"], "node_lost", "{info}");
    let last_seen = redis.last_seen_ms("node-a").await;
    assert!(last_seen <= killed_at, "A's last heartbeat {last_seen} is before the kill {killed_at}");
    assert_eq!(rfc3339_ms(&info["ended_at"]), last_seen, "ended_at is A's last heartbeat, not the detection: {info}");
    let idle = get_json(&http, &format!("{}/v1/sessions/{idle_id}", b.base), &idle_token).await;
    assert_eq!((idle["state"].as_str(), idle["end_reason"].as_str()), (Some("ended"), Some("node_lost")), "{idle}");
    assert_eq!(rfc3339_ms(&idle["ended_at"]), last_seen, "{idle}");

    // Every route answers for the ended session from B: no 307 to the dead node.
    for _ in 0..3 {
        let r = http.get(format!("{}/v1/sessions/{live_id}", b.base)).bearer_auth(&live_token).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = http.delete(format!("{}/v1/sessions/{live_id}", b.base)).bearer_auth(&live_token).send().await.unwrap();
    assert_eq!(r.status(), 404, "DELETE of an ended session (api-v1)");
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "session_ended");
    let r =
        http.get(format!("{}/v1/sessions/{idle_id}/transcript", b.base)).bearer_auth(&idle_token).send().await.unwrap();
    assert_eq!(r.status(), 200, "the transcript is read from the shared store");
    let mut conn = redis.conn().await;
    for id in [&live_id, &idle_id] {
        let owner: Option<String> =
            redis::cmd("GET").arg(format!("{PREFIX}session:{id}")).query_async(&mut conn).await.unwrap();
        assert_eq!(owner, None, "the dead node's registry entries are gone");
    }
    let watched: Vec<String> =
        redis::cmd("SMEMBERS").arg(format!("{PREFIX}nodes")).query_async(&mut conn).await.unwrap();
    assert_eq!(watched, vec![b.server.manager().node_id().to_owned()], "A is no longer watched");
    client.close().await;
    b.server.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_node_restarted_ends_its_sessions_at_its_last_heartbeat_not_the_restart() {
    let redis = OwnRedis::start();
    let dir = temp_dir("cluster-crash");
    let db_url = format!("sqlite://{}/kotodama.db", dir.display());
    let port = free_port();
    let http = no_redirects();
    let mut a = Node::start(&dir, &db_url, &redis.url(), "node-a", port, 1).await;
    let (id, token) = id_and_token(&create_session_at(&http, &a.base, None).await);
    a.kill_9();
    let last_seen = redis.last_seen_ms("node-a").await;
    // Restart well after the last heartbeat, so the two times cannot coincide.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let restarted_at = unix_ms(SystemTime::now());
    let a = Node::start(&dir, &db_url, &redis.url(), "node-a", port, 2).await;
    let info = get_json(&http, &format!("{}/v1/sessions/{id}", a.base), &token).await;
    assert_eq!((info["state"].as_str(), info["end_reason"].as_str()), (Some("ended"), Some("crash")), "{info}");
    let ended_at = rfc3339_ms(&info["ended_at"]);
    assert_eq!(ended_at, last_seen, "ended at the crash (last heartbeat), not at the restart: {info}");
    assert!(ended_at < restarted_at, "{ended_at} before the restart at {restarted_at}");
    drop(a);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_redis_restarts_empty_live_sessions_are_routable_again_from_every_node() {
    let mut redis = OwnRedis::start();
    let db = PgTestDb::create().await;
    let a = TestServer::start_with(in_process(db.url.clone(), redis.url(), Placement::Local)).await;
    let b = TestServer::start_with(in_process(db.url.clone(), redis.url(), Placement::Local)).await;
    let http = no_redirects();
    let (id, token) = id_and_token(&create_session_at(&http, &a.base, None).await);
    let at_b = format!("{}/v1/sessions/{id}", b.base);
    let r = http.get(&at_b).bearer_auth(&token).send().await.unwrap();
    assert_eq!(r.status(), 307);

    redis.restart_empty();
    let mut conn = redis.conn().await;

    // Within a heartbeat (waited for generously) A has re-asserted its entry: B redirects again.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = http.get(&at_b).bearer_auth(&token).send().await.unwrap();
        if r.status() == 307 {
            assert_eq!(r.headers()["location"], format!("{}/v1/sessions/{id}", a.base));
            break;
        }
        assert!(Instant::now() < deadline, "B never redirected to A again: {}", r.status());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let owner: Option<String> =
        redis::cmd("GET").arg(format!("{PREFIX}session:{id}")).query_async(&mut conn).await.unwrap();
    assert_eq!(owner.as_deref(), Some(a.base.as_str()));
    // Both nodes beat again (B's next heartbeat may come a moment after A's).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let watched: Vec<String> =
            redis::cmd("SMEMBERS").arg(format!("{PREFIX}nodes")).query_async(&mut conn).await.unwrap();
        if watched.len() == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "both nodes beat again: {watched:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And it is the live session there: DELETE through B's redirect ends it on A.
    let r = http.delete(&at_b).bearer_auth(&token).send().await.unwrap();
    assert_eq!(r.status(), 307);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let r = http.delete(location).bearer_auth(&token).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(a.server.manager().live_count(), 0);
    a.server.shutdown().await.unwrap();
    b.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_loaded_placement_fills_two_nodes_evenly() {
    let (redis, db, a, b) = two_least_loaded_nodes().await;
    let http = no_redirects();
    let mut redirects = 0;
    for _ in 0..6 {
        // Every creation goes to A; a 307 is followed by hand, as a client re-sending its request.
        let r = http.post(format!("{}/v1/sessions", a.base)).json(&serde_json::json!({})).send().await.unwrap();
        let r = if r.status() == 307 {
            redirects += 1;
            let location = r.headers()["location"].to_str().unwrap().to_owned();
            assert_eq!(location, format!("{}/v1/sessions", b.base), "the same route on the less loaded node");
            http.post(location).json(&serde_json::json!({})).send().await.unwrap()
        } else {
            r
        };
        assert_eq!(r.status(), 201);
    }
    let (on_a, on_b) = (a.server.manager().live_count(), b.server.manager().live_count());
    assert_eq!((on_a, on_b), (3, 3), "six creations on two nodes");
    assert_eq!(redirects, 3);

    // Placement `local`: a node takes what reaches it, however loaded.
    let c = TestServer::start_with(in_process(db.url.clone(), redis.url(), Placement::Local)).await;
    for _ in 0..4 {
        let r = http.post(format!("{}/v1/sessions", c.base)).json(&serde_json::json!({})).send().await.unwrap();
        assert_eq!(r.status(), 201);
    }
    assert_eq!(c.server.manager().live_count(), 4);
    // And a least-loaded node sends the next creation to the least loaded of the three.
    let r = http.post(format!("{}/v1/sessions", c.base)).json(&serde_json::json!({})).send().await.unwrap();
    assert_eq!(r.status(), 201, "placement `local` never redirects");
    let r = http.post(format!("{}/v1/sessions", a.base)).json(&serde_json::json!({})).send().await.unwrap();
    assert_eq!(r.status(), 201, "A (3) is not above the least loaded (B, 3): created here");
    let r = http.post(format!("{}/v1/sessions", a.base)).json(&serde_json::json!({})).send().await.unwrap();
    assert_eq!(r.status(), 307, "A (4) above B (3)");
    assert_eq!(r.headers()["location"], format!("{}/v1/sessions", b.base));
    for ts in [a, b, c] {
        ts.server.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_with_redis_never_redirects_a_creation() {
    let redis = OwnRedis::start();
    let a = TestServer::start_with(|c| {
        c.redis_url = Some(redis.url());
        c.token_secret = Some(SECRET.into());
    })
    .await;
    let http = no_redirects();
    for _ in 0..4 {
        let r = http.post(format!("{}/v1/sessions", a.base)).json(&serde_json::json!({})).send().await.unwrap();
        assert_eq!(r.status(), 201);
    }
    assert_eq!(a.server.manager().live_count(), 4);
    a.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_was_declared_dead_while_cut_off_ends_its_own_sessions_node_lost() {
    let redis = OwnRedis::start();
    let a = TestServer::start_with(in_process(
        format!("sqlite://{}/kotodama.db", temp_dir("fenced").display()),
        redis.url(),
        Placement::Local,
    ))
    .await;
    let http = no_redirects();
    let (id, token) = id_and_token(&create_session_at(&http, &a.base, None).await);
    // What a survivor leaves when it reaped A (A's heartbeat lapsed, e.g. cut off from Redis):
    // the incarnation it declared dead, read from A's own heartbeat.
    let mut conn = redis.conn().await;
    let node_id = a.server.manager().node_id().to_owned();
    let beat: Option<String> =
        redis::cmd("GET").arg(format!("{PREFIX}node:{node_id}")).query_async(&mut conn).await.unwrap();
    let beat: Value = serde_json::from_str(&beat.expect("A beats")).unwrap();
    let _: () = redis::cmd("SET")
        .arg(format!("{PREFIX}reaped:{node_id}"))
        .arg(beat["incarnation"].as_str().unwrap())
        .query_async(&mut conn)
        .await
        .unwrap();
    // At its next heartbeat A learns it and ends what the store already holds as ended.
    let deadline = Instant::now() + Duration::from_secs(30);
    let info = loop {
        let info = get_json(&http, &format!("{}/v1/sessions/{id}", a.base), &token).await;
        if info["state"] == "ended" {
            break info;
        }
        assert!(Instant::now() < deadline, "A never ended its session: {info}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(info["end_reason"], "node_lost", "{info}");
    // The notice is cleared once acted on.
    loop {
        let notice: Option<String> =
            redis::cmd("GET").arg(format!("{PREFIX}reaped:{node_id}")).query_async(&mut conn).await.unwrap();
        if notice.is_none() {
            break;
        }
        assert!(Instant::now() < deadline, "the dead-node notice was never cleared");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A keeps serving: a new session is created and stays live.
    let r = http.post(format!("{}/v1/sessions", a.base)).json(&serde_json::json!({})).send().await.unwrap();
    assert_eq!(r.status(), 201);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(a.server.manager().live_count(), 1, "a notice for this incarnation acts once");
    a.server.shutdown().await.unwrap();
}

/// Pipecat's transport posts its offer and its trickle to one endpoint, the node the app names:
/// the offer is placed like `POST /v1/sessions` (307 to `/api/offer` on the less loaded node), and
/// a trickle or a per-session offer for a session another node holds is 307 to that node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipecat_offers_are_placed_and_their_requests_follow_the_session_across_nodes() {
    let (_redis, _db, a, b) = two_least_loaded_nodes().await;
    let http = no_redirects();
    let sdp =
        std::fs::read_to_string(format!("{}/tests/data/offers/pipecat_small_webrtc.sdp", env!("CARGO_MANIFEST_DIR")))
            .unwrap();
    let offer = serde_json::json!({"sdp": sdp, "type": "offer", "pc_id": null, "restart_pc": false});
    // A holds one session, B none: A places the next Pipecat offer on B.
    let r = http.post(format!("{}/v1/sessions", a.base)).json(&serde_json::json!({})).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let r = http.post(format!("{}/api/offer", a.base)).json(&offer).send().await.unwrap();
    assert_eq!(r.status(), 307, "A (1) is above B (0)");
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    assert_eq!(location, format!("{}/api/offer", b.base), "the same route on the less loaded node");
    assert_eq!(r.headers()["access-control-allow-origin"], "*", "a page on another origin may follow it");
    let r = http.post(location).json(&offer).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let answer: Value = r.json().await.unwrap();
    let pc_id = answer["pc_id"].as_str().unwrap().to_owned();
    let session = pc_id.split('.').next().unwrap().to_owned();
    assert!(b.server.manager().get(&session).is_some(), "the session is on B");

    // The transport trickles to the endpoint it was given, A: 307 to B, which takes it.
    let trickle = serde_json::json!({"pc_id": pc_id, "candidates": [{"candidate": "", "sdp_mid": "0"}]});
    let r = http.patch(format!("{}/api/offer", a.base)).json(&trickle).send().await.unwrap();
    assert_eq!(r.status(), 307);
    assert_eq!(r.headers()["location"], format!("{}/api/offer", b.base));
    let r = http.patch(format!("{}/api/offer", b.base)).json(&trickle).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // A trickle for a session no node holds is still 404.
    let unknown = serde_json::json!({"pc_id": "sess_nowhere.peer_x.e_y", "candidates": []});
    let r = http.patch(format!("{}/api/offer", a.base)).json(&unknown).send().await.unwrap();
    assert_eq!(r.status(), 404);

    // A session created on B through `POST /v1/sessions`, its Pipecat offer sent to A (the app's
    // `offerUrlTemplate` on the endpoint's node): 307 to the same path on B.
    let r = http.post(format!("{}/v1/sessions", b.base)).json(&serde_json::json!({})).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let created: Value = r.json().await.unwrap();
    let (id, token) = (created["session_id"].as_str().unwrap(), created["token"].as_str().unwrap());
    let path = format!("/v1/sessions/{id}/api/offer");
    let r = http.post(format!("{}{path}", a.base)).bearer_auth(token).json(&offer).send().await.unwrap();
    assert_eq!(r.status(), 307);
    assert_eq!(r.headers()["location"], format!("{}{path}", b.base));
    let r = http.post(format!("{}{path}", b.base)).bearer_auth(token).json(&offer).send().await.unwrap();
    assert_eq!(r.status(), 200, "the token was not used up by the redirect");

    // The transport's restart of the session on B, sent to A: 307 to B, where its conversation is,
    // and B (holding it) takes it there without placing it elsewhere.
    let mut restart = offer.clone();
    restart["pc_id"] = serde_json::json!(pc_id);
    restart["restart_pc"] = serde_json::json!(true);
    let r = http.post(format!("{}/api/offer", a.base)).json(&restart).send().await.unwrap();
    assert_eq!(r.status(), 307);
    assert_eq!(r.headers()["location"], format!("{}/api/offer", b.base));
    assert!(b.server.manager().live_count() > a.server.manager().live_count(), "B is the more loaded node");
    let r = http.post(format!("{}/api/offer", b.base)).json(&restart).send().await.unwrap();
    assert_eq!(r.status(), 200, "B holds more sessions than A, yet the restart stays with its session");
    let replaced: Value = r.json().await.unwrap();
    let new_session = replaced["pc_id"].as_str().unwrap().split('.').next().unwrap().to_owned();
    assert!(b.server.manager().get(&new_session).is_some(), "the new session is on B");
    assert_eq!(b.server.manager().get(&session).unwrap().phase(), kotodama::session::SessionState::Ended);
    for ts in [a, b] {
        ts.server.shutdown().await.unwrap();
    }
}

/// A WHIP publish is placed like `POST /v1/sessions` (307 to the same route on the less loaded
/// node, which a WHIP client follows, RFC 9725 §4.5), and a WHEP player or event watcher sent to
/// the node the publisher first reached is 307 to the node holding the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whip_publishers_are_placed_and_players_follow_the_session_across_nodes() {
    use common::whip::{player_offer, publisher_offer};
    let (_redis, _db, a, b) = two_least_loaded_nodes().await;
    let http = no_redirects();
    let r = http.post(format!("{}/v1/sessions", a.base)).json(&serde_json::json!({})).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let (_publisher, offer) = publisher_offer().await;
    let path = "/v1/characters/aiko/whip";
    let post = |url: String, sdp: String| http.post(url).header("Content-Type", "application/sdp").body(sdp).send();
    let r = post(format!("{}{path}", a.base), offer.clone()).await.unwrap();
    assert_eq!(r.status(), 307, "A (1) is above B (0)");
    assert_eq!(r.headers()["location"], format!("{}{path}", b.base));
    let r = post(format!("{}{path}", b.base), offer).await.unwrap();
    assert_eq!(r.status(), 201);
    let resource = r.headers()["location"].to_str().unwrap().to_owned();
    let id = resource.rsplit('/').next().unwrap().to_owned();
    assert!(b.server.manager().get(&id).is_some(), "the session is on B");

    // A player and an event watcher pointed at A: 307 to B.
    let player = player_offer(false).await;
    let whep = format!("/v1/sessions/{id}/whep");
    let r = post(format!("{}{whep}", a.base), player.5.clone()).await.unwrap();
    assert_eq!(r.status(), 307);
    assert_eq!(r.headers()["location"], format!("{}{whep}", b.base));
    let r = post(format!("{}{whep}", b.base), player.5).await.unwrap();
    assert_eq!(r.status(), 201);
    let events = format!("/v1/sessions/{id}/events");
    let r = http.get(format!("{}{events}", a.base)).send().await.unwrap();
    assert_eq!(r.status(), 307);
    assert_eq!(r.headers()["location"], format!("{}{events}", b.base));
    // An id no node holds is still 404.
    let r = post(format!("{}/v1/sessions/sess_nowhere/whep", a.base), "v=0\r\n".into()).await.unwrap();
    assert_eq!(r.status(), 404);
    for ts in [a, b] {
        ts.server.shutdown().await.unwrap();
    }
}
