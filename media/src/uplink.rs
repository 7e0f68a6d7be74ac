//! The uplink: RTP Opus packets from the client's microphone -> decoded, concealed 48 kHz PCM
//! -> 10 ms frames -> VAD -> resampled to the provider's input rate.
//!
//! Drive it with [`Uplink::push_rtp`] per packet, then [`Uplink::poll`] until `None`. Events come
//! out in stream order: a speech edge is yielded before the audio of the 10 ms frame that
//! completed it. Output not polled before the next push is discarded (and counted), which keeps
//! the internal buffers bounded and allocation-free.
//!
//! Loss handling, by 16-bit RTP sequence number with wraparound:
//! - next in order: decode;
//! - a gap of `n` packets: conceal up to [`UplinkConfig::max_concealment`] (default 100 ms):
//!   PLC for all but the last missing frame, and FEC (LBRR) from the arriving packet for the last
//!   one when it carries it; the rest of a longer gap is skipped, not concealed;
//! - same or older (within 100 packets): dropped and counted as late/duplicate;
//! - a jump of >= 3000 packets forward or > 100 back: the stream restarted; the decoder is reset
//!   and nothing is concealed;
//! - a payload libopus rejects (empty, truncated, random, oversized): counted as a decode error
//!   and concealed as one lost frame. Nothing here panics on input.

use std::collections::VecDeque;
use std::time::Duration;

use crate::MediaError;
use crate::codec::{MAX_PACKET_SAMPLES, OpusDecoder, packet_has_fec, packet_samples};
use crate::pcm::{CHUNK_SAMPLES, FRAME_SAMPLES, OPUS_RATE, PcmRef, duration_to_samples, samples_to_duration};
use crate::resample::{Alignment, Resampler};
use crate::vad::{Vad, VadConfig, VadEdge};

/// Reordering window: packets up to this far behind the newest are "late", not a restart.
pub const MAX_MISORDER: u16 = 100;
/// Forward jumps this large are a stream restart, not loss (RFC 3550's MAX_DROPOUT).
pub const MAX_DROPOUT: u16 = 3000;

/// Uplink settings. Defaults: 24 kHz out, default VAD, 100 ms concealment cap.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UplinkConfig {
    /// Rate the provider takes, 8000..=48000 Hz (48000 = no resampling). Default 24000.
    pub output_rate_hz: u32,
    /// Voice activity detection.
    pub vad: VadConfig,
    /// Most audio synthesized for one gap (PLC + FEC). Default 100 ms.
    pub max_concealment: Duration,
}

impl Default for UplinkConfig {
    fn default() -> Self {
        Self { output_rate_hz: 24_000, vad: VadConfig::default(), max_concealment: Duration::from_millis(100) }
    }
}

/// One output of the uplink, in stream order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UplinkEvent<'a> {
    /// Decoded audio at `output_rate_hz`, borrowed until the next call on the uplink.
    Audio(PcmRef<'a>),
    /// The user started speaking; `at` is the stream position of the first voiced frame.
    SpeechStarted {
        /// Stream position (48 kHz sample count since the first packet, as time).
        at: Duration,
    },
    /// The user stopped speaking; `at` is the stream position of the end of the last voiced frame.
    SpeechStopped {
        /// Stream position.
        at: Duration,
    },
}

/// Counters since the uplink was built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UplinkStats {
    /// Packets handed to `push_rtp`.
    pub packets: u64,
    /// Sequence numbers never seen (inferred from gaps).
    pub lost: u64,
    /// Frames synthesized by packet-loss concealment.
    pub plc_frames: u64,
    /// Frames recovered from in-band FEC.
    pub fec_frames: u64,
    /// Packets dropped as duplicates or arriving after a newer one.
    pub late_or_duplicate: u64,
    /// Payloads libopus rejected (each concealed as one frame, counted in `plc_frames`).
    pub decode_errors: u64,
    /// Stream restarts (huge sequence jumps).
    pub resets: u64,
    /// Decoded + concealed audio (the stream position).
    pub decoded: Duration,
    /// Audio synthesized by PLC/FEC.
    pub concealed: Duration,
    /// Frames classified as voice.
    pub speech: Duration,
    /// Speech-start edges.
    pub utterances: u64,
    /// Output samples discarded because they were not polled before the next push.
    pub discarded_samples: u64,
    /// Arrival time of the latest packet.
    pub last_arrival: Option<Duration>,
}

