//! Golden JSON for every data-channel event, both directions, and the client parser's errors.
//!
//! The fixtures in `tests/fixtures/events/{server,client}/<type>.json` are the wire format as
//! clients see it; a change that alters them is a protocol change.

use std::collections::BTreeSet;
use std::path::PathBuf;

use signaling::events::{
    AgentState, ClientEvent, Emotion, EventError, MAX_CLIENT_MESSAGE, MAX_IMAGE_MESSAGE, PROTOCOL_VERSION, Role,
    ServerEvent, Viseme, parse_client_message,
};

fn fixture_dir(direction: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/events").join(direction)
}

fn fixture(direction: &str, kind: &str) -> String {
    let path = fixture_dir(direction).join(format!("{kind}.json"));
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("missing fixture {}: {e}", path.display()))
        .trim_end()
        .to_owned()
}

fn fixture_names(direction: &str) -> BTreeSet<String> {
    std::fs::read_dir(fixture_dir(direction))
        .expect("fixture dir exists")
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".json")).map(str::to_owned))
        .collect()
}

/// One sample of every server event, matching the fixtures.
fn server_samples() -> Vec<ServerEvent> {
    vec![
        ServerEvent::session_ready("sess_4pQeR2vX9kLmN0aB1cD2eF", "aoi", "openai"),
        ServerEvent::State { state: AgentState::Speaking },
        ServerEvent::UserSpeechStarted { at_ms: 12840 },
        ServerEvent::UserSpeechStopped { at_ms: 14120 },
        ServerEvent::Transcript {
            role: Role::Agent,
            item_id: "item_7".into(),
            text: "Hello! How can I help?".into(),
            is_final: true,
        },
        ServerEvent::Emotion { emotion: Emotion::Happy, item_id: Some("item_7".into()) },
        ServerEvent::Viseme { item_id: "item_7".into(), viseme: Viseme::Aa, start_ms: 120, duration_ms: 80 },
        ServerEvent::AgentInterrupted { item_id: "item_7".into(), played_ms: 1460 },
        ServerEvent::Error { code: "bad_message".into(), message: "bad \"text\" message: missing field `text`".into() },
        ServerEvent::Pong,
        ServerEvent::SessionEnded { reason: "server_shutdown".into() },
        ServerEvent::AgentNotification {
            text: "The train leaves at 9:40.".into(),
            source: "travel-agent".into(),
            status: "completed".into(),
        },
        ServerEvent::Gesture { gesture: "wave".into(), item_id: Some("item_7".into()) },
        ServerEvent::Moderation { category: "deny".into(), item_id: "item_7".into(), source: "agent".into() },
        ServerEvent::BudgetExceeded {
            kind: "tokens".into(),
            scope: "session".into(),
            limit: 20000,
            used: 20412,
            unit: "tokens".into(),
            action: "end".into(),
        },
        ServerEvent::TranscriptTranslation {
            role: Role::Agent,
            item_id: "item_7".into(),
            text: "こんにちは！何かお手伝いしましょうか？".into(),
            language: "ja".into(),
        },
        ServerEvent::ToolCall {
            call_id: "call_42".into(),
            name: "get_weather".into(),
            arguments: r#"{"city":"Tokyo"}"#.into(),
        },
    ]
}

