//! The store contract, run with the same body on SQLite (a file in a temp dir) and on Postgres
//! (a fresh database on the machine's server): sessions move created -> connected -> ended and
//! the first end wins, turns are idempotent by (session_id, seq), crash marking touches only the
//! restarting node's open sessions, migrations apply twice without harm, and a user's data is
//! exported and hard-deleted (optionally only what one API key created).

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use kotodama::store::sql::SqlStore;
use kotodama::store::{Store, StoredSession, StoredState, StoredTurn, from_ms, to_ms};
use signaling::events::Role;

fn session(id: &str, node: &str, user: Option<&str>, key: Option<&str>, at: SystemTime) -> StoredSession {
    StoredSession {
        id: id.into(),
        character: "aiko".into(),
        provider: "scripted".into(),
        user_id: user.map(Into::into),
        api_key_id: key.map(Into::into),
        node_id: node.into(),
        state: StoredState::Created,
        end_reason: None,
        created_at: at,
        connected_at: None,
        ended_at: None,
    }
}

fn turn(session: &str, seq: u64, role: Role, text: &str, at: SystemTime) -> StoredTurn {
    StoredTurn {
        session_id: session.into(),
        seq,
        role,
        text: text.into(),
        interrupted: seq == 2,
        started_at: Some(at - Duration::from_millis(1500)),
        ended_at: at,
        tool_calls: (seq == 3).then(|| serde_json::json!([{"name": "weather", "arguments": {"city": "Kyoto"}}])),
    }
}

/// Times with millisecond precision (what the store keeps).
fn ms(t: SystemTime) -> SystemTime {
    from_ms(to_ms(t))
}

async fn store_contract(url: &str) {
    let store = SqlStore::connect(url).await.expect("connect and migrate");
    // A second connect runs the migrations again: nothing to do, no error.
    let again = SqlStore::connect(url).await.expect("migrations are idempotent");
    again.close().await;

    let t0 = ms(SystemTime::now());
    store.create_session(&session("s1", "node-a", Some("user-1"), Some("key-a"), t0)).await.unwrap();
    store
        .create_session(&session("s2", "node-a", Some("user-1"), Some("key-b"), t0 + Duration::from_secs(1)))
        .await
        .unwrap();
    store.create_session(&session("s3", "node-a", None, None, t0)).await.unwrap();
    store.create_session(&session("s4", "node-b", Some("user-2"), None, t0)).await.unwrap();
    assert!(store.create_session(&session("s1", "node-a", None, None, t0)).await.is_err(), "a session id is unique");

    store.mark_connected("s1", t0 + Duration::from_millis(300)).await.unwrap();
    for (seq, role, text) in [(1, Role::User, "hello"), (2, Role::Agent, "hi the"), (3, Role::User, "weather?")] {
        store.put_turn(&turn("s1", seq, role, text, t0 + Duration::from_secs(seq))).await.unwrap();
    }
    // A rewrite of the same (session_id, seq) changes nothing.
    store.put_turn(&turn("s1", 2, Role::Agent, "something else", t0)).await.unwrap();
    let turns = store.turns("s1").await.unwrap();
    assert_eq!(turns.len(), 3);
    assert_eq!(turns[1].text, "hi the", "the first write of seq 2 stays");
    assert_eq!(turns[1], turn("s1", 2, Role::Agent, "hi the", t0 + Duration::from_secs(2)), "round trip");
    assert_eq!(turns[2].tool_calls, Some(serde_json::json!([{"name": "weather", "arguments": {"city": "Kyoto"}}])));
    assert_eq!(turns.iter().map(|t| t.seq).collect::<Vec<_>>(), [1, 2, 3]);

    let s1 = store.session("s1").await.unwrap().expect("s1 stored");
    assert_eq!(s1.state, StoredState::Connected);
    assert_eq!(s1.connected_at, Some(t0 + Duration::from_millis(300)));
    assert_eq!(s1.user_id.as_deref(), Some("user-1"));

    store.mark_ended("s1", t0 + Duration::from_secs(9), "client_request").await.unwrap();
    store.mark_ended("s1", t0 + Duration::from_secs(10), "server_shutdown").await.unwrap();
    store.mark_connected("s1", t0 + Duration::from_secs(11)).await.unwrap();
    let s1 = store.session("s1").await.unwrap().unwrap();
    assert_eq!((s1.state, s1.end_reason.as_deref()), (StoredState::Ended, Some("client_request")), "first end wins");
    assert_eq!(s1.ended_at, Some(t0 + Duration::from_secs(9)));

    // Restart of node-a: its open sessions (s2, s3) end with `crash`; node-b's s4 is untouched.
    let ended = store.end_orphans("node-a", t0 + Duration::from_secs(20), "crash").await.unwrap();
    assert_eq!(ended, ["s2", "s3"], "s2 and s3 were open on node-a");
    for id in ["s2", "s3"] {
        let s = store.session(id).await.unwrap().unwrap();
        assert_eq!((s.state, s.end_reason.as_deref()), (StoredState::Ended, Some("crash")), "{id}");
    }
    assert_eq!(store.session("s1").await.unwrap().unwrap().end_reason.as_deref(), Some("client_request"));
    assert_eq!(store.session("s4").await.unwrap().unwrap().state, StoredState::Created);
    assert_eq!(store.session("nope").await.unwrap(), None);

    // Budgets: usage is stored once per session and summed per user since a time.
    use kotodama::session::budget::{Kind, SessionUsage, UsageTotals};
    let usage = |id: &str, user: Option<&str>, tokens: u64, at: SystemTime| kotodama::store::StoredUsage {
        session_id: id.into(),
        user_id: user.map(str::to_owned),
        character: "aiko".into(),
        usage: SessionUsage {
            totals: UsageTotals { tokens, duration_ms: 60_000, tool_calls: 2 },
            tokens_reported: true,
            exceeded: Some(Kind::Tokens),
        },
        ended_at: at,
    };
    store.put_usage(&usage("s1", Some("user-1"), 700, t0)).await.unwrap();
    store.put_usage(&usage("s1", Some("user-1"), 9, t0)).await.unwrap();
    store.put_usage(&usage("s2", Some("user-1"), 300, t0 + Duration::from_secs(5))).await.unwrap();
    store.put_usage(&usage("s4", Some("user-2"), 50, t0)).await.unwrap();
    assert_eq!(store.usage("s1").await.unwrap(), Some(usage("s1", Some("user-1"), 700, from_ms(to_ms(t0)))));
    let day = store.usage_since("user-1", t0).await.unwrap();
    assert_eq!(
        day,
        UsageTotals { tokens: 1000, duration_ms: 120_000, tool_calls: 4 },
        "a second write changes nothing"
    );
    let later = store.usage_since("user-1", t0 + Duration::from_secs(1)).await.unwrap();
    assert_eq!(later.tokens, 300, "only sessions ended since then");
    assert_eq!(store.usage_since("nobody", t0).await.unwrap(), UsageTotals::default());

    // Privacy: export everything for user-1, then only what key-b created; delete key-b's part,
    // then the rest.
    store.put_turn(&turn("s2", 1, Role::User, "second session", t0)).await.unwrap();
    let all = store.user_data("user-1", None).await.unwrap();
    assert_eq!(all.sessions.iter().map(|s| s.session.id.as_str()).collect::<Vec<_>>(), ["s1", "s2"]);
    assert_eq!(all.sessions[0].turns.len(), 3);
    let json = serde_json::to_value(&all).unwrap();
    assert_eq!(json["sessions"][0]["turns"][0]["text"], "hello", "{json}");
    let by_b = store.user_data("user-1", Some("key-b")).await.unwrap();
    assert_eq!(by_b.sessions.len(), 1);
    assert_eq!(by_b.sessions[0].session.id, "s2");

    assert_eq!(store.delete_user("user-1", Some("key-b")).await.unwrap(), ["s2"]);
    assert_eq!(store.session("s2").await.unwrap(), None);
    assert!(store.turns("s2").await.unwrap().is_empty(), "turns deleted with their session");
    assert!(store.session("s1").await.unwrap().is_some(), "key-a's session stays");
    assert_eq!(store.delete_user("user-1", None).await.unwrap(), ["s1"]);
    assert_eq!(store.session("s1").await.unwrap(), None);
    assert!(store.turns("s1").await.unwrap().is_empty());
    assert_eq!(store.usage("s1").await.unwrap(), None, "usage deleted with the user's data");
    assert!(store.user_data("user-1", None).await.unwrap().sessions.is_empty());
    assert!(store.session("s4").await.unwrap().is_some(), "other users keep their data");
    store.close().await;
}