/// Uplink pipeline state; see the module docs.
pub struct Uplink {
    cfg: UplinkConfig,
    dec: OpusDecoder,
    vad: Vad,
    rs: Resampler,
    pcm48: Vec<i16>,
    carry: [i16; CHUNK_SAMPLES],
    carry_len: usize,
    out: Vec<i16>,
    out_read: usize,
    edges: VecDeque<(usize, VadEdge)>,
    last_seq: Option<u16>,
    last_packet_samples: usize,
    stream_samples: u64,
    stats: UplinkStats,
}

impl std::fmt::Debug for Uplink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uplink").field("cfg", &self.cfg).field("stats", &self.stats).finish_non_exhaustive()
    }
}

impl Uplink {
    /// Builds the pipeline; all buffers are sized here.
    pub fn new(cfg: UplinkConfig) -> Result<Self, MediaError> {
        if !(8_000..=48_000).contains(&cfg.output_rate_hz) {
            return Err(MediaError::InvalidConfig {
                key: "uplink.output_rate_hz",
                reason: "must be 8000..=48000 Hz (the provider's input rate, e.g. 24000 or 16000)",
            });
        }
        if cfg.max_concealment < crate::pcm::FRAME || cfg.max_concealment > Duration::from_secs(1) {
            return Err(MediaError::InvalidConfig { key: "uplink.max_concealment", reason: "must be 20 ms ..= 1 s" });
        }
        let vad = Vad::new(cfg.vad, OPUS_RATE)?;
        let rs = Resampler::new(OPUS_RATE, cfg.output_rate_hz, Alignment::Stream)?;
        // Worst case per push: the concealment cap (rounded up to one max packet) + one FEC frame
        // + the packet itself + a partial 10 ms carry, at 48 kHz; the output rate is <= 48 kHz.
        let max_in =
            duration_to_samples(cfg.max_concealment, OPUS_RATE) as usize + 3 * MAX_PACKET_SAMPLES + CHUNK_SAMPLES;
        let out_cap = max_in + rs.chunk_out().max(CHUNK_SAMPLES);
        Ok(Self {
            cfg,
            dec: OpusDecoder::new()?,
            vad,
            rs,
            pcm48: vec![0; MAX_PACKET_SAMPLES],
            carry: [0; CHUNK_SAMPLES],
            carry_len: 0,
            out: Vec::with_capacity(out_cap),
            out_read: 0,
            edges: VecDeque::with_capacity(max_in / CHUNK_SAMPLES + 4),
            last_seq: None,
            last_packet_samples: FRAME_SAMPLES,
            stream_samples: 0,
            stats: UplinkStats::default(),
        })
    }

    /// The settings in force.
    pub fn config(&self) -> &UplinkConfig {
        &self.cfg
    }

    /// Takes one RTP packet: `now` = arrival (media time since session start), `seq` its RTP
    /// sequence number, `payload` the Opus payload. Then call [`Uplink::poll`] until `None`.
    pub fn push_rtp(&mut self, now: Duration, seq: u16, payload: &[u8]) {
        if self.out_read < self.out.len() {
            self.stats.discarded_samples += (self.out.len() - self.out_read) as u64;
        }
        self.out.clear();
        self.out_read = 0;
        self.edges.clear();
        self.stats.packets += 1;
        self.stats.last_arrival = Some(now);

        if let Some(last) = self.last_seq {
            let d = seq.wrapping_sub(last);
            if d == 0 {
                self.stats.late_or_duplicate += 1;
                return;
            }
            if d >= 0x8000 {
                if 0u16.wrapping_sub(d) <= MAX_MISORDER {
                    self.stats.late_or_duplicate += 1;
                    return;
                }
                self.restart();
            } else if d >= MAX_DROPOUT {
                self.restart();
            } else if d > 1 {
                self.conceal_gap(u64::from(d - 1), payload);
            }
        }
        self.last_seq = Some(seq);

        let decoded = if payload.is_empty() { None } else { self.dec.decode(payload, &mut self.pcm48).ok() };
        match decoded {
            Some(n) if n > 0 => {
                self.last_packet_samples = n.min(MAX_PACKET_SAMPLES);
                self.feed_decoded(n);
            }
            _ => {
                self.stats.decode_errors += 1;
                self.plc(self.last_packet_samples);
            }
        }
    }

