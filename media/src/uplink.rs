//! The uplink: RTP Opus packets from the client's microphone -> decoded, concealed PCM at the
//! provider's input rate (or 48 kHz, then resampled to it) -> 10 ms frames -> VAD -> out.
//!
//! Drive it with [`Uplink::push`] per packet, then [`Uplink::poll`] until `None`; when
//! [`Uplink::next_timeout`] passes without a packet, call [`Uplink::handle_timeout`] and poll
//! again. Events come out in stream order: a speech edge is yielded before the audio of the
//! 10 ms frame that completed it. Packets wait in a small adaptive reorder window
//! ([`crate::reorder`]) and are decoded lazily by `poll`, one at a time, so the output buffer
//! stays one packet large; decoded output not polled before the next push is discarded (and
//! counted).
//!
//! Packets of another payload type than the negotiated Opus one (telephone-event, comfort
//! noise, RED) never reach the decoder: they are counted and keep only their place in the
//! sequence (not a loss). A change of SSRC is a new stream (decoder reset, new sequence and
//! timestamp base), not a loss and not a flood of late packets.
//!
//! Media time is RTP time (RFC 3550 §5.1; Opus' RTP clock is 48 kHz, RFC 7587 §4.1): when a
//! packet's timestamp is further from the previous one than the audio decoded and concealed in
//! between (Opus DTX sends one packet per 400 ms of silence with contiguous sequence numbers, a
//! paused sender, comfort noise), the difference is filled with silence, up to
//! [`UplinkConfig::max_silence_fill`] and never more than the time between the two packets'
//! arrivals (so media time cannot run ahead of the wall clock), so the VAD and the provider see
//! the silence the user made and end the turn on time.
//!
//! DTX (RFC 7587 §3.1.3, `usedtx=1`): an Opus packet of at most [`DTX_MAX_BYTES`] bytes carries no
//! audio (a TOC byte with an empty frame, RFC 6716 §3.2.1, or libopus' 2-byte silence frames): it
//! is not decoded, its duration (from the TOC) is fed as silence, and the stream is in DTX until
//! the next larger packet. A DTX sender then goes quiet (libwebrtc sends the first DTX packet of a
//! pause and one refresh frame per 400 ms); while the VAD is still in an utterance, silence is
//! also filled on the clock ([`Uplink::next_timeout`], one 20 ms step at a time, up to the time
//! passed since the DTX packet arrived) so the turn ends `min_silence` after the speech, not when
//! the next packet comes. Once the utterance has ended, absent packets cost nothing: no timer,
//! no decode, no VAD; the gap is filled when the next packet shows it.
//!
//! Silence from a client without DTX (aiortc, browsers without `usedtx=1` keep sending a coded
//! frame every 20 ms): between utterances, a SILK frame whose own VAD flag says "no voice
//! activity" ([`crate::codec::silk_voice_inactive`]) is taken as silence of its duration without
//! decoding, like a DTX packet ([`UplinkConfig::skip_inactive_frames`]); the decoder is reset
//! before the next frame it decodes. Inside an utterance every frame is decoded, so a pause in
//! speech is heard as it was sent.
//!
//! Decode rate ([`UplinkConfig::decode_at_output_rate`]): the decoder outputs at the provider's
//! rate when libopus can (24 kHz for OpenAI Realtime, 16 kHz for Gemini Live, Nova Sonic and the
//! local cascade), which drops the 48 kHz -> provider resampler and, at 16 kHz, the decoder's own
//! upsampling of SILK's wideband output (measured per 20 ms speech frame, BENCHMARKS.md, sixth
//! round: decode + VAD + resampler 69 us at 48 kHz, 54 us at 24 kHz, 28 us at 16 kHz). The VAD
//! (libfvad, which classifies at 8 kHz whatever rate it is given) runs at the decode rate when
//! libfvad takes it (8, 16, 32, 48 kHz), else on the decoded audio resampled to 8 kHz; its edges
//! are moved back by that resampler's delay. Every position, duration and count stays in RTP
//! units (48 kHz samples, RFC 7587 §4.1) whatever the decode rate.
//!
//! Loss handling, by 16-bit RTP sequence number with wraparound, after the reorder window:
//! - next in order: decode;
//! - a gap of `n` packets: conceal up to [`UplinkConfig::max_concealment`] (default 100 ms):
//!   PLC for all but the last missing frame, and FEC (LBRR) from the arriving packet for the last
//!   one when it carries it; the rest of a longer gap is skipped, not concealed;
//! - same or older than what was released (within 100 packets): dropped and counted as
//!   late/duplicate (the reorder window's hold grows);
//! - a jump of >= 3000 packets forward or > 100 back: the stream restarted; the decoder is reset
//!   and nothing is concealed;
//! - a payload libopus rejects (empty, truncated, random, oversized): counted as a decode error
//!   and concealed as one lost frame. Nothing here panics on input.

