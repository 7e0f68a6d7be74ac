//! Shared helpers for the media tests: speech fixtures, packetizing, signal measurements.
#![allow(dead_code)]

use std::time::Duration;

use media::codec::{EncoderConfig, OpusEncoder};
use media::pcm::{FRAME_SAMPLES, Pcm};

pub const USER_QUESTION: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/user_question.wav");
pub const AGENT_REPLY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/agent_reply.wav");

pub fn user_question() -> Pcm {
    media::wav::read(USER_QUESTION).expect("tests/data/user_question.wav (48 kHz mono)")
}

pub fn agent_reply() -> Pcm {
    media::wav::read(AGENT_REPLY).expect("tests/data/agent_reply.wav (24 kHz mono)")
}

/// `before` of silence, the samples, `after` of silence (at `rate`).
pub fn pad(samples: &[i16], rate: u32, before: Duration, after: Duration) -> Vec<i16> {
    let n = |d: Duration| (d.as_millis() as u64 * u64::from(rate) / 1000) as usize;
    let mut v = vec![0; n(before)];
    v.extend_from_slice(samples);
    v.extend(std::iter::repeat_n(0, n(after)));
    v
}

/// A browser-like sender: in-band FEC with 10 % expected loss, so packets carry LBRR.
pub fn client_encoder() -> EncoderConfig {
    EncoderConfig { expected_loss_pct: 10, ..EncoderConfig::default() }
}

/// Encodes 48 kHz audio into 20 ms Opus packets (the tail zero-padded to a frame).
pub fn encode_packets(samples: &[i16], cfg: EncoderConfig) -> Vec<Vec<u8>> {
    let mut enc = OpusEncoder::new(cfg).expect("encoder");
    let mut buf = [0u8; 1500];
    samples
        .chunks(FRAME_SAMPLES)
        .map(|c| {
            let mut frame = [0i16; FRAME_SAMPLES];
            frame[..c.len()].copy_from_slice(c);
            let n = enc.encode(&frame, &mut buf).expect("encode");
            buf[..n].to_vec()
        })
        .collect()
}

pub fn energy(x: &[i16]) -> f64 {
    x.iter().map(|&s| f64::from(s) * f64::from(s)).sum()
}

pub use media::pcm::rms;

/// First and last 10 ms frame whose RMS is above `thresh`, as stream times.
pub fn energy_envelope(x: &[i16], rate: u32, thresh: f64) -> (Duration, Duration) {
    let f = (rate / 100) as usize;
    let frames: Vec<bool> = x.chunks(f).map(|c| rms(c) > thresh).collect();
    let first = frames.iter().position(|&b| b).expect("some loud frame");
    let last = frames.iter().rposition(|&b| b).expect("some loud frame");
    (Duration::from_millis(first as u64 * 10), Duration::from_millis((last as u64 + 1) * 10))
}

/// Deterministic xorshift PRNG (no rand dependency in the media crate).
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// An Opus RTP packet of one 20 ms frame: the timestamp follows the sequence number (960 per
/// packet at 48 kHz, RFC 7587), payload type 111, one SSRC.
pub fn rtp(seq: u16, payload: &[u8]) -> media::RtpIn<'_> {
    media::RtpIn { seq, timestamp: u32::from(seq).wrapping_mul(960), payload_type: 111, ssrc: 0x1234_5678, payload }
}