    /// Next output of the last push, in stream order; `None` when drained.
    pub fn poll(&mut self) -> Option<UplinkEvent<'_>> {
        if let Some(&(at_out, edge)) = self.edges.front()
            && at_out <= self.out_read
        {
            self.edges.pop_front();
            return Some(match edge {
                VadEdge::Started { at } => UplinkEvent::SpeechStarted { at },
                VadEdge::Stopped { at } => UplinkEvent::SpeechStopped { at },
            });
        }
        let end = self.edges.front().map_or(self.out.len(), |&(o, _)| o).min(self.out.len());
        if self.out_read < end {
            let start = self.out_read;
            self.out_read = end;
            return Some(UplinkEvent::Audio(PcmRef::new(self.cfg.output_rate_hz, &self.out[start..end])));
        }
        None
    }

    /// Counters.
    pub fn stats(&self) -> UplinkStats {
        let mut s = self.stats;
        s.decoded = samples_to_duration(self.stream_samples, OPUS_RATE);
        s.speech = self.vad.voiced();
        s
    }

    /// Algorithmic delay of the resampler (output lags the stream position by this much).
    pub fn resampler_delay(&self) -> Duration {
        self.rs.delay()
    }

    /// In an utterance (between SpeechStarted and SpeechStopped).
    pub fn is_speaking(&self) -> bool {
        self.vad.is_speaking()
    }

    /// Stream position: audio decoded or concealed so far.
    pub fn position(&self) -> Duration {
        samples_to_duration(self.stream_samples, OPUS_RATE)
    }

    fn restart(&mut self) {
        self.stats.resets += 1;
        self.dec.reset();
    }

    fn conceal_gap(&mut self, lost: u64, next: &[u8]) {
        self.stats.lost += lost;
        // The missing packets are assumed as long as the last good one; the FEC frame is as
        // long as the packet carrying it (what libopus expects for `decode_fec`).
        let plc_frame = self.last_packet_samples;
        let cap = duration_to_samples(self.cfg.max_concealment, OPUS_RATE) as usize;
        let n = lost.min((cap / plc_frame).max(1) as u64) as usize;
        let fec = if packet_has_fec(next) { packet_samples(next).map(|len| (next, len)) } else { None };
        for i in 0..n {
            match fec {
                Some((pkt, len)) if i + 1 == n => match self.dec.decode_fec(pkt, len, &mut self.pcm48) {
                    Ok(got) if got > 0 => {
                        self.stats.fec_frames += 1;
                        self.emit_concealed(got);
                    }
                    _ => self.stats.decode_errors += 1,
                },
                _ => self.plc(plc_frame),
            }
        }
    }

    /// One frame of packet-loss concealment.
    fn plc(&mut self, frame: usize) {
        match self.dec.conceal(frame, &mut self.pcm48) {
            Ok(got) if got > 0 => {
                self.stats.plc_frames += 1;
                self.emit_concealed(got);
            }
            _ => self.stats.decode_errors += 1,
        }
    }

    fn emit_concealed(&mut self, n: usize) {
        self.stats.concealed += samples_to_duration(n as u64, OPUS_RATE);
        self.feed_decoded(n);
    }

    /// Runs `pcm48[..n]` through 10 ms framing, VAD and the resampler.
    fn feed_decoded(&mut self, n: usize) {
        let n = n.min(self.pcm48.len());
        self.stream_samples += n as u64;
        let mut i = 0;
        while i < n {
            let take = (CHUNK_SAMPLES - self.carry_len).min(n - i);
            self.carry[self.carry_len..self.carry_len + take].copy_from_slice(&self.pcm48[i..i + take]);
            self.carry_len += take;
            i += take;
            if self.carry_len < CHUNK_SAMPLES {
                break;
            }
            self.carry_len = 0;
            if let Some(edge) = self.vad.process(&self.carry) {
                if matches!(edge, VadEdge::Started { .. }) {
                    self.stats.utterances += 1;
                }
                self.edges.push_back((self.out.len(), edge));
            }
            let out = &mut self.out;
            // Sizes are fixed at construction; a failure here would be a bug, and losing 10 ms
            // of audio is the right degradation (no panic on the media path).
            let _ = self.rs.process(&self.carry, &mut |s: &[i16]| out.extend_from_slice(s));
        }
    }
}
