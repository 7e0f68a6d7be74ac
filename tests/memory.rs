//! Long-term memory per user and character, end to end through real WebRTC clients: a user tells
//! the character a fact in one session, and the next session of the same user starts with it in
//! the provider's instructions (the fake OpenAI Realtime server's `session.update`) or in the
//! cascade's system prompt (the fake chat server's request), and the model's `recall` tool
//! finds it. Offline (rule-based extractor, FTS5) on SQLite, and with fake chat and embeddings
//! servers plus pgvector on Postgres. Another user never sees it; privacy delete removes it.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fake_openai::{FakeOpenAi, FakeOptions, Reply, short_speech};
use common::fake_openai_http::{Fake, FakeBehavior, json_deltas, start_fake};
use common::*;
use kotodama::config::Config;
use kotodama::config::memory::MemoryEndpoint;
use kotodama::providers::RealtimeProvider;
use kotodama::providers::cascade::openai::{Endpoint, OpenAiChat, OpenAiSpeech, OpenAiStt, client};
use kotodama::providers::cascade::{CascadeConfig, CascadeProvider};
use serde_json::{Value, json};

const USER_KEY: &str = "memory-user-key-0123456789";
const ADMIN_KEY: &str = "memory-admin-key-0123456789";
const FACT: &str = "The user's dog is called Miso.";

fn character() -> kotodama::config::Character {
    kotodama::config::Character {
        id: "kai".into(),
        name: "Kai".into(),
        language: "en-US".into(),
        voice: "coral".into(),
        persona: "You are Kai.".into(),
        greeting: None,
        providers: vec![],
        tools: None,
        ..Default::default()
    }
}

fn keys(c: &mut Config) {
    c.api_keys = vec![USER_KEY.into()];
    c.admin_api_keys = vec![ADMIN_KEY.into()];
    c.characters = vec![character()];
}

/// `method path` with `key` and an optional JSON body: (status, JSON body or Null).
async fn call(ts: &TestServer, method: &str, path: &str, key: &str, body: Option<Value>) -> (u16, Value) {
    let mut req = ts.http.request(method.parse().unwrap(), format!("{}{path}", ts.base)).bearer_auth(key);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

/// A connected session of `user`: (session id, session token, client) once it is listening.
async fn session_of(ts: &TestServer, user: &str) -> (String, String, TestClient) {
    let (status, v) = call(ts, "POST", "/v1/sessions", USER_KEY, Some(json!({"user_id": user}))).await;
    assert_eq!(status, 201, "{v}");
    let (id, token) = id_and_token(&v);
    let client = TestClient::connect(ts, v["offer_url"].as_str().unwrap(), &token).await;
    client
        .wait_event("listening", Duration::from_secs(15), |e| e["type"] == "state" && e["state"] == "listening")
        .await;
    (id, token, client)
}

/// Type `text` and wait for the agent's `n`-th final transcript.
async fn say(client: &mut TestClient, text: &str, n: usize) {
    client.send_text(&json!({"type": "text", "text": text}).to_string()).await;
    client
        .silence_until("the agent's reply", Duration::from_secs(30), |evs| {
            evs.iter().filter(|e| e["type"] == "transcript" && e["role"] == "agent" && e["final"] == true).count() >= n
        })
        .await;
}

/// End session `id` with its token.
async fn end(ts: &TestServer, id: &str, token: &str) {
    let res = ts.http.delete(format!("{}/v1/sessions/{id}", ts.base)).bearer_auth(token).send().await.unwrap();
    assert_eq!(res.status(), 200, "DELETE /v1/sessions/{id}");
}

/// `GET /v1/users/{user}/memories` until it lists at least one memory (learning runs after the
/// session's end, off its task).
async fn memories_learnt(ts: &TestServer, user: &str) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, v) = call(ts, "GET", &format!("/v1/users/{user}/memories"), ADMIN_KEY, None).await;
        assert_eq!(status, 200, "{v}");
        let list = v["memories"].as_array().cloned().unwrap_or_default();
        if !list.is_empty() {
            return list;
        }
        assert!(Instant::now() < deadline, "no memory learnt for {user}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn instructions(fake: &FakeOpenAi, conn: usize) -> String {
    let updates = fake.conn(conn).of_type("session.update");
    updates.first().and_then(|u| u["session"]["instructions"].as_str()).unwrap_or_default().to_owned()
}

