//! Opus mono: a 48 kHz decoder with packet-loss concealment (PLC) and in-band FEC (LBRR), and a
//! VOIP encoder with in-band FEC that writes 20 ms frames into a caller-provided buffer. The
//! encoder takes PCM at any rate libopus accepts ([`OPUS_PCM_RATES_HZ`]); the packets are
//! the same Opus whatever the input rate, and their RTP clock is always 48 kHz (RFC 7587 §4.1).

use std::time::Duration;

use crate::pcm::{OPUS_RATE, samples_to_duration};

/// Largest Opus packet duration: 120 ms at 48 kHz.
pub const MAX_PACKET_SAMPLES: usize = 5_760;
/// Largest single-frame Opus packet (RFC 6716 §3.4). An `out` buffer of this size always fits
/// one 20 ms frame from [`OpusEncoder::encode`]; 1500 bytes (an MTU) is a comfortable choice.
pub const MAX_FRAME_BYTES: usize = 1_275;

/// The PCM rates, Hz, libopus' encoder takes as input and its decoder outputs (RFC 6716 §2: Opus
/// codes audio sampled at these rates, and any decoder may output at any of them; a lower rate
/// only bounds the coded bandwidth, e.g. 24 kHz is super-wideband, everything such a source
/// holds).
pub const OPUS_PCM_RATES_HZ: [u32; 5] = [8_000, 12_000, 16_000, 24_000, 48_000];

/// Whether libopus encodes from and decodes to PCM at `rate_hz` ([`OPUS_PCM_RATES_HZ`]).
pub fn is_opus_pcm_rate(rate_hz: u32) -> bool {
    OPUS_PCM_RATES_HZ.contains(&rate_hz)
}

/// Errors of the codec layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// libopus returned an error (bad packet, buffer too small, bad argument).
    #[error("opus {op}: {source}")]
    Opus {
        /// What we were doing.
        op: &'static str,
        /// libopus' error.
        #[source]
        source: opus::Error,
    },
    /// The encoder only takes whole 20 ms frames (at its input rate).
    #[error("encode needs exactly {expected} samples (20 ms at the encoder's input rate), got {got}")]
    FrameSize {
        /// Samples given.
        got: usize,
        /// Samples required.
        expected: usize,
    },
    /// An empty payload was given to decode (a loss is concealed with `conceal` instead).
    #[error("empty opus packet")]
    EmptyPacket,
    /// An encoder setting is out of range.
    #[error("invalid encoder setting `{key}`: {reason}")]
    InvalidSetting {
        /// The config key.
        key: &'static str,
        /// What is allowed.
        reason: &'static str,
    },
}

fn opus_err(op: &'static str) -> impl FnOnce(opus::Error) -> CodecError {
    move |source| CodecError::Opus { op, source }
}

/// True when `packet` carries in-band FEC (LBRR) data for the frame before it.
pub fn packet_has_fec(packet: &[u8]) -> bool {
    if packet.is_empty() || packet.len() > i32::MAX as usize {
        return false;
    }
    // SAFETY: `packet` is a live, non-empty slice and `len` is its exact length, so libopus'
    // reads (TOC byte, then `opus_packet_parse`, which bounds-checks against `len`) stay
    // inside it. The function keeps no pointer after returning.
    let r = unsafe { opusic_sys::opus_packet_has_lbrr(packet.as_ptr(), packet.len() as i32) };
    r == 1
}

