//! The uplink entry point: a stream of RTP packets (any sequence numbers, timestamps, payload
//! types, SSRCs, arrival times and payloads) through the reorder window, Opus decode, VAD and
//! resampler, with timeouts, exactly as the session task drives it.
//!
//! Input: records of `[seq:2][timestamp:4][pt:1][ssrc:1][arrival step ms:1][len:1][payload:len]`.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use media::{RtpIn, Uplink, UplinkConfig, UplinkEvent};

fuzz_target!(|data: &[u8]| {
    let cfg = UplinkConfig { opus_payload_type: Some(111), ..UplinkConfig::default() };
    let up = &mut Uplink::new(cfg).expect("default config is valid");
    let mut now = Duration::ZERO;
    let mut rest = data;
    while rest.len() >= 10 {
        let seq = u16::from_be_bytes([rest[0], rest[1]]);
        let timestamp = u32::from_be_bytes([rest[2], rest[3], rest[4], rest[5]]);
        let payload_type = if rest[6] & 1 == 0 { 111 } else { rest[6] >> 1 };
        let ssrc = u32::from(rest[7] & 3);
        now += Duration::from_millis(u64::from(rest[8]));
        let len = usize::from(rest[9]).min(rest.len() - 10);
        let payload = &rest[10..10 + len];
        rest = &rest[10 + len..];
        if let Some(due) = up.next_timeout().filter(|d| *d < now) {
            up.handle_timeout(due);
            drain(up);
        }
        up.push(now, RtpIn { seq, timestamp, payload_type, ssrc, payload });
        drain(up);
    }
    if let Some(due) = up.next_timeout() {
        up.handle_timeout(due);
        drain(up);
    }
});

fn drain(up: &mut Uplink) {
    let rate = up.config().output_rate_hz;
    let mut guard = 0;
    while let Some(ev) = up.poll() {
        if let UplinkEvent::Audio(pcm) = ev {
            assert_eq!(pcm.rate_hz, rate);
        }
        guard += 1;
        assert!(guard < 100_000, "poll never ends");
    }
}
