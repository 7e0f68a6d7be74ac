//! Hostile input on a live session: garbage on the data channel and garbage Opus. Nothing panics,
//! the client is told what was wrong, and the session goes on answering.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_data_channel_and_in_opus_does_not_break_the_session() {
    let ts = TestServer::start().await;
    let (session_id, token, offer_url) = ts.create_session().await;
    let mut client = TestClient::connect(&ts, &offer_url, &token).await;
    client
        .wait_event("listening", Duration::from_secs(10), |e| e["type"] == "state" && e["state"] == "listening")
        .await;

    // Malformed messages get `error` events with specific codes.
    client.send_text("this is not json").await;
    client
        .wait_event("invalid_json error", Duration::from_secs(5), |e| {
            e["type"] == "error" && e["code"] == "invalid_json"
        })
        .await;
    client.send_text("[1,2,3]").await;
    client
        .wait_event("not_an_object error", Duration::from_secs(5), |e| {
            e["type"] == "error" && e["code"] == "not_an_object"
        })
        .await;
    client.send_text(r#"{"type":"text","text":42}"#).await;
    client
        .wait_event("bad_message error", Duration::from_secs(5), |e| e["type"] == "error" && e["code"] == "bad_message")
        .await;
    let big = format!(r#"{{"type":"text","text":"{}"}}"#, "a".repeat(20 * 1024));
    client.send_text(&big).await;
    client
        .wait_event("message_too_large error", Duration::from_secs(5), |e| {
            e["type"] == "error" && e["code"] == "message_too_large"
        })
        .await;
    // Unknown types are ignored (no error), random binary is rejected.
    client.send_text(r#"{"type":"from.the.future","x":1}"#).await;
    let random: Vec<u8> = (0..4096).map(|_| rand::random::<u8>()).collect();
    let _ = client.dc.send(bytes::BytesMut::from(&random[..])).await;
    // A 1 MiB message: over the channel's max-message-size; it must not take the session down.
    let _ = client.dc.send(bytes::BytesMut::from(&vec![b'x'; 1024 * 1024][..])).await;

    // Garbage Opus: empty, truncated, random, oversized payloads.
    client.silence(Duration::from_millis(400)).await;
    for i in 0..50u32 {
        let payload: Vec<u8> = match i % 4 {
            0 => vec![],
            1 => vec![0xfc],                                       // TOC only, no frame data
            2 => (0..200).map(|_| rand::random::<u8>()).collect(), // random bytes
            _ => vec![0xff; 1400],                                 // code 3 with nonsense counts
        };
        client.send_payload(Bytes::from(payload)).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // The session still works: ping -> pong, and a typed message gets a spoken answer.
    client.send_text(r#"{"type":"ping"}"#).await;
    client.wait_event("pong", Duration::from_secs(5), |e| e["type"] == "pong").await;
    assert_eq!(
        client.events().iter().filter(|e| e["type"] == "error" && e["code"] == "invalid_json").count(),
        1,
        "the unknown type produced no error"
    );
    client.send_text(r#"{"type":"text","text":"Hello Aiko"}"#).await;
    client
        .wait_event("a user transcript of the typed text", Duration::from_secs(5), |e| {
            e["type"] == "transcript" && e["role"] == "user" && e["text"] == "Hello Aiko" && e["final"] == true
        })
        .await;
    client
        .silence_until("the spoken reply", Duration::from_secs(20), |evs| {
            evs.iter().any(|e| {
                e["type"] == "transcript"
                    && e["role"] == "agent"
                    && e["final"] == true
                    && e["text"].as_str().is_some_and(|t| t.starts_with("Hi! I am Aiko"))
            }) && evs.iter().rfind(|e| e["type"] == "state").is_some_and(|e| e["state"] == "listening")
        })
        .await;
    assert!(!client.events().iter().any(|e| e["type"] == "agent.interrupted"), "nothing interrupted the reply");
    let heard = client.inbox.lock().unwrap().agent_pcm.len() as f64 / 48_000.0;
    assert!(heard > 6.5, "the reply was heard after the garbage: {heard:.2} s");
    assert_eq!(ts.recorder.texts(), vec!["Hello Aiko".to_owned()]);

    let info: serde_json::Value = ts.session_json(&session_id, &token).await;
    assert_eq!(info["state"], "connected", "{info}");
    client.close().await;
}
