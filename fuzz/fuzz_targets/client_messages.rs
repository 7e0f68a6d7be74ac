//! Client messages on the data channel and the WebSocket: every codec of the session's links
//! (`session::link::ApiV1`, `session::neko::NekoCodec`) and the WebSocket's first message
//! (`session::ws_link::WireAudio::from_message`), fed a stream of messages exactly as a link feeds
//! them (one codec per connection, stateful), interleaved with the server events whose encoding
//! depends on that state (N.E.K.O. streams agent text as deltas of cumulative transcripts).
//!
//! Input: byte 0 picks the codec; then records of `[op:1][len:2][bytes:len]` (op 0: a client
//! message, op 1: an agent transcript to encode, op 2: a barge-in of an item).
//! Property: decoding never panics; an api-v1 event that decodes re-encodes to JSON that decodes
//! to the same event.
#![no_main]

use kotodama::session::link::{ApiV1, EventCodec};
use kotodama::session::neko::NekoCodec;
use kotodama::session::ws_link::WireAudio;
use libfuzzer_sys::fuzz_target;
use signaling::events::{Role, ServerEvent};

fuzz_target!(|data: &[u8]| {
    let Some((&which, mut rest)) = data.split_first() else { return };
    let mut codec: Box<dyn EventCodec> = match which % 3 {
        0 => Box::new(ApiV1),
        1 => Box::new(NekoCodec::default()),
        _ => {
            if let Ok(text) = std::str::from_utf8(rest) {
                let _ = WireAudio::from_message(text);
            }
            return;
        }
    };
    let mut out = Vec::new();
    while rest.len() >= 3 {
        let op = rest[0];
        let len = usize::from(u16::from_be_bytes([rest[1], rest[2]])).min(rest.len() - 3);
        let bytes = &rest[3..3 + len];
        rest = &rest[3 + len..];
        match op % 3 {
            0 => {
                if let Ok(Some(ev)) = codec.decode(bytes)
                    && which % 3 == 0
                {
                    let json = serde_json::to_vec(&ev).expect("a client event serialises");
                    let again = codec.decode(&json).expect("a re-encoded event decodes");
                    assert_eq!(again, Some(ev), "api-v1 round trip");
                }
            }
            1 => {
                let text = String::from_utf8_lossy(bytes).into_owned();
                let item_id = format!("item_{}", bytes.first().copied().unwrap_or(0) % 4);
                let is_final = bytes.last().is_some_and(|b| b & 1 == 1);
                out.clear();
                codec.encode(&ServerEvent::Transcript { role: Role::Agent, item_id, text, is_final }, &mut out);
            }
            _ => {
                let item_id = format!("item_{}", bytes.first().copied().unwrap_or(0) % 4);
                out.clear();
                codec.encode(&ServerEvent::AgentInterrupted { item_id, played_ms: 0 }, &mut out);
            }
        }
    }
});