use std::collections::VecDeque;
use std::time::Duration;

use crate::MediaError;
use crate::codec::{
    MAX_PACKET_SAMPLES, OpusDecoder, is_opus_pcm_rate, packet_has_fec, packet_samples, silk_voice_inactive,
};
use crate::pcm::{CHUNK_SAMPLES, FRAME_SAMPLES, OPUS_RATE, PcmRef, duration_to_samples, samples_to_duration};
use crate::reorder::{Inserted, MAX_PAYLOAD, ReorderWindow};
use crate::resample::{Alignment, Resampler};
use crate::vad::{Vad, VadConfig, VadEdge};

/// Reordering window: packets up to this far behind the newest are "late", not a restart.
pub const MAX_MISORDER: u16 = 100;
/// Forward jumps this large are a stream restart, not loss (RFC 3550's MAX_DROPOUT).
pub const MAX_DROPOUT: u16 = 3000;

/// Opus packets of at most this many bytes are DTX / silence frames: never decoded (libwebrtc's
/// NetEq draws the same line, `AudioDecoderOpusImpl` treating payloads of <= 2 bytes as DTX).
pub const DTX_MAX_BYTES: usize = 2;

/// A timestamp step larger than this (10 s at 48 kHz) is a new time base, not silence.
const MAX_TIMESTAMP_STEP: i64 = 480_000;
/// Silence for a timestamp gap never exceeds the time that passed between the two packets'
/// arrivals plus this: media time may not run ahead of the wall clock (a hostile sender with
/// timestamps jumping 10 s per packet would otherwise make 10 s of audio out of each 20 ms).
const SILENCE_ARRIVAL_SLACK: Duration = Duration::from_millis(60);

/// One RTP packet of the client's audio: the header fields the uplink uses (RFC 3550 §5.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RtpIn<'a> {
    /// Sequence number.
    pub seq: u16,
    /// Timestamp, in 48 kHz units for Opus (RFC 7587 §4.1).
    pub timestamp: u32,
    /// Payload type.
    pub payload_type: u8,
    /// Synchronization source.
    pub ssrc: u32,
    /// The payload (an Opus packet when `payload_type` is the negotiated Opus one).
    pub payload: &'a [u8],
}

/// Uplink settings. Defaults: 24 kHz out, default VAD, 100 ms concealment cap, every payload
/// type decoded as Opus, 100 ms reorder hold at most, 2 s silence fill at most.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UplinkConfig {
    /// Rate the provider takes, 8000..=48000 Hz (48000 = no resampling). Default 24000.
    pub output_rate_hz: u32,
    /// Voice activity detection.
    pub vad: VadConfig,
    /// Most audio synthesized for one gap (PLC + FEC). Default 100 ms.
    pub max_concealment: Duration,
    /// The negotiated Opus payload type (from the SDP, e.g. 111 for Chrome, 109 for Firefox);
    /// packets of other types are not decoded. `None` (default): every packet is taken as Opus.
    pub opus_payload_type: Option<u8>,
    /// Longest a gap waits in the reorder window for a late packet, 20 ms ..= 500 ms. The window
    /// adapts below it. Default 100 ms.
    pub max_reorder_delay: Duration,
    /// Most silence inserted for one timestamp gap (DTX, a paused sender), 0 ..= 60 s; never less
    /// than the VAD's `min_silence` + 100 ms, so a gap always ends a turn. Default 2 s.
    pub max_silence_fill: Duration,
    /// Between utterances, take frames the sender's SILK encoder flagged as inactive as silence
    /// without decoding them (see the module docs). Default true.
    pub skip_inactive_frames: bool,
    /// Decode at `output_rate_hz` when libopus can (8, 12, 16, 24 or 48 kHz; RFC 6716 §2: any
    /// decoder may output at any of these rates whatever the coded bandwidth), so no resampler
    /// runs between the decoder and the provider; other output rates are decoded at 48 kHz and
    /// resampled. Default true. False: always decode at 48 kHz (the pipeline of recordings made
    /// before this setting existed). See the module docs, "Decode rate".
    pub decode_at_output_rate: bool,
}

