//! Provider event decoding: the wire decoders of the realtime providers, on any frame a provider
//! (or something in the path pretending to be one) could send:
//! `providers::openai::protocol::parse` (Realtime server events, GA and beta names),
//! `providers::gemini::protocol::parse` (Live API `BidiGenerateContent` server messages, text or
//! binary frames) and `parse_duration` (its `timeLeft` durations),
//! `providers::nova_sonic::protocol::parse` (Bedrock bidirectional-stream output events).
//!
//! Input: byte 0 picks the decoder; the rest is one frame. Property: no panic, any result.
#![no_main]

use kotodama::providers::{gemini, nova_sonic, openai};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, frame)) = data.split_first() else { return };
    match which % 4 {
        0 => {
            if let Ok(text) = std::str::from_utf8(frame) {
                let _ = openai::protocol::parse(text);
            }
        }
        1 => {
            let _ = gemini::protocol::parse(frame);
        }
        2 => {
            if let Ok(text) = std::str::from_utf8(frame) {
                let _ = gemini::protocol::parse_duration(text);
            }
        }
        _ => {
            let _ = nova_sonic::protocol::parse(frame);
        }
    }
});