/// True when `packet` is one mono SILK or hybrid frame (TOC code 0, RFC 6716 §3.1) whose SILK
/// voice-activity flags are all 0: the sender's encoder classified it as no voice activity
/// (libopus does so for silence and faint background noise; it is what its DTX acts on).
///
/// The SILK layer starts with one VAD flag per 20 ms SILK frame (1 for a 10 or 20 ms packet, 2
/// for 40 ms, 3 for 60 ms), then the LBRR flag, each range-coded with probability 1/2 (RFC 6716
/// §4.2.3); the first symbols of a fresh range decoder at probability 1/2 are the first payload
/// byte's bits from the top (RFC 6716 §4.1.1, §4.1.3.1), which is how libopus'
/// `opus_packet_has_lbrr` reads the LBRR flag. CELT-only, stereo and multi-frame packets answer
/// false (they are decoded as usual).
pub fn silk_voice_inactive(packet: &[u8]) -> bool {
    let (Some(&toc), Some(&first)) = (packet.first(), packet.get(1)) else { return false };
    let config = toc >> 3;
    let (stereo, code) = (toc & 0x04 != 0, toc & 0x03);
    if stereo || code != 0 || config >= 16 {
        return false;
    }
    // SILK-only configs 0..=11 are 10/20/40/60 ms by `config % 4`; hybrid 12..=15 are 10/20 ms.
    let vad_flags = if config < 12 { [1, 1, 2, 3][usize::from(config % 4)] } else { 1 };
    first >> (8 - vad_flags) == 0
}

/// Duration of `packet` in 48 kHz samples, or `None` when its header is invalid.
pub fn packet_samples(packet: &[u8]) -> Option<usize> {
    match opus::packet::get_nb_samples(packet, OPUS_RATE) {
        Ok(n) if n > 0 && n <= MAX_PACKET_SAMPLES => Some(n),
        _ => None,
    }
}

/// Opus decoder, mono, at 48 kHz or another rate libopus decodes to.
pub struct OpusDecoder {
    dec: opus::Decoder,
}

impl std::fmt::Debug for OpusDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpusDecoder").finish_non_exhaustive()
    }
}

impl OpusDecoder {
    /// A fresh decoder at 48 kHz.
    pub fn new() -> Result<Self, CodecError> {
        Self::with_rate(OPUS_RATE)
    }

    /// A fresh decoder whose output is `rate_hz` (8000, 12000, 16000, 24000 or 48000: any
    /// decoder may output at any of these rates whatever bandwidth the packets were coded with,
    /// RFC 6716 §2). Sample counts in and out of the decoder are then at `rate_hz`.
    /// Errors: another rate.
    pub fn with_rate(rate_hz: u32) -> Result<Self, CodecError> {
        if !is_opus_pcm_rate(rate_hz) {
            return Err(CodecError::InvalidSetting {
                key: "decoder rate",
                reason: "must be 8000, 12000, 16000, 24000 or 48000 Hz",
            });
        }
        let dec = opus::Decoder::new(rate_hz, opus::Channels::Mono).map_err(opus_err("decoder_create"))?;
        Ok(Self { dec })
    }

    /// Decodes one packet into `out` (which should hold [`MAX_PACKET_SAMPLES`]); returns samples
    /// written. An empty `packet` is an error here (libopus would take it as a loss).
    pub fn decode(&mut self, packet: &[u8], out: &mut [i16]) -> Result<usize, CodecError> {
        if packet.is_empty() {
            return Err(CodecError::EmptyPacket);
        }
        self.dec.decode(packet, out, false).map_err(opus_err("decode"))
    }

    /// Conceals `samples` of lost audio (PLC) into `out[..samples]`, at the decoder's rate.
    /// `samples` must be a multiple of 2.5 ms (120 samples at 48 kHz) and at most 120 ms.
    pub fn conceal(&mut self, samples: usize, out: &mut [i16]) -> Result<usize, CodecError> {
        let n = samples.min(out.len());
        self.dec.decode(&[], &mut out[..n], false).map_err(opus_err("plc"))
    }

    /// Recovers the `samples` lost just before `next_packet` from its in-band FEC data
    /// (libopus falls back to PLC when the packet has none). `next_packet` must then still be
    /// decoded normally with [`OpusDecoder::decode`].
    pub fn decode_fec(&mut self, next_packet: &[u8], samples: usize, out: &mut [i16]) -> Result<usize, CodecError> {
        let n = samples.min(out.len());
        if next_packet.is_empty() {
            return self.conceal(n, out);
        }
        self.dec.decode(next_packet, &mut out[..n], true).map_err(opus_err("decode_fec"))
    }

    /// Back to the initial state (after a stream discontinuity).
    pub fn reset(&mut self) {
        // Only fails on a corrupt state pointer, which `opus::Decoder` never hands out.
        let _ = self.dec.reset_state();
    }
}