impl Default for UplinkConfig {
    fn default() -> Self {
        Self {
            output_rate_hz: 24_000,
            vad: VadConfig::default(),
            max_concealment: Duration::from_millis(100),
            opus_payload_type: None,
            max_reorder_delay: Duration::from_millis(100),
            max_silence_fill: Duration::from_secs(2),
            skip_inactive_frames: true,
            decode_at_output_rate: true,
        }
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
    /// Packets handed to `push`.
    pub packets: u64,
    /// Packets of another payload type than the negotiated Opus (not decoded).
    pub foreign_payload: u64,
    /// SSRC changes (each a new stream).
    pub ssrc_changes: u64,
    /// Gaps given up by the reorder window (their packets were counted in `lost`).
    pub reorder_give_ups: u64,
    /// Packets put back in order by the reorder window (arrived after a successor).
    pub reordered: u64,
    /// Silence inserted for timestamp gaps (DTX, paused sender).
    pub silence: Duration,
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
    /// DTX packets (<= [`DTX_MAX_BYTES`]) taken as silence without decoding.
    pub dtx_packets: u64,
    /// Silence filled on the clock during a DTX pause inside an utterance (also in `silence`).
    pub dtx_fill: Duration,
    /// Frames the sender flagged as without voice activity, taken as silence between utterances
    /// without decoding ([`UplinkConfig::skip_inactive_frames`]).
    pub inactive_packets: u64,
}

/// Uplink pipeline state; see the module docs.
pub struct Uplink {
    cfg: UplinkConfig,
    dec: OpusDecoder,
    /// 48 kHz samples per decoded sample (1, 2, 3, 4 or 6): the decoder's output rate is
    /// 48 kHz / this.
    per_decoded: usize,
    vad: Vad,
    /// Decode rate -> 8 kHz for the VAD when libfvad does not take the decode rate (12, 24 kHz),
    /// with the 10 ms frame it is filling.
    vad_rs: Option<VadResampler>,
    /// Decode rate -> output rate (a passthrough when they are equal).
    rs: Resampler,
    /// Decoded audio at the decode rate.
    pcm: Vec<i16>,
    /// The 10 ms frame being filled, `chunk` samples at the decode rate.
    carry: [i16; CHUNK_SAMPLES],
    carry_len: usize,
    chunk: usize,
    out: Vec<i16>,
    out_read: usize,
    edges: VecDeque<(usize, VadEdge)>,
    window: ReorderWindow,
    /// The packet being decoded (copied out of the window), and whether it still waits for the
    /// silence before it.
    staged: Box<[u8; MAX_PAYLOAD]>,
    staged_len: Option<usize>,
    pending_silence: u64,
    silence_cap: u64,
    ssrc: Option<u32>,
    last_timestamp: Option<u32>,
    last_arrival: Option<Duration>,
    last_packet_samples: usize,
    stream_samples: u64,
    /// Arrival of the DTX packet the stream paused with (`None`: not in DTX).
    dtx_at: Option<Duration>,
    /// Silence filled on the clock since that packet (48 kHz samples).
    dtx_filled: u64,
    /// Frames were skipped since the last decode: reset the decoder before the next one.
    decoder_stale: bool,
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
        if cfg.max_reorder_delay < crate::pcm::FRAME || cfg.max_reorder_delay > Duration::from_millis(500) {
            return Err(MediaError::InvalidConfig {
                key: "uplink.max_reorder_delay",
                reason: "must be 20 ms ..= 500 ms",
            });
        }
        if cfg.max_silence_fill > Duration::from_secs(60) {
            return Err(MediaError::InvalidConfig { key: "uplink.max_silence_fill", reason: "must be 0 ..= 60 s" });
        }
        let silence_cap = cfg.max_silence_fill.max(cfg.vad.min_silence + Duration::from_millis(100));
        let decode_rate = match cfg.output_rate_hz {
            r if cfg.decode_at_output_rate && is_opus_pcm_rate(r) => r,
            _ => OPUS_RATE,
        };
        let (vad, vad_rs) = match decode_rate {
            8_000 | 16_000 | 32_000 | 48_000 => (Vad::new(cfg.vad, decode_rate)?, None),
            _ => (Vad::new(cfg.vad, VAD_RATE)?, Some(VadResampler::new(decode_rate)?)),
        };
        let rs = Resampler::new(decode_rate, cfg.output_rate_hz, Alignment::Stream)?;
        // Worst case per push: the concealment cap (rounded up to one max packet) + one FEC frame
        // + the packet itself + a partial 10 ms carry, at 48 kHz; the output rate is <= 48 kHz.
        let max_in =
            duration_to_samples(cfg.max_concealment, OPUS_RATE) as usize + 3 * MAX_PACKET_SAMPLES + CHUNK_SAMPLES;
        let out_cap = max_in + rs.chunk_out().max(CHUNK_SAMPLES);
        Ok(Self {
            cfg,
            dec: OpusDecoder::with_rate(decode_rate)?,
            per_decoded: (OPUS_RATE / decode_rate) as usize,
            vad,
            vad_rs,
            rs,
            pcm: vec![0; MAX_PACKET_SAMPLES],
            carry: [0; CHUNK_SAMPLES],
            carry_len: 0,
            chunk: (decode_rate / 100) as usize,
            out: Vec::with_capacity(out_cap),
            out_read: 0,
            edges: VecDeque::with_capacity(max_in / CHUNK_SAMPLES + 4),
            window: ReorderWindow::new(cfg.max_reorder_delay),
            staged: Box::new([0; MAX_PAYLOAD]),
            staged_len: None,
            pending_silence: 0,
            silence_cap: duration_to_samples(silence_cap, OPUS_RATE),
            ssrc: None,
            last_timestamp: None,
            last_arrival: None,
            last_packet_samples: FRAME_SAMPLES,
            stream_samples: 0,
            dtx_at: None,
            dtx_filled: 0,
            decoder_stale: false,
            stats: UplinkStats::default(),
        })
    }