fn client_samples() -> Vec<ClientEvent> {
    vec![
        ClientEvent::Text { text: "What is the weather like?".into() },
        ClientEvent::Interrupt,
        ClientEvent::Ping,
        ClientEvent::Image { data: "data:image/png;base64,iVBORw0KGgo=".into() },
        ClientEvent::SessionUpdate {
            language: Some("ja".into()),
            instructions: Some("Keep answers short.".into()),
            voice: None,
            tools: Some(vec![signaling::events::ToolDeclaration {
                name: "get_weather".into(),
                description: "The weather in a city".into(),
                parameters: serde_json::json!({"type":"object","properties":{"city":{"type":"string"}}}),
            }]),
        },
        ClientEvent::ToolOutput { call_id: "call_42".into(), output: r#"{"sky":"sunny","celsius":21}"#.into() },
    ]
}

#[test]
fn every_server_event_serialises_to_its_golden_fixture() {
    for event in server_samples() {
        let expected = fixture("server", event.type_name());
        assert_eq!(event.to_json(), expected, "server event {} does not match its fixture", event.type_name());
    }
}

#[test]
fn every_server_fixture_deserialises_to_the_sample() {
    for event in server_samples() {
        let parsed: ServerEvent = serde_json::from_str(&fixture("server", event.type_name()))
            .unwrap_or_else(|e| panic!("fixture {} must parse: {e}", event.type_name()));
        assert_eq!(parsed, event);
        let again: ServerEvent = serde_json::from_str(&parsed.to_json()).expect("round trip parses");
        assert_eq!(again, event, "round trip of {}", event.type_name());
    }
}

#[test]
fn fixtures_cover_every_event_type_and_nothing_else() {
    let server: BTreeSet<String> = server_samples().iter().map(|e| e.type_name().to_owned()).collect();
    assert_eq!(server, ServerEvent::TYPES.iter().map(|s| s.to_string()).collect(), "one sample per server event type");
    assert_eq!(fixture_names("server"), server);
    let client: BTreeSet<String> = client_samples().iter().map(|e| e.type_name().to_owned()).collect();
    assert_eq!(client, ClientEvent::TYPES.iter().map(|s| s.to_string()).collect());
    assert_eq!(fixture_names("client"), client);
}

#[test]
fn every_client_fixture_parses_and_round_trips() {
    for event in client_samples() {
        let golden = fixture("client", event.type_name());
        let parsed = parse_client_message(golden.as_bytes())
            .unwrap_or_else(|e| panic!("{} fixture must parse: {e}", event.type_name()))
            .unwrap_or_else(|| panic!("{} must be a known type", event.type_name()));
        assert_eq!(parsed, event);
        assert_eq!(event.to_json(), golden, "client event {} serialises", event.type_name());
    }
}

#[test]
fn session_ready_carries_protocol_1() {
    assert_eq!(PROTOCOL_VERSION, 1);
    let json: serde_json::Value =
        serde_json::from_str(&ServerEvent::session_ready("s", "c", "p").to_json()).expect("valid JSON");
    assert_eq!(json["protocol"], 1);
}

#[test]
fn emotion_without_item_id_omits_the_field_and_unknown_names_survive() {
    let event = ServerEvent::Emotion { emotion: "excited".parse().expect("infallible"), item_id: None };
    assert_eq!(event.to_json(), r#"{"type":"emotion","emotion":"excited"}"#);
    let back: ServerEvent = serde_json::from_str(&event.to_json()).expect("parses");
    assert_eq!(back, event);
}

#[test]
fn every_agent_state_and_role_uses_the_contract_names() {
    let states = [
        (AgentState::Initializing, "initializing"),
        (AgentState::Listening, "listening"),
        (AgentState::Thinking, "thinking"),
        (AgentState::Speaking, "speaking"),
    ];
    for (state, name) in states {
        assert_eq!(ServerEvent::State { state }.to_json(), format!(r#"{{"type":"state","state":"{name}"}}"#));
    }
    assert_eq!(serde_json::to_string(&Role::User).expect("ok"), r#""user""#);
    assert_eq!(serde_json::to_string(&Role::Agent).expect("ok"), r#""agent""#);
}

#[test]
fn every_viseme_round_trips_in_a_viseme_event() {
    for viseme in Viseme::ALL {
        let event = ServerEvent::Viseme { item_id: "i".into(), viseme, start_ms: 0, duration_ms: 40 };
        let json = event.to_json();
        assert!(json.contains(&format!(r#""viseme":"{}""#, viseme.as_str())), "{json}");
        assert_eq!(serde_json::from_str::<ServerEvent>(&json).expect("parses"), event);
    }
    assert!(
        serde_json::from_str::<ServerEvent>(
            r#"{"type":"viseme","item_id":"i","viseme":"AA","start_ms":0,"duration_ms":1}"#
        )
        .is_err(),
        "viseme names are case-sensitive and the set is closed"
    );
}

#[test]
fn unknown_client_type_is_ignored() {
    assert_eq!(parse_client_message(br#"{"type":"response.create","foo":1}"#), Ok(None));
}

#[test]
fn known_client_type_ignores_extra_fields() {
    assert_eq!(parse_client_message(br#"{"type":"ping","id":42}"#), Ok(Some(ClientEvent::Ping)));
}

#[test]
fn malformed_client_messages_get_specific_codes() {
    let cases: [(&[u8], &str); 9] = [
        (b"\xff\xfe{}", "invalid_utf8"),
        (b"{not json", "invalid_json"),
        (b"", "invalid_json"),
        (b"[1,2]", "not_an_object"),
        (b"\"ping\"", "not_an_object"),
        (br#"{"text":"hi"}"#, "missing_type"),
        (br#"{"type":7}"#, "invalid_type"),
        (br#"{"type":"text"}"#, "bad_message"),
        (br#"{"type":"text","text":5}"#, "bad_message"),
    ];
    for (input, code) in cases {
        let err =
            parse_client_message(input).expect_err(&format!("{:?} must be rejected", String::from_utf8_lossy(input)));
        assert_eq!(err.code(), code, "for {:?}: {err}", String::from_utf8_lossy(input));
        match err.to_server_event() {
            ServerEvent::Error { code: c, .. } => assert_eq!(c, code),
            other => panic!("expected an error event, got {other:?}"),
        }
    }
}

#[test]
fn oversized_message_is_rejected_before_parsing() {
    // Garbage past the image limit: must be TooLarge, not NotJson, proving size is checked first.
    let big = vec![b'x'; MAX_IMAGE_MESSAGE + 1];
    assert_eq!(
        parse_client_message(&big),
        Err(EventError::TooLarge { len: MAX_IMAGE_MESSAGE + 1, limit: MAX_IMAGE_MESSAGE })
    );
    assert_eq!(parse_client_message(&big).map_err(|e| e.code()), Err("message_too_large"));
    // Exactly at the limit is parsed.
    let pad = MAX_CLIENT_MESSAGE - r#"{"type":"text","text":""}"#.len();
    let at_limit = format!(r#"{{"type":"text","text":"{}"}}"#, "a".repeat(pad));
    assert_eq!(at_limit.len(), MAX_CLIENT_MESSAGE);
    assert!(matches!(parse_client_message(at_limit.as_bytes()), Ok(Some(ClientEvent::Text { .. }))));
    // One byte more is too large for anything but an image.
    let over = format!(r#"{{"type":"text","text":"{}"}}"#, "a".repeat(pad + 1));
    assert_eq!(
        parse_client_message(over.as_bytes()),
        Err(EventError::TooLarge { len: MAX_CLIENT_MESSAGE + 1, limit: MAX_CLIENT_MESSAGE })
    );
    let image = format!(r#"{{"type":"image","data":"data:image/jpeg;base64,{}"}}"#, "A".repeat(40 * 1024));
    assert!(matches!(parse_client_message(image.as_bytes()), Ok(Some(ClientEvent::Image { .. }))));
}

#[test]
fn deeply_nested_json_is_an_error_not_a_crash() {
    let nested = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    assert_eq!(parse_client_message(nested.as_bytes()).map_err(|e| e.code()), Err("invalid_json"));
}