/// Encoder settings. Defaults: 48 kHz input, 32 kbps, complexity 5, in-band FEC on, 0 %
/// expected loss.
///
/// In-band FEC is enabled, but libopus only codes LBRR (and spends its CPU and bits) while the
/// expected loss is above zero. Like libwebrtc, feed the loss the client reports in RTCP
/// receiver reports through [`OpusEncoder::set_expected_loss`] (or `Playout::set_expected_loss`):
/// FEC then engages exactly when the path is lossy. Coding LBRR costs ~45 us per frame on
/// the 2-core dev machines (see BENCHMARKS.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EncoderConfig {
    /// Sample rate of the PCM given to [`OpusEncoder::encode`], Hz: one of
    /// [`OPUS_PCM_RATES_HZ`]. Default 48000. Encoding a 24 kHz source at 24 kHz skips a
    /// resampler and codes super-wideband (all that source holds) instead of fullband; the
    /// packets' RTP clock stays 48 kHz (a 20 ms frame is 960 ticks, RFC 7587 §4.1).
    pub input_rate_hz: u32,
    /// Target bitrate in bits per second (6000..=510000). Default 32000.
    pub bitrate_bps: u32,
    /// 0 (fastest) ..= 10 (best). Default 5.
    pub complexity: u8,
    /// In-band FEC (LBRR): each packet carries a low-bitrate copy of the previous frame.
    pub fec: bool,
    /// Expected loss in percent (0..=100); libopus only codes FEC (LBRR) when this is > 0.
    /// Default 0: set it from RTCP loss reports at run time.
    pub expected_loss_pct: u8,
}

impl Default for EncoderConfig {
    fn default() -> Self {
        Self { input_rate_hz: OPUS_RATE, bitrate_bps: 32_000, complexity: 5, fec: true, expected_loss_pct: 0 }
    }
}

impl EncoderConfig {
    /// Samples of one 20 ms frame at [`EncoderConfig::input_rate_hz`] (960 at 48 kHz, 480 at
    /// 24 kHz).
    pub fn frame_samples(&self) -> usize {
        (self.input_rate_hz / 50) as usize
    }
}

/// Opus encoder, mono, `Application::Voip`, 20 ms frames of PCM at
/// [`EncoderConfig::input_rate_hz`].
pub struct OpusEncoder {
    enc: opus::Encoder,
    cfg: EncoderConfig,
}

impl std::fmt::Debug for OpusEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpusEncoder").field("cfg", &self.cfg).finish_non_exhaustive()
    }
}

impl OpusEncoder {
    /// Builds an encoder with `cfg` (validated).
    pub fn new(cfg: EncoderConfig) -> Result<Self, CodecError> {
        if !is_opus_pcm_rate(cfg.input_rate_hz) {
            return Err(CodecError::InvalidSetting {
                key: "input_rate_hz",
                reason: "must be a rate libopus encodes: 8000, 12000, 16000, 24000 or 48000 Hz",
            });
        }
        if !(6_000..=510_000).contains(&cfg.bitrate_bps) {
            return Err(CodecError::InvalidSetting { key: "bitrate_bps", reason: "must be 6000..=510000" });
        }
        if cfg.complexity > 10 {
            return Err(CodecError::InvalidSetting { key: "complexity", reason: "must be 0..=10" });
        }
        if cfg.expected_loss_pct > 100 {
            return Err(CodecError::InvalidSetting { key: "expected_loss_pct", reason: "must be 0..=100" });
        }
        let mut enc = opus::Encoder::new(cfg.input_rate_hz, opus::Channels::Mono, opus::Application::Voip)
            .map_err(opus_err("encoder_create"))?;
        enc.set_bitrate(opus::Bitrate::Bits(cfg.bitrate_bps as i32)).map_err(opus_err("set_bitrate"))?;
        enc.set_complexity(i32::from(cfg.complexity)).map_err(opus_err("set_complexity"))?;
        enc.set_inband_fec(cfg.fec).map_err(opus_err("set_inband_fec"))?;
        enc.set_packet_loss_perc(i32::from(cfg.expected_loss_pct)).map_err(opus_err("set_packet_loss_perc"))?;
        enc.set_signal(opus::Signal::Voice).map_err(opus_err("set_signal"))?;
        Ok(Self { enc, cfg })
    }