fn tool_names(fake: &FakeOpenAi, conn: usize) -> Vec<String> {
    let updates = fake.conn(conn).of_type("session.update");
    let tools = updates.first().map(|u| u["session"]["tools"].clone()).unwrap_or(Value::Null);
    tools.as_array().into_iter().flatten().filter_map(|t| t["name"].as_str().map(str::to_owned)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_user_is_remembered_offline_on_sqlite_and_only_by_them_until_deleted() {
    let (t1, a1) = short_speech(0.5);
    let (t2, a2) = short_speech(0.5);
    let script = vec![
        Reply::Speech { text: t1, audio: a1 },
        Reply::ToolCall { name: "recall".into(), arguments: r#"{"query":"the user's dog"}"#.into() },
        Reply::Speech { text: t2, audio: a2 },
    ];
    let fake = FakeOpenAi::start(FakeOptions::default(), script).await;
    let ts = TestServer::start_openai(&fake.url(), |c| {
        keys(c);
        c.openai.turn_detection = kotodama::providers::openai::protocol::TurnDetection::Local;
    })
    .await;

    // Session 1: the user tells a fact (typed, through the real data channel), then leaves.
    let (id1, token1, mut client) = session_of(&ts, "u-miso").await;
    assert!(!instructions(&fake, 0).contains("remember"), "a new user starts with no memories");
    assert!(tool_names(&fake, 0).contains(&"recall".to_owned()), "a user's session offers recall");
    say(&mut client, "Hi Kai! My dog is called Miso. What do you think of that?", 1).await;
    end(&ts, &id1, &token1).await;
    client.close().await;
    let learnt = memories_learnt(&ts, "u-miso").await;
    assert_eq!(learnt.len(), 1, "one fact in that session: {learnt:?}");
    assert_eq!((learnt[0]["kind"].as_str(), learnt[0]["text"].as_str()), (Some("fact"), Some(FACT)));
    assert_eq!((learnt[0]["character"].as_str(), learnt[0]["session_id"].as_str()), (Some("kai"), Some(id1.as_str())));

    // Session 2, same user: the fact is in the instructions, and recall finds it mid-conversation.
    let (id2, token2, mut client) = session_of(&ts, "u-miso").await;
    let instr = instructions(&fake, 1);
    assert!(instr.starts_with("You are Kai.") && instr.contains(FACT), "instructions: {instr}");
    say(&mut client, "What is my dog called?", 1).await;
    let outputs = fake.conn(1).of_type("conversation.item.create");
    let out = outputs.iter().find(|v| v["item"]["type"] == "function_call_output").expect("recall answered");
    let recalled: Value = serde_json::from_str(out["item"]["output"].as_str().unwrap()).unwrap();
    assert_eq!(recalled["memories"][0]["text"], FACT, "{recalled}");
    end(&ts, &id2, &token2).await;
    client.close().await;

    // Another user never sees it: not in their instructions, not in their list or recall.
    let (id3, token3, client) = session_of(&ts, "u-other").await;
    assert!(!instructions(&fake, 2).contains("Miso"), "another user's instructions: {}", instructions(&fake, 2));
    end(&ts, &id3, &token3).await;
    client.close().await;
    let (_, other) = call(&ts, "GET", "/v1/users/u-other/memories", ADMIN_KEY, None).await;
    assert_eq!(other["memories"], json!([]), "{other}");

    // The user's privacy export holds the memory; the privacy delete removes it.
    let (status, export) = call(&ts, "GET", "/v1/users/u-miso/data", USER_KEY, None).await;
    assert_eq!(status, 200, "{export}");
    assert_eq!(export["memories"][0]["text"], FACT, "{export}");
    let (status, v) = call(&ts, "DELETE", "/v1/users/u-miso/data", USER_KEY, None).await;
    assert_eq!(status, 200, "{v}");
    let (_, after) = call(&ts, "GET", "/v1/users/u-miso/memories", ADMIN_KEY, None).await;
    assert_eq!(after["memories"], json!([]), "deleted: {after}");
    let (_id4, _token4, client) = session_of(&ts, "u-miso").await;
    assert!(!instructions(&fake, 3).contains("Miso"), "forgotten after the delete: {}", instructions(&fake, 3));
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memories_api_lists_and_deletes_and_refuses_bad_credentials() {
    let fake = FakeOpenAi::start(FakeOptions::default(), vec![]).await;
    let ts = TestServer::start_openai(&fake.url(), |c| {
        keys(c);
        c.openai.turn_detection = kotodama::providers::openai::protocol::TurnDetection::Local;
    })
    .await;
    let (id, token, client) = session_of(&ts, "u-list").await;
    client.send_text(r#"{"type":"text","text":"I love jazz. I have to call my sister tomorrow."}"#).await;
    // The typed turn is in the transcript once the session has it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while ts.transcript_json(&id, &token).await.as_array().is_none_or(Vec::is_empty) {
        assert!(Instant::now() < deadline, "the typed turn never reached the transcript");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    end(&ts, &id, &token).await;
    client.close().await;
    let learnt = memories_learnt(&ts, "u-list").await;
    let kinds: Vec<&str> = learnt.iter().filter_map(|m| m["kind"].as_str()).collect();
    assert_eq!(learnt.len(), 2, "{learnt:?}");
    assert!(kinds.contains(&"preference") && kinds.contains(&"thread"), "{learnt:?}");

    assert_eq!(call(&ts, "GET", "/v1/users/u-list/memories", "not-a-key-at-all-000000", None).await.0, 401);
    let res = ts.http.get(format!("{}/v1/users/u-list/memories", ts.base)).send().await.unwrap();
    assert_eq!(res.status(), 401, "no credential");
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    let (status, v) = call(&ts, "DELETE", "/v1/users/u-list/memories/mem_unknown", USER_KEY, None).await;
    assert_eq!((status, v["code"].as_str()), (404, Some("unknown_memory")), "{v}");
    let one = learnt[0]["id"].as_str().unwrap();
    let (status, v) = call(&ts, "DELETE", &format!("/v1/users/u-list/memories/{one}"), USER_KEY, None).await;
    assert_eq!((status, v["deleted"].as_u64()), (200, Some(1)), "{v}");
    let (status, v) = call(&ts, "DELETE", "/v1/users/u-list/memories", USER_KEY, None).await;
    assert_eq!((status, v["deleted"].as_u64()), (200, Some(1)), "the other one: {v}");
    let (_, v) = call(&ts, "GET", "/v1/users/u-list/memories", USER_KEY, None).await;
    assert_eq!(v["memories"], json!([]));
}

fn endpoint(fake: &Fake) -> Endpoint {
    let mut ep = Endpoint::new(&fake.url(), "test-model");
    ep.timeout = Duration::from_secs(5);
    ep
}

/// The cascade with every stage on `fake`.
fn cascade_on(fake: &Fake) -> Arc<dyn RealtimeProvider> {
    let c = client();
    let cfg = CascadeConfig {
        name: "cascade".into(),
        stt: vec![Arc::new(OpenAiStt::new(endpoint(fake), c.clone(), None))],
        llm: vec![Arc::new(OpenAiChat::new(endpoint(fake), c.clone()))],
        tts: vec![Arc::new(OpenAiSpeech::new(endpoint(fake), c))],
        token_budget: 2000,
        max_reply_tokens: 200,
    };
    Arc::new(CascadeProvider::new(cfg).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_chat_model_embeddings_and_pgvector_the_cascade_prompt_remembers_on_postgres() {
    let db = PgTestDb::create().await;
    let answer = json!({"memories": [{"kind": "fact", "text": FACT}]}).to_string();
    let memory_server =
        start_fake(FakeBehavior { llm_script: vec![(Duration::from_millis(5), answer)], ..Default::default() }).await;
    let models = start_fake(FakeBehavior {
        llm_script: json_deltas("happy", "Nice to meet you.", 8, Duration::from_millis(5)),
        tts_ms_per_char: 5,
        ..Default::default()
    })
    .await;
    let server_endpoint =
        |f: &Fake| Some(MemoryEndpoint { base_url: f.url(), model: "test-model".into(), api_key: None });
    let (chat, embeddings) = (server_endpoint(&memory_server), server_endpoint(&memory_server));
    let url = db.url.clone();
    let provider = cascade_on(&models);
    let ts = TestServer::start_with_providers(
        move |c| {
            keys(c);
            c.provider = Some("cascade".into());
            c.database_url = url;
            c.memory.chat = chat;
            c.memory.embeddings = embeddings;
        },
        move |_| vec![provider],
    )
    .await;

    let (id1, token1, mut client) = session_of(&ts, "u-pg").await;
    say(&mut client, "My dog is called Miso.", 1).await;
    end(&ts, &id1, &token1).await;
    client.close().await;
    let learnt = memories_learnt(&ts, "u-pg").await;
    assert_eq!(learnt[0]["text"], FACT, "{learnt:?}");
    // The chat model read the heard transcript; the memory was embedded into pgvector.
    let asked = memory_server.log().llm;
    assert!(asked[0].1.to_string().contains("My dog is called Miso."), "{:?}", asked[0].1);
    assert!(memory_server.log().embeddings.contains(&vec![FACT.to_owned()]));
    let store = kotodama::store::sql::SqlStore::connect(&db.url).await.unwrap();
    let row = sqlx::query("SELECT vector_dims(embedding) AS dims FROM memories WHERE user_id = 'u-pg'")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(sqlx::Row::get::<i32, _>(&row, "dims"), 64, "stored as a pgvector vector");

    // Session 2: the cascade's system prompt carries the memory.
    let (_id2, _token2, mut client) = session_of(&ts, "u-pg").await;
    say(&mut client, "Hello again.", 1).await;
    let prompts = models.log().llm;
    let system = prompts.last().unwrap().1["messages"][0]["content"].as_str().unwrap().to_owned();
    assert!(system.contains("You are Kai.") && system.contains(FACT), "system prompt: {system}");
    client.close().await;

    // Recall by meaning: the query is embedded and ranked by pgvector, per user.
    let mut config = Config::default();
    config.memory.embeddings = server_endpoint(&memory_server);
    let memory = kotodama::memory::Memory::new(&config, store.pool().clone(), "postgres").await.unwrap();
    let owner = |u: &str| kotodama::memory::Owner { user_id: u.into(), character: "kai".into() };
    let tool = memory.recall_tool(owner("u-pg"));
    let out = (tool.handler)(json!({"query": "what is the dog called"})).await.unwrap();
    assert_eq!(out.output["memories"][0]["text"], FACT, "{}", out.output);
    assert!(memory_server.log().embeddings.contains(&vec!["what is the dog called".to_owned()]));
    let other = memory.recall(&owner("u-stranger"), "dog").await.unwrap();
    assert!(other.is_empty(), "another user's recall finds nothing: {other:?}");
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_keeps_the_newest_and_drops_the_old_and_lexical_recall_ranks_by_words() {
    use kotodama::memory::{Kind, Owner, store::MemoryStore};
    use kotodama::store::{Store, StoredSession, StoredState};
    let dir = temp_dir("memory-prune");
    let sql = kotodama::store::sql::SqlStore::connect(&format!("sqlite://{}/k.db", dir.display())).await.unwrap();
    let now = std::time::SystemTime::now();
    sql.create_session(&StoredSession {
        id: "sess_prune".into(),
        character: "kai".into(),
        provider: "scripted".into(),
        user_id: Some("u-prune".into()),
        api_key_id: None,
        node_id: "n".into(),
        state: StoredState::Ended,
        end_reason: Some("client_request".into()),
        created_at: now,
        connected_at: None,
        ended_at: Some(now),
    })
    .await
    .unwrap();
    let store = MemoryStore::new(sql.pool().clone(), "sqlite", false).await.unwrap();
    let owner = Owner { user_id: "u-prune".into(), character: "kai".into() };
    let texts =
        ["The user has a cat.", "The user's dog is called Miso.", "The user loves jazz.", "The user lives in Osaka."];
    let items: Vec<(Kind, String, Option<Vec<f32>>)> =
        texts.iter().map(|t| (Kind::Fact, (*t).to_owned(), None)).collect();
    assert_eq!(store.insert(&owner, "sess_prune", None, &items).await.unwrap(), 4);
    assert_eq!(store.insert(&owner, "sess_prune", None, &items[..1]).await.unwrap(), 0, "no duplicates");
    assert_eq!(store.insert(&owner, "sess_gone", None, &items[..1]).await.unwrap(), 0, "no session, no memory");

    let found = store.search_lexical(&owner, "what is the name of my dog", 5).await.unwrap();
    assert_eq!(found.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(), ["The user's dog is called Miso."]);
    let other = Owner { user_id: "u-else".into(), character: "kai".into() };
    assert!(store.search_lexical(&other, "dog", 5).await.unwrap().is_empty(), "per user");

    assert_eq!(store.prune(&owner, 2, None).await.unwrap(), 2);
    let left: Vec<String> = store.newest(&owner, 10).await.unwrap().into_iter().map(|m| m.text).collect();
    assert_eq!(left, ["The user lives in Osaka.", "The user loves jazz."], "the newest two stay");
    assert!(store.search_lexical(&owner, "dog", 5).await.unwrap().is_empty(), "the index follows the delete");
    let later = now + Duration::from_secs(60);
    assert_eq!(store.prune(&owner, 10, Some(later)).await.unwrap(), 2, "older than the cut-off");
    assert!(store.newest(&owner, 10).await.unwrap().is_empty());
    sql.close().await;
    let _ = std::fs::remove_dir_all(dir);
}