    /// The settings in force.
    pub fn config(&self) -> &UplinkConfig {
        &self.cfg
    }

    /// Takes one RTP packet that arrived at `now` (media time since session start). Then call
    /// [`Uplink::poll`] until `None`.
    pub fn push(&mut self, now: Duration, packet: RtpIn<'_>) {
        self.discard_unpolled();
        self.stats.packets += 1;
        self.stats.last_arrival = Some(now);
        if self.ssrc.is_some_and(|s| s != packet.ssrc) {
            self.stats.ssrc_changes += 1;
            self.new_stream();
        }
        self.ssrc = Some(packet.ssrc);
        let audio = self.cfg.opus_payload_type.is_none_or(|pt| pt == packet.payload_type);
        if !audio {
            self.stats.foreign_payload += 1;
        }
        match self.window.insert(now, packet.seq, packet.timestamp, packet.payload, audio) {
            Inserted::Held => {}
            Inserted::LateOrDuplicate => self.stats.late_or_duplicate += 1,
            Inserted::Restarted => {
                self.stats.resets += 1;
                self.restart_decoder();
            }
        }
    }

    /// When a packet held behind a gap must be given up if nothing arrives before, or when the
    /// next 20 ms of a DTX pause inside an utterance is due (media time); `None` when nothing
    /// waits (between utterances a silent or DTX client costs no timer).
    pub fn next_timeout(&self) -> Option<Duration> {
        [self.window.deadline(), self.dtx_fill_due()].into_iter().flatten().min()
    }

    /// The clock reached `now` without a packet: release what waited long enough, fill a DTX
    /// pause up to `now`. Then poll.
    pub fn handle_timeout(&mut self, now: Duration) {
        self.discard_unpolled();
        self.window.set_now(now);
        if let (Some(due), Some(at)) = (self.dtx_fill_due(), self.dtx_at)
            && now >= due
        {
            // Whole 20 ms steps of the time since the DTX packet not yet covered.
            let covered = self.last_packet_samples as u64 + self.dtx_filled;
            let passed = duration_to_samples(now.saturating_sub(at), OPUS_RATE);
            let room = self.silence_cap.saturating_sub(self.dtx_filled);
            let n = (passed.saturating_sub(covered) / FRAME_SAMPLES as u64 * FRAME_SAMPLES as u64).min(room);
            self.dtx_filled += n;
            self.pending_silence += n;
            self.stats.dtx_fill += samples_to_duration(n, OPUS_RATE);
        }
    }

