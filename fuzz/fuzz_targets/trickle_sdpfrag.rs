//! RFC 8840 trickle-ICE fragments (PATCH bodies): parse, render, parse again.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(frag) = signaling::sdp::parse_trickle_sdpfrag(data) {
        let text = frag.to_sdpfrag(Some("0"));
        let again = signaling::sdp::parse_trickle_sdpfrag(text.as_bytes()).expect("a rendered sdpfrag parses");
        assert_eq!(again.candidates.len(), frag.candidates.len());
    }
});
