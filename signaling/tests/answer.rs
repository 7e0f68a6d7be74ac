//! The answer checker refuses answers that cannot work for the offer they answer (issue 12,
//! kind 1): each rule broken on its own, starting from an answer that passes.

use signaling::answer::{AnswerError, check_answer};
use signaling::sdp::{SetupRole, ValidOffer, validate_offer};

fn offer(name: &str) -> ValidOffer {
    let path = format!("{}/../tests/data/offers/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    validate_offer(text.as_bytes()).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// A working answer to Chrome's offer: the same sections, `a=setup:active`, the server's track.
fn good_answer() -> String {
    offer("chrome.sdp").sdp().replace("a=setup:actpass", "a=setup:active")
}

fn code(offer: &ValidOffer, answer: &str) -> &'static str {
    match check_answer(offer, answer) {
        Ok(()) => "ok",
        Err(e) => e.code(),
    }
}

#[test]
fn a_working_answer_passes() {
    assert_eq!(code(&offer("chrome.sdp"), &good_answer()), "ok");
}

#[test]
fn every_rule_broken_alone_is_refused_with_its_code() {
    let chrome = offer("chrome.sdp");
    let good = good_answer();
    let rejected_all = good.replace("m=audio 46243", "m=audio 0").replace("m=application 46243", "m=application 0");
    assert_eq!(code(&chrome, &rejected_all), "audio_rejected", "both m-lines rejected yet 201 (no BUNDLE answer)");
    let data_rejected = good.replace("m=application 46243", "m=application 0");
    assert_eq!(code(&chrome, &data_rejected), "data_rejected");
    assert_eq!(code(&chrome, &good.replacen("a=sendrecv", "a=recvonly", 1)), "answer_audio_direction");
    let no_opus = good.replace("a=rtpmap:111 opus/48000/2", "a=rtpmap:111 PCMU/8000");
    assert_eq!(code(&chrome, &no_opus), "answer_no_opus");
    let no_track: String =
        good.split_inclusive('\n').filter(|l| !l.starts_with("a=msid:") && !l.starts_with("a=ssrc:")).collect();
    assert_eq!(code(&chrome, &no_track), "answer_no_track");
    let no_bundle: String = good.split_inclusive('\n').filter(|l| !l.starts_with("a=group:BUNDLE")).collect();
    assert_eq!(code(&chrome, &no_bundle), "bundle_mismatch");
    let extra_mid = good.replace("a=group:BUNDLE 0 1", "a=group:BUNDLE 0 1 2");
    assert_eq!(code(&chrome, &extra_mid), "bundle_mismatch");
    let moved = good.replacen("a=mid:0", "a=mid:7", 1);
    assert_eq!(code(&chrome, &moved), "answer_sections");
    let fewer: String = good.split("m=application").next().unwrap().to_owned();
    assert_eq!(code(&chrome, &fewer), "answer_sections");
    assert_eq!(code(&chrome, &good.replace("a=setup:active", "a=setup:actpass")), "setup_conflict");
}

#[test]
fn an_active_offer_must_be_answered_passive() {
    let active = offer("setup_active.sdp");
    assert_eq!(active.setup(), SetupRole::Active);
    let answered_active = active.sdp().to_owned();
    let err = check_answer(&active, &answered_active).unwrap_err();
    assert!(matches!(err, AnswerError::SetupConflict { offer: "active", .. }), "{err}");
    let passive = active.sdp().replace("a=setup:active", "a=setup:passive");
    assert_eq!(code(&active, &passive), "ok");
}

#[test]
fn an_offer_without_bundle_or_with_holdconn_is_refused_before_the_stack() {
    let path = format!("{}/../tests/data/offers/gstreamer_webrtcbin_no_bundle.sdp", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(path).unwrap();
    let err = validate_offer(text.as_bytes()).unwrap_err();
    assert_eq!(err.code(), "no_bundle");
    assert!(err.to_string().contains("bundle-policy=max-bundle"), "names the fix: {err}");
    let holdconn = offer("chrome.sdp").sdp().replace("a=setup:actpass", "a=setup:holdconn");
    assert_eq!(validate_offer(holdconn.as_bytes()).unwrap_err().code(), "bad_setup");
}