    /// The settings in force.
    pub fn config(&self) -> EncoderConfig {
        self.cfg
    }

    /// Encodes exactly one 20 ms frame into `out`: [`EncoderConfig::frame_samples`] samples at
    /// the input rate (960 at 48 kHz, 480 at 24 kHz); returns the packet length. The packet
    /// lasts 20 ms, 960 ticks of the 48 kHz RTP clock, whatever the input rate (RFC 7587 §4.1).
    /// `out` of [`MAX_FRAME_BYTES`] always suffices. No allocation.
    pub fn encode(&mut self, pcm: &[i16], out: &mut [u8]) -> Result<usize, CodecError> {
        let expected = self.cfg.frame_samples();
        if pcm.len() != expected {
            return Err(CodecError::FrameSize { got: pcm.len(), expected });
        }
        self.enc.encode(pcm, out).map_err(opus_err("encode"))
    }

    /// Updates the expected loss (0..=100 %, clamped), e.g. from the fraction lost in the
    /// client's RTCP receiver reports; with FEC enabled, LBRR is coded while this is above zero.
    pub fn set_expected_loss(&mut self, pct: u8) -> Result<(), CodecError> {
        let pct = pct.min(100);
        self.enc.set_packet_loss_perc(i32::from(pct)).map_err(opus_err("set_packet_loss_perc"))?;
        self.cfg.expected_loss_pct = pct;
        Ok(())
    }

    /// Encoder lookahead (6.5 ms for VOIP; libopus reports it in samples at the input rate).
    pub fn lookahead(&mut self) -> Duration {
        let n = self.enc.get_lookahead().unwrap_or(0).max(0);
        samples_to_duration(n as u64, self.cfg.input_rate_hz)
    }