#[tokio::test]
async fn store_contract_on_sqlite() {
    let dir = temp_dir("store");
    store_contract(&format!("sqlite://{}/nested/kotodama.db", dir.display())).await;
    assert!(dir.join("nested/kotodama.db").is_file(), "the database file and its directory were created");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn store_contract_on_postgres() {
    let db = PgTestDb::create().await;
    store_contract(&db.url).await;
}

/// Write latency and throughput of one node's store, printed (a measurement, not a check:
/// `cargo test --test store -- --ignored --nocapture`).
#[tokio::test]
#[ignore]
async fn measure_turn_write_latency() {
    use std::time::Instant;
    let dir = temp_dir("store-bench");
    let pg = PgTestDb::create().await;
    for (name, url) in [("sqlite", format!("sqlite://{}/k.db", dir.display())), ("postgres", pg.url.clone())] {
        let store = SqlStore::connect(&url).await.unwrap();
        store.create_session(&session("bench", "n", None, None, SystemTime::now())).await.unwrap();
        let mut lat = Vec::new();
        let start = Instant::now();
        for seq in 1..=500u64 {
            let t = Instant::now();
            store
                .put_turn(&turn(
                    "bench",
                    seq,
                    Role::User,
                    "a typical utterance of a dozen words or so, said once",
                    SystemTime::now(),
                ))
                .await
                .unwrap();
            lat.push(t.elapsed());
        }
        let total = start.elapsed();
        lat.sort();
        eprintln!(
            "{name}: 500 turns in {total:?} ({:.0}/s); per write p50 {:?} p99 {:?}",
            500.0 / total.as_secs_f64(),
            lat[250],
            lat[495]
        );
        store.close().await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}
