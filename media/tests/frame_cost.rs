//! Per-20 ms-frame work of one session's media, for instruction counts under callgrind
//! (repeatable on a loaded machine, where CPU time is not). Each `cost_*` function runs
//! [`FRAMES`] frames of one scenario; compare their inclusive instruction counts:
//!
//! ```text
//! cargo test --locked -p media --test frame_cost --no-run   # prints the binary's path
//! valgrind --tool=callgrind --toggle-collect='*frame_cost::cost_*' --callgrind-out-file=cg.out \
//!     <binary> --ignored --test-threads=1
//! callgrind_annotate --inclusive=yes cg.out | grep 'frame_cost::cost_'
//! ```
//!
//! Scenarios (BENCHMARKS.md, issue 14): both sides talking (the encoder at the media crate's
//! default complexity 5 and 48 kHz input, and as the server runs it for a 24 kHz provider:
//! `media.opus_complexity` 1, 24 kHz input); a connected silent session whose
//! client sends coded silence every 20 ms (aiortc) with and without the uplink's skip of
//! frames the sender flagged inactive; a DTX client (libwebrtc's pattern). While the agent is
//! silent the playout is polled every 20 ms, as the session's pacing does. Without callgrind the
//! tests check that each scenario does what it says (audio heard, frames skipped, packets sent).

mod common;

use std::hint::black_box;
use std::time::Duration;

use common::*;
use media::pcm::{FRAME, PcmRef};
use media::{EncoderConfig, Playout, PlayoutConfig, Uplink, UplinkConfig, UplinkEvent};

/// 30 s of media per scenario.
const FRAMES: usize = 1_500;

struct Session {
    up: Uplink,
    playout: Playout,
    buf: [u8; 1500],
    now: Duration,
    seq: u16,
    ts: u32,
    heard: usize,
    sent_bytes: usize,
}

/// The server's Opus encoder complexity (`media.opus_complexity`, default 1); the media crate's
/// own default ([`EncoderConfig::default`], 5, 48 kHz input) is the other talking scenario.
const SERVER_COMPLEXITY: u8 = 1;
/// The server's encoder input rate for a 24 kHz provider (the reply here is 24 kHz): the
/// provider's output rate, no resampler (`MediaSpec::encoder_input_rate_hz`).
const SERVER_ENCODER_RATE_HZ: u32 = 24_000;

impl Session {
    fn new(skip_inactive_frames: bool) -> Self {
        Self::with_encoder(skip_inactive_frames, EncoderConfig::default())
    }

    fn with_encoder(skip_inactive_frames: bool, encoder: EncoderConfig) -> Self {
        let up = Uplink::new(UplinkConfig { skip_inactive_frames, ..UplinkConfig::default() }).expect("uplink");
        let playout = Playout::new(PlayoutConfig { encoder, ..PlayoutConfig::default() }).expect("playout");
        Self { up, playout, buf: [0; 1500], now: Duration::ZERO, seq: 0, ts: 0, heard: 0, sent_bytes: 0 }
    }

    /// One 20 ms frame: the client's packet (`None`: nothing sent, DTX), the agent's 20 ms of
    /// 24 kHz audio (`None`: silent), the pacing tick.
    fn frame(&mut self, packet: Option<&[u8]>, agent: Option<&[i16]>) {
        if let Some(payload) = packet {
            let p = media::RtpIn { seq: self.seq, timestamp: self.ts, payload_type: 111, ssrc: 7, payload };
            self.up.push(self.now, p);
            self.seq = self.seq.wrapping_add(1);
            while let Some(ev) = self.up.poll() {
                if let UplinkEvent::Audio(a) = ev {
                    self.heard += a.samples.len();
                }
            }
        }
        self.ts = self.ts.wrapping_add(960);
        if let Some(pcm) = agent {
            self.playout.push("reply", PcmRef::new(24_000, pcm)).expect("push");
        }
        self.now += FRAME;
        if let Some(f) = self.playout.poll(self.now, &mut self.buf) {
            self.sent_bytes += f.len;
        }
        black_box(&self.buf);
    }
}