    /// Back to the initial state (start of a new talk spurt after `clear`).
    pub fn reset(&mut self) {
        // Only fails on a corrupt state pointer, which `opus::Encoder` never hands out.
        let _ = self.enc.reset_state();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pcm::FRAME_SAMPLES;

    #[test]
    fn silk_vad_flags_are_the_first_payload_bits() {
        // SILK WB 20 ms (config 9), mono, code 0: one VAD flag, the top bit.
        assert!(silk_voice_inactive(&[9 << 3, 0x7F, 0xFF]));
        assert!(!silk_voice_inactive(&[9 << 3, 0x80, 0x00]));
        // SILK 40 ms (config 10): two VAD flags; the third bit is the LBRR flag.
        assert!(silk_voice_inactive(&[10 << 3, 0x20, 0x00]));
        assert!(!silk_voice_inactive(&[10 << 3, 0x40, 0x00]));
        // Hybrid SWB 20 ms (config 13): one flag.
        assert!(silk_voice_inactive(&[13 << 3, 0x00]));
        // CELT-only, stereo, two frames, TOC only: never.
        assert!(!silk_voice_inactive(&[31 << 3, 0x00, 0x00]));
        assert!(!silk_voice_inactive(&[(9 << 3) | 0x04, 0x00, 0x00]));
        assert!(!silk_voice_inactive(&[(9 << 3) | 0x01, 0x00, 0x00]));
        assert!(!silk_voice_inactive(&[9 << 3]));
    }

    #[test]
    fn libopus_flags_digital_silence_inactive_and_loud_speech_active() {
        let mut enc =
            OpusEncoder::new(EncoderConfig { expected_loss_pct: 10, ..EncoderConfig::default() }).expect("encoder");
        let mut buf = [0u8; 1500];
        let mut flags = |pcm: &[i16]| -> Vec<bool> {
            pcm.chunks_exact(FRAME_SAMPLES)
                .map(|f| {
                    let n = enc.encode(f, &mut buf).expect("encode");
                    silk_voice_inactive(&buf[..n])
                })
                .collect()
        };
        let silence = flags(&[0i16; 48_000]);
        // libopus' VAD needs a few frames to settle; after that, silence is inactive.
        assert!(silence[10..].iter().all(|&f| f), "{silence:?}");
        let speech = crate::wav::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/user_question.wav"))
            .expect("tests/data/user_question.wav");
        let inactive = flags(&speech.samples);
        let loud: Vec<bool> = speech
            .samples
            .chunks_exact(FRAME_SAMPLES)
            .zip(&inactive)
            .filter(|(f, _)| crate::pcm::rms(f) > 1000.0)
            .map(|(_, &i)| i)
            .collect();
        assert!(loud.len() > 50, "the question has loud frames");
        assert!(loud.iter().all(|&i| !i), "every loud speech frame is flagged active: {loud:?}");
    }

    fn tone(n: usize, offset: usize) -> Vec<i16> {
        (0..n)
            .map(|i| (8000.0 * (2.0 * std::f64::consts::PI * 220.0 * (i + offset) as f64 / 48_000.0).sin()) as i16)
            .collect()
    }

    #[test]
    fn encode_decode_round_trip_keeps_energy() {
        let mut enc = OpusEncoder::new(EncoderConfig::default()).expect("encoder");
        let mut dec = OpusDecoder::new().expect("decoder");
        let mut pkt = [0u8; 1500];
        let mut out = vec![0i16; MAX_PACKET_SAMPLES];
        let (mut e_in, mut e_out) = (0f64, 0f64);
        for k in 0..50 {
            let pcm = tone(FRAME_SAMPLES, k * FRAME_SAMPLES);
            let len = enc.encode(&pcm, &mut pkt).expect("encode");
            assert!(len > 0 && len <= MAX_FRAME_BYTES);
            assert_eq!(packet_samples(&pkt[..len]), Some(FRAME_SAMPLES));
            let n = dec.decode(&pkt[..len], &mut out).expect("decode");
            assert_eq!(n, FRAME_SAMPLES);
            if k >= 5 {
                e_in += pcm.iter().map(|&s| f64::from(s).powi(2)).sum::<f64>();
                e_out += out[..n].iter().map(|&s| f64::from(s).powi(2)).sum::<f64>();
            }
        }
        let ratio = e_out / e_in;
        assert!((0.7..1.3).contains(&ratio), "decoded energy ratio {ratio}");
    }

    fn speech_fec_count(cfg: EncoderConfig) -> (usize, usize) {
        let pcm =
            crate::wav::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/user_question.wav")).expect("fixture");
        let mut enc = OpusEncoder::new(cfg).expect("encoder");
        let mut pkt = [0u8; 1500];
        let (mut with_fec, mut total) = (0, 0);
        for frame in pcm.samples.chunks_exact(FRAME_SAMPLES) {
            let len = enc.encode(frame, &mut pkt).expect("encode");
            with_fec += usize::from(packet_has_fec(&pkt[..len]));
            total += 1;
        }
        (with_fec, total)
    }

    #[test]
    fn encoder_emits_fec_for_speech_only_when_enabled() {
        let lossy = EncoderConfig { expected_loss_pct: 10, ..EncoderConfig::default() };
        let (with_fec, total) = speech_fec_count(lossy);
        // Silence and the first frames carry no LBRR; the voiced majority does.
        assert!(with_fec * 10 > total * 6, "only {with_fec}/{total} speech packets carry LBRR");
        let (with_fec, _) = speech_fec_count(EncoderConfig { fec: false, ..lossy });
        assert_eq!(with_fec, 0, "FEC off must not produce LBRR");
        let (with_fec, _) = speech_fec_count(EncoderConfig::default());
        assert_eq!(with_fec, 0, "libopus codes no LBRR at the default 0 % expected loss");
    }

    #[test]
    fn encoder_rejects_wrong_frame_and_bad_settings() {
        let mut enc = OpusEncoder::new(EncoderConfig::default()).expect("encoder");
        let mut pkt = [0u8; 1500];
        assert!(matches!(enc.encode(&[0; 480], &mut pkt), Err(CodecError::FrameSize { got: 480, .. })));
        assert!(OpusEncoder::new(EncoderConfig { complexity: 11, ..EncoderConfig::default() }).is_err());
        assert!(OpusEncoder::new(EncoderConfig { bitrate_bps: 10, ..EncoderConfig::default() }).is_err());
        let la = enc.lookahead();
        assert!(la >= Duration::from_micros(2_500) && la <= Duration::from_micros(6_500), "lookahead {la:?}");
    }

    #[test]
    fn encoder_input_rate_is_validated_and_sets_the_frame_size() {
        for bad in [0, 22_050, 32_000, 44_100, 96_000] {
            let cfg = EncoderConfig { input_rate_hz: bad, ..EncoderConfig::default() };
            assert!(
                matches!(OpusEncoder::new(cfg), Err(CodecError::InvalidSetting { key: "input_rate_hz", .. })),
                "{bad} Hz must be refused"
            );
        }
        let mut pkt = [0u8; 1500];
        for rate in OPUS_PCM_RATES_HZ {
            let mut enc = OpusEncoder::new(EncoderConfig { input_rate_hz: rate, ..EncoderConfig::default() })
                .expect("a libopus rate");
            let n = rate as usize / 50;
            assert_eq!(enc.config().frame_samples(), n);
            let len = enc.encode(&vec![0; n], &mut pkt).expect("20 ms at the input rate");
            // 20 ms on the wire (960 samples of the 48 kHz RTP clock) whatever the input rate.
            assert_eq!(packet_samples(&pkt[..len]), Some(FRAME_SAMPLES), "{rate} Hz");
            let wrong = if n == FRAME_SAMPLES { 480 } else { FRAME_SAMPLES };
            assert!(
                matches!(enc.encode(&vec![0; wrong], &mut pkt), Err(CodecError::FrameSize { got, expected }) if got == wrong && expected == n),
                "{rate} Hz took {wrong} samples"
            );
        }
    }

    #[test]
    fn a_24_khz_encoder_decodes_at_48_khz_with_the_same_energy() {
        let cfg = EncoderConfig { input_rate_hz: 24_000, ..EncoderConfig::default() };
        let mut enc = OpusEncoder::new(cfg).expect("encoder");
        let mut dec = OpusDecoder::new().expect("decoder");
        let mut pkt = [0u8; 1500];
        let mut out = vec![0i16; MAX_PACKET_SAMPLES];
        let (mut e_in, mut e_out) = (0f64, 0f64);
        for k in 0..50 {
            // A 220 Hz tone at 24 kHz: every other sample of the 48 kHz one.
            let pcm: Vec<i16> = tone(2 * 480, 2 * k * 480).into_iter().step_by(2).collect();
            let len = enc.encode(&pcm, &mut pkt).expect("encode");
            let n = dec.decode(&pkt[..len], &mut out).expect("decode");
            assert_eq!(n, FRAME_SAMPLES, "20 ms at 48 kHz");
            if k >= 5 {
                // Per second: 24 kHz input vs 48 kHz output samples.
                e_in += 2.0 * pcm.iter().map(|&s| f64::from(s).powi(2)).sum::<f64>();
                e_out += out[..n].iter().map(|&s| f64::from(s).powi(2)).sum::<f64>();
            }
        }
        let ratio = e_out / e_in;
        assert!((0.7..1.3).contains(&ratio), "decoded energy ratio {ratio}");
    }

    #[test]
    fn hostile_bytes_do_not_panic() {
        let mut dec = OpusDecoder::new().expect("decoder");
        let mut out = vec![0i16; MAX_PACKET_SAMPLES];
        assert!(dec.decode(&[], &mut out).is_err());
        assert!(!packet_has_fec(&[]));
        assert_eq!(packet_samples(&[]), None);
        let big = vec![0xffu8; 1 << 20];
        let _ = dec.decode(&big, &mut out);
        let _ = packet_has_fec(&big);
        let mut seed = 7u32;
        for len in 1..300 {
            let pkt: Vec<u8> = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                    (seed >> 16) as u8
                })
                .collect();
            let _ = dec.decode(&pkt, &mut out);
            let _ = packet_has_fec(&pkt);
            let _ = packet_samples(&pkt);
        }
        assert_eq!(dec.conceal(FRAME_SAMPLES, &mut out).expect("plc"), FRAME_SAMPLES);
    }
}