    /// When the next 20 ms of a DTX pause is due: only in DTX, inside an utterance, below the
    /// silence cap.
    fn dtx_fill_due(&self) -> Option<Duration> {
        let at = self.dtx_at?;
        if !self.vad.is_speaking() || self.dtx_filled >= self.silence_cap {
            return None;
        }
        let covered = self.last_packet_samples as u64 + self.dtx_filled + FRAME_SAMPLES as u64;
        Some(at + samples_to_duration(covered, OPUS_RATE))
    }

    /// Next output, in stream order; `None` when everything released so far is drained.
    pub fn poll(&mut self) -> Option<UplinkEvent<'_>> {
        while self.edges.is_empty() && self.out_read >= self.out.len() {
            if !self.refill() {
                return None;
            }
        }
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
        let start = self.out_read;
        self.out_read = end;
        Some(UplinkEvent::Audio(PcmRef::new(self.cfg.output_rate_hz, &self.out[start..end])))
    }

    /// Counters.
    pub fn stats(&self) -> UplinkStats {
        let mut s = self.stats;
        s.decoded = samples_to_duration(self.stream_samples, OPUS_RATE);
        s.speech = self.vad.voiced();
        s.reordered = self.window.reordered();
        s
    }

    /// The decoder's output rate, Hz: the output rate, or 48 kHz (see the module docs,
    /// "Decode rate").
    pub fn decode_rate_hz(&self) -> u32 {
        OPUS_RATE / self.per_decoded as u32
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

    fn discard_unpolled(&mut self) {
        if self.out_read < self.out.len() {
            self.stats.discarded_samples += (self.out.len() - self.out_read) as u64;
        }
        self.out.clear();
        self.out_read = 0;
        self.edges.clear();
    }

    /// A new time base: the decoder, the previous timestamp and anything staged are forgotten.
    fn restart_decoder(&mut self) {
        self.dec.reset();
        self.last_timestamp = None;
        self.last_arrival = None;
        self.staged_len = None;
        self.pending_silence = 0;
        self.dtx_at = None;
        self.dtx_filled = 0;
        self.decoder_stale = false;
    }

    /// A new SSRC: what the old stream held is dropped, and nothing of the new one is compared
    /// with the old one's sequence numbers or timestamps.
    fn new_stream(&mut self) {
        self.window.clear();
        self.restart_decoder();
    }

    /// Produce the next piece of output (silence, a staged packet, or the next released packet);
    /// false when nothing is ready.
    fn refill(&mut self) -> bool {
        self.out.clear();
        self.out_read = 0;
        if self.pending_silence > 0 {
            // Whole decoded samples; a remainder below one (a timestamp step that is not a
            // multiple of 48 kHz / decode rate) is dropped.
            let n48 =
                self.pending_silence.min(MAX_PACKET_SAMPLES as u64) as usize / self.per_decoded * self.per_decoded;
            self.pending_silence = if n48 == 0 { 0 } else { self.pending_silence - n48 as u64 };
            if n48 > 0 {
                self.stats.silence += samples_to_duration(n48 as u64, OPUS_RATE);
                self.feed_silence(n48);
                return true;
            }
        }
        if let Some(len) = self.staged_len.take() {
            self.decode_staged(len);
            return true;
        }
        let Some(r) = self.window.pop() else { return false };
        let (missing, timestamp, arrival, audio, len) = (r.missing, r.timestamp, r.arrival, r.audio, r.payload.len());
        self.staged[..len].copy_from_slice(r.payload);
        if missing > 0 {
            self.stats.reorder_give_ups += 1;
        }
        if !audio {
            // Its sequence number is accounted for; a missing one before it is still a loss.
            if missing > 0 {
                self.conceal_gap(u64::from(missing), 0);
            }
            return true;
        }
        let concealed = if missing > 0 { self.conceal_gap(u64::from(missing), len) } else { 0 };
        self.pending_silence = self.silence_before(timestamp, arrival, concealed);
        self.dtx_at = (1..=DTX_MAX_BYTES).contains(&len).then_some(arrival);
        if self.pending_silence > 0 {
            self.staged_len = Some(len);
        } else {
            self.decode_staged(len);
        }
        true
    }

    /// Samples of silence between the previous packet (and what was concealed after it) and a
    /// packet with `timestamp`.
    fn silence_before(&mut self, timestamp: u32, arrival: Duration, concealed: usize) -> u64 {
        let previous = self.last_timestamp.replace(timestamp);
        let previous_arrival = self.last_arrival.replace(arrival);
        let (Some(previous), Some(previous_arrival)) = (previous, previous_arrival) else { return 0 };
        let step = i64::from(timestamp.wrapping_sub(previous) as i32);
        if !(0..=MAX_TIMESTAMP_STEP).contains(&step) {
            return 0;
        }
        // The clock already filled part of a DTX pause.
        let covered = (self.last_packet_samples + concealed) as i64 + std::mem::take(&mut self.dtx_filled) as i64;
        let elapsed = arrival.saturating_sub(previous_arrival) + SILENCE_ARRIVAL_SLACK;
        let budget = duration_to_samples(elapsed, OPUS_RATE) as i64 - covered;
        (step - covered).min(budget).clamp(0, self.silence_cap as i64) as u64
    }

    fn decode_staged(&mut self, len: usize) {
        if (1..=DTX_MAX_BYTES).contains(&len)
            && let Some(n) = packet_samples(&self.staged[..len])
        {
            // DTX / silence: no decode, its duration as silence (the VAD's energy gate then skips
            // the classifier too).
            self.stats.dtx_packets += 1;
            self.last_packet_samples = n;
            self.feed_silence(n);
            return;
        }
        if self.cfg.skip_inactive_frames
            && !self.vad.is_speaking()
            && silk_voice_inactive(&self.staged[..len])
            && let Some(n) = packet_samples(&self.staged[..len])
        {
            self.stats.inactive_packets += 1;
            self.decoder_stale = true;
            self.last_packet_samples = n;
            self.feed_silence(n);
            return;
        }
        if std::mem::take(&mut self.decoder_stale) {
            self.dec.reset();
        }
        let decoded = if len == 0 { None } else { self.dec.decode(&self.staged[..len], &mut self.pcm).ok() };
        match decoded {
            Some(n) if n > 0 => {
                self.last_packet_samples = (n * self.per_decoded).min(MAX_PACKET_SAMPLES);
                self.feed_decoded(n);
            }
            _ => {
                self.stats.decode_errors += 1;
                self.plc(self.last_packet_samples);
            }
        }
    }

    /// Conceals `lost` packets before the staged packet (`next_len` bytes, 0 = none); returns the
    /// samples synthesized.
    fn conceal_gap(&mut self, lost: u64, next_len: usize) -> usize {
        let before = self.stream_samples;
        self.stats.lost += lost;
        // The missing packets are assumed as long as the last good one; the FEC frame is as
        // long as the packet carrying it (what libopus expects for `decode_fec`).
        let plc_frame = self.last_packet_samples;
        let cap = duration_to_samples(self.cfg.max_concealment, OPUS_RATE) as usize;
        let n = lost.min((cap / plc_frame).max(1) as u64) as usize;
        let next = &self.staged[..next_len];
        let fec = if packet_has_fec(next) { packet_samples(next) } else { None };
        for i in 0..n {
            match fec {
                Some(len) if i + 1 == n => {
                    match self.dec.decode_fec(&self.staged[..next_len], len / self.per_decoded, &mut self.pcm) {
                        Ok(got) if got > 0 => {
                            self.stats.fec_frames += 1;
                            self.emit_concealed(got);
                        }
                        _ => self.stats.decode_errors += 1,
                    }
                }
                _ => self.plc(plc_frame),
            }
        }
        (self.stream_samples - before) as usize
    }

    /// One frame of packet-loss concealment, `frame` 48 kHz samples long.
    fn plc(&mut self, frame: usize) {
        match self.dec.conceal(frame / self.per_decoded, &mut self.pcm) {
            Ok(got) if got > 0 => {
                self.stats.plc_frames += 1;
                self.emit_concealed(got);
            }
            _ => self.stats.decode_errors += 1,
        }
    }

    /// `n` decoded samples of concealment (PLC or FEC) in `pcm`.
    fn emit_concealed(&mut self, n: usize) {
        self.stats.concealed += samples_to_duration((n * self.per_decoded) as u64, OPUS_RATE);
        self.feed_decoded(n);
    }

    /// `n48` samples (48 kHz) of silence: a DTX or skipped packet's duration.
    fn feed_silence(&mut self, n48: usize) {
        let n = n48 / self.per_decoded;
        self.pcm[..n].fill(0);
        self.feed_decoded(n);
    }

    /// Runs `pcm[..n]` (decode rate) through 10 ms framing, VAD and the resampler.
    fn feed_decoded(&mut self, n: usize) {
        let n = n.min(self.pcm.len());
        self.stream_samples += (n * self.per_decoded) as u64;
        let chunk = self.chunk;
        let mut i = 0;
        while i < n {
            let take = (chunk - self.carry_len).min(n - i);
            self.carry[self.carry_len..self.carry_len + take].copy_from_slice(&self.pcm[i..i + take]);
            self.carry_len += take;
            i += take;
            if self.carry_len < chunk {
                break;
            }
            self.carry_len = 0;
            let frame = &self.carry[..chunk];
            let edge = match self.vad_rs.as_mut() {
                None => self.vad.process(frame),
                Some(vr) => vr.process(frame, &mut self.vad),
            };
            if let Some(edge) = edge {
                if matches!(edge, VadEdge::Started { .. }) {
                    self.stats.utterances += 1;
                }
                self.edges.push_back((self.out.len(), edge));
            }
            let out = &mut self.out;
            // Sizes are fixed at construction; a failure here would be a bug, and losing 10 ms
            // of audio is the right degradation (no panic on the media path).
            let _ = self.rs.process(frame, &mut |s: &[i16]| out.extend_from_slice(s));
        }
    }
}

