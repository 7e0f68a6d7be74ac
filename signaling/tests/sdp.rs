//! Offer validation against real-world offers (Chrome, Firefox, webrtc-rs) and their broken
//! variants, plus RFC 8840 trickle fragments.

mod common;

use std::path::PathBuf;

use common::{without_lines, without_section};
use signaling::sdp::{Direction, SdpError, parse_trickle_sdpfrag, validate_offer};

fn fixture(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sdp").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

const OFFERS: [&str; 3] = ["chrome_offer.sdp", "firefox_offer.sdp", "webrtc_rs_offer.sdp"];

fn expect_err(sdp: &str, expected: SdpError, what: &str) {
    assert_eq!(validate_offer(sdp.as_bytes()), Err(expected), "{what}");
}

/// Each of [`OFFERS`] made `broken` is refused with `expected`.
fn every_offer_fails(broken: impl Fn(&str) -> String, expected: SdpError) {
    for name in OFFERS {
        expect_err(&broken(&fixture(name)), expected.clone(), name);
    }
}

#[test]
fn real_browser_and_webrtc_rs_offers_are_accepted() {
    for (name, opus_pt) in OFFERS.iter().zip([111u8, 109, 111]) {
        let offer = validate_offer(fixture(name).as_bytes()).unwrap_or_else(|e| panic!("{name} must be accepted: {e}"));
        assert_eq!(offer.opus_payload_type(), opus_pt, "{name}");
        assert_eq!(offer.audio_mid(), Some("0"), "{name}");
        assert_eq!(offer.data_channel_mid(), Some("1"), "{name}");
        assert_eq!(offer.sdp(), fixture(name), "{name}: the offer is passed on unchanged");
    }
}

#[test]
fn lf_only_line_endings_are_accepted() {
    let lf = fixture("chrome_offer.sdp").replace("\r\n", "\n");
    assert!(validate_offer(lf.as_bytes()).is_ok());
}

#[test]
fn non_utf8_is_400() {
    let err = validate_offer(b"v=0\r\n\xff\xfe").expect_err("must fail");
    assert_eq!(err, SdpError::NotUtf8);
    assert!(err.is_unparsable());
}

#[test]
fn not_starting_with_v0_is_400() {
    for body in ["", "hello", "{\"sdp\":\"v=0\"}", "o=- 1 1 IN IP4 0.0.0.0\r\nv=0\r\n"] {
        let err = validate_offer(body.as_bytes()).expect_err(body);
        assert_eq!(err, SdpError::NotSdp, "{body:?}");
        assert!(err.is_unparsable());
    }
}

#[test]
fn garbage_after_v0_is_400() {
    for body in [
        "v=0\r\ngarbage\r\n",
        "v=0\r\no=- x y IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n",
        "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=audio\r\n",
        "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=audio notaport UDP/TLS/RTP/SAVPF 111\r\n",
    ] {
        let err = validate_offer(body.as_bytes()).expect_err(body);
        assert!(matches!(err, SdpError::Unparsable(_)), "{body:?} should be unparsable, got {err:?}");
        assert!(err.is_unparsable());
    }
}

#[test]
fn offer_without_audio_is_422() {
    for name in OFFERS {
        let sdp = without_section(&fixture(name), "m=audio");
        let err = validate_offer(sdp.as_bytes()).expect_err(name);
        assert_eq!(err, SdpError::NoAudio, "{name}");
        assert!(!err.is_unparsable());
    }
}

#[test]
fn disabled_audio_counts_as_no_audio() {
    let sdp = fixture("firefox_offer.sdp").replace("m=audio 9 ", "m=audio 0 ");
    expect_err(&sdp, SdpError::NoAudio, "port 0 audio");
}

#[test]
fn two_audio_m_lines_are_422() {
    let base = fixture("webrtc_rs_offer.sdp");
    let audio: String = base
        .split_inclusive('\n')
        .skip_while(|l| !l.starts_with("m=audio"))
        .take_while(|l| !l.starts_with("m=application"))
        .collect::<String>()
        .replace("a=mid:0", "a=mid:2");
    let sdp = format!("{base}{audio}");
    expect_err(&sdp, SdpError::MultipleAudio(2), "two audio sections");
}

#[test]
fn audio_without_opus_is_422() {
    every_offer_fails(|offer| without_lines(offer, |l| l.contains("opus/48000")), SdpError::NoOpus);
}

#[test]
fn opus_at_the_wrong_rate_or_not_listed_on_the_m_line_is_422() {
    let wrong_rate = fixture("webrtc_rs_offer.sdp").replace("opus/48000/2", "opus/16000/1");
    expect_err(&wrong_rate, SdpError::NoOpus, "opus/16000");
    let unlisted = fixture("webrtc_rs_offer.sdp")
        .replace("m=audio 9 UDP/TLS/RTP/SAVPF 111 9 0 8", "m=audio 9 UDP/TLS/RTP/SAVPF 9 0 8");
    expect_err(&unlisted, SdpError::NoOpus, "rtpmap for a payload type not on the m-line");
}

#[test]
fn audio_must_be_sendrecv() {
    for (attr, dir) in
        [("a=recvonly", Direction::RecvOnly), ("a=sendonly", Direction::SendOnly), ("a=inactive", Direction::Inactive)]
    {
        let sdp = fixture("chrome_offer.sdp").replacen("a=sendrecv", attr, 1);
        expect_err(&sdp, SdpError::AudioDirection(dir), attr);
        let err = validate_offer(sdp.as_bytes()).expect_err(attr);
        assert_eq!(err.code(), "audio_not_sendrecv");
    }
}

#[test]
fn missing_direction_defaults_to_sendrecv_and_session_level_direction_applies() {
    let no_dir = without_lines(&fixture("chrome_offer.sdp"), |l| l == "a=sendrecv");
    assert!(validate_offer(no_dir.as_bytes()).is_ok(), "absent direction = sendrecv");
    let session_recvonly = no_dir.replacen("t=0 0\r\n", "t=0 0\r\na=recvonly\r\n", 1);
    expect_err(&session_recvonly, SdpError::AudioDirection(Direction::RecvOnly), "session-level recvonly");
}

#[test]
fn offer_without_data_channel_is_422() {
    every_offer_fails(|offer| without_section(offer, "m=application"), SdpError::NoDataChannel);
}

#[test]
fn non_sctp_application_section_is_not_a_data_channel() {
    let sdp = fixture("firefox_offer.sdp")
        .replace("m=application 9 UDP/DTLS/SCTP webrtc-datachannel", "m=application 9 UDP/BFCP *");
    expect_err(&sdp, SdpError::NoDataChannel, "BFCP is not SCTP");
}

#[test]
fn offer_without_fingerprint_is_422() {
    every_offer_fails(|offer| without_lines(offer, |l| l.starts_with("a=fingerprint")), SdpError::NoFingerprint);
}

#[test]
fn malformed_or_conflicting_fingerprints_are_422() {
    let bad = fixture("firefox_offer.sdp").replacen("a=fingerprint:sha-256 ", "a=fingerprint:sha-256 ZZ:", 1);
    expect_err(&bad, SdpError::BadFingerprint, "non-hex fingerprint");
    let other = format!("sha-256 {}", vec!["AB"; 32].join(":"));
    let conflicting =
        fixture("firefox_offer.sdp").replacen("a=mid:1\r\n", &format!("a=mid:1\r\na=fingerprint:{other}\r\n"), 1);
    expect_err(&conflicting, SdpError::ConflictingFingerprints, "two sha-256 digests");
}

#[test]
fn offer_without_ice_credentials_is_422() {
    let sdp = without_lines(&fixture("chrome_offer.sdp"), |l| l.starts_with("a=ice-pwd"));
    expect_err(&sdp, SdpError::NoIceCredentials, "no ice-pwd");
}

#[test]
fn video_sections_are_tolerated() {
    let video =
        "m=video 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\na=mid:2\r\na=recvonly\r\na=rtpmap:96 VP8/90000\r\n";
    let sdp = format!("{}{video}", fixture("firefox_offer.sdp"));
    assert!(validate_offer(sdp.as_bytes()).is_ok());
}

#[test]
fn chrome_trickle_fragment_parses() {
    let frag = parse_trickle_sdpfrag(fixture("trickle_chrome.sdpfrag").as_bytes()).expect("RFC 8840 fragment parses");
    assert_eq!(frag.ice_ufrag.as_deref(), Some("ETEn"));
    assert_eq!(frag.ice_pwd.as_deref(), Some("OtSK0WpNtpUjkY4+86js7ZQl"));
    assert_eq!(frag.candidates.len(), 3);
    assert!(frag.candidates.iter().all(|c| c.mid.as_deref() == Some("0")));
    assert!(frag.candidates[0].candidate.starts_with("candidate:1387637174 1 udp 2122260223 192.0.2.1 61764 typ host"));
    assert!(frag.candidates[2].candidate.contains("typ srflx raddr 192.0.2.1"));
    assert!(frag.end_of_candidates);
}

#[test]
fn ice_restart_fragment_has_new_credentials() {
    let frag = parse_trickle_sdpfrag(fixture("ice_restart.sdpfrag").as_bytes()).expect("parses");
    assert!(frag.has_credentials());
    assert_eq!(frag.ice_ufrag.as_deref(), Some("ysXw"));
    assert!(!frag.end_of_candidates);
}

#[test]
fn candidates_without_an_m_section_have_no_mid_and_mid_after_candidates_applies() {
    let frag = parse_trickle_sdpfrag(
        b"a=candidate:1 1 udp 1 192.0.2.1 1 typ host\r\nm=audio 9 RTP/AVP 0\r\na=candidate:2 1 udp 1 192.0.2.2 2 typ host\r\na=mid:7\r\n",
    )
    .expect("parses");
    assert_eq!(frag.candidates[0].mid, None);
    assert_eq!(frag.candidates[1].mid.as_deref(), Some("7"));
    assert!(!frag.has_credentials());
}

#[test]
fn end_of_candidates_alone_is_valid() {
    let frag = parse_trickle_sdpfrag(b"a=end-of-candidates\r\n").expect("parses");
    assert!(frag.end_of_candidates && frag.candidates.is_empty());
}

#[test]
fn broken_fragments_are_400() {
    for body in [
        &b"\xff"[..],
        b"this is not sdp",
        b"candidate:1 1 udp 1 1.2.3.4 1 typ host",
        b"ab=c",
        b"a=candidate:1 1 udp",
        b"a=ice-ufrag:",
    ] {
        let err = parse_trickle_sdpfrag(body).expect_err(&String::from_utf8_lossy(body));
        assert!(err.is_unparsable(), "{:?} -> {err:?}", String::from_utf8_lossy(body));
    }
}

#[test]
fn frag_renders_back_to_an_sdpfrag() {
    let frag = parse_trickle_sdpfrag(fixture("trickle_chrome.sdpfrag").as_bytes()).expect("parses");
    let rendered = frag.to_sdpfrag(Some("0"));
    let again = parse_trickle_sdpfrag(rendered.as_bytes()).expect("rendered frag parses");
    assert_eq!(again, frag);
}