#[inline(never)]
fn cost_talking(s: &mut Session, speech: &[Vec<u8>], reply: &[i16]) {
    for i in 0..FRAMES {
        let agent = &reply[(i * 480) % (reply.len() - 480)..][..480];
        s.frame(Some(&speech[i % speech.len()]), Some(agent));
    }
}

/// As [`cost_talking`], with the encoder at the server's complexity.
#[inline(never)]
fn cost_talking_server(s: &mut Session, speech: &[Vec<u8>], reply: &[i16]) {
    for i in 0..FRAMES {
        let agent = &reply[(i * 480) % (reply.len() - 480)..][..480];
        s.frame(Some(&speech[i % speech.len()]), Some(agent));
    }
}

#[inline(never)]
fn cost_silent_decoded(s: &mut Session, silence: &[Vec<u8>]) {
    for i in 0..FRAMES {
        s.frame(Some(&silence[i % silence.len()]), None);
    }
}

#[inline(never)]
fn cost_silent_skipped(s: &mut Session, silence: &[Vec<u8>]) {
    for i in 0..FRAMES {
        s.frame(Some(&silence[i % silence.len()]), None);
    }
}

#[inline(never)]
fn cost_silent_dtx(s: &mut Session, silence: &[Vec<u8>]) {
    // libwebrtc with usedtx=1 in a long pause: a refresh frame and a 1-byte DTX packet per 400 ms.
    let dtx = [silence[0][0] & 0xFC];
    for i in 0..FRAMES {
        let packet = match i % 20 {
            0 => Some(silence[i % silence.len()].as_slice()),
            1 => Some(&dtx[..]),
            _ => None,
        };
        s.frame(packet, None);
    }
}

fn coded_silence() -> Vec<Vec<u8>> {
    // A steady stream: the encoder's first frames (its VAD settling) are not part of it.
    encode_packets(&vec![0i16; 48_000 * 3], client_encoder()).split_off(50)
}

#[test]
#[ignore = "a workload for callgrind (see the module docs)"]
fn talking_session_hears_and_sends_speech() {
    let speech = encode_packets(&user_question().samples, client_encoder());
    let reply = agent_reply().samples;
    let mut s = Session::new(true);
    cost_talking(&mut s, &speech, &reply);
    assert_eq!(s.heard, FRAMES * 480, "30 s heard at 24 kHz");
    assert!(s.sent_bytes > FRAMES * 40, "speech sent every frame: {} bytes", s.sent_bytes);
    let server = EncoderConfig {
        complexity: SERVER_COMPLEXITY,
        input_rate_hz: SERVER_ENCODER_RATE_HZ,
        ..EncoderConfig::default()
    };
    let mut s = Session::with_encoder(true, server);
    cost_talking_server(&mut s, &speech, &reply);
    assert_eq!(s.heard, FRAMES * 480, "30 s heard at 24 kHz");
    assert!(s.sent_bytes > FRAMES * 40, "speech sent every frame: {} bytes", s.sent_bytes);
}

#[test]
#[ignore = "a workload for callgrind (see the module docs)"]
fn silent_sessions_with_coded_silence_skip_or_decode_it() {
    let silence = coded_silence();
    let mut decoded = Session::new(false);
    cost_silent_decoded(&mut decoded, &silence);
    let mut skipped = Session::new(true);
    cost_silent_skipped(&mut skipped, &silence);
    assert_eq!(decoded.up.stats().inactive_packets, 0);
    assert_eq!(skipped.up.stats().inactive_packets, FRAMES as u64, "every steady silence frame skipped");
    assert_eq!(skipped.heard, decoded.heard, "the same media time either way");
    // The silent agent sends a DTX frame per 400 ms, nothing else.
    assert!(skipped.sent_bytes <= FRAMES / 20 + 1, "{} bytes", skipped.sent_bytes);
}

#[test]
#[ignore = "a workload for callgrind (see the module docs)"]
fn silent_session_with_a_dtx_client() {
    let silence = coded_silence();
    let mut s = Session::new(true);
    cost_silent_dtx(&mut s, &silence);
    assert_eq!(s.up.stats().dtx_packets, (FRAMES / 20) as u64);
}