/// The VAD's input when libfvad does not take the decode rate: the decoded 10 ms frames
/// resampled to 8 kHz (the rate libfvad classifies at whatever it is given) and cut into 10 ms
/// VAD frames. Edges are moved back by the resampler's delay, so their positions match the
/// decoded stream's.
struct VadResampler {
    rs: Resampler,
    frame: [i16; VAD_FRAME_SAMPLES],
    fill: usize,
}

/// libfvad's classification rate, Hz.
const VAD_RATE: u32 = 8_000;
/// One 10 ms VAD frame at [`VAD_RATE`].
const VAD_FRAME_SAMPLES: usize = (VAD_RATE / 100) as usize;

impl VadResampler {
    fn new(decode_rate: u32) -> Result<Self, MediaError> {
        Ok(Self {
            rs: Resampler::new(decode_rate, VAD_RATE, Alignment::Stream)?,
            frame: [0; VAD_FRAME_SAMPLES],
            fill: 0,
        })
    }

    /// Feeds one decoded 10 ms frame; returns the edge of the VAD frames it completed (at most
    /// one frame per call at the usual 10 ms resampler chunks; the last edge if more).
    fn process(&mut self, decoded: &[i16], vad: &mut Vad) -> Option<VadEdge> {
        let delay = self.rs.delay();
        let (frame, fill) = (&mut self.frame, &mut self.fill);
        let mut edge = None;
        let _ = self.rs.process(decoded, &mut |mut s: &[i16]| {
            while !s.is_empty() {
                let take = (VAD_FRAME_SAMPLES - *fill).min(s.len());
                frame[*fill..*fill + take].copy_from_slice(&s[..take]);
                *fill += take;
                s = &s[take..];
                if *fill == VAD_FRAME_SAMPLES {
                    *fill = 0;
                    if let Some(e) = vad.process(&frame[..]) {
                        edge = Some(match e {
                            VadEdge::Started { at } => VadEdge::Started { at: at.saturating_sub(delay) },
                            VadEdge::Stopped { at } => VadEdge::Stopped { at: at.saturating_sub(delay) },
                        });
                    }
                }
            }
        });
        edge
    }
}
