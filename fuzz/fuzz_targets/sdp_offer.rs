//! The SDP offer path: `validate_offer` on any body, then the answer checker with the same text
//! as the "answer" (any SDP the stack could produce must be refused or accepted, never panic).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(offer) = signaling::sdp::validate_offer(data) {
        let _ = offer.setup();
        let _ = signaling::answer::check_answer(&offer, offer.sdp());
        if let Ok(text) = std::str::from_utf8(data) {
            // The same offer answered by a mutated copy of itself.
            let answer = text.replace("actpass", "passive").replace("a=group:BUNDLE", "a=group:BUNDLE x");
            let _ = signaling::answer::check_answer(&offer, &answer);
        }
    }
});
