//! Voice activity: webrtc-vad (libfvad) per 10 ms frame, an energy gate, and a hysteresis state
//! machine that turns per-frame decisions into speech start/stop edges with stream times.
//!
//! Why the energy gate: libfvad keeps saying "voice" for 60-90 ms after any voiced run (its
//! hangover). A 40 ms click would then look like 100+ ms of speech. Frames quieter than
//! [`VadConfig::energy_floor_dbfs`] are unvoiced whatever fvad says, which removes hangover over
//! silence and keeps stop times at the real end of speech.
//!
//! Hysteresis: speech starts once `min_speech` worth of voiced frames gathered with no gap longer
//! than [`MAX_ONSET_GAP`]; the edge is stamped at the first voiced frame. Speech stops after
//! `min_silence` of consecutive unvoiced frames; the edge is stamped at the end of the last
//! voiced frame. Times are stream positions (frames counted x 10 ms), so they are deterministic.

use std::time::Duration;

use crate::MediaError;
use crate::pcm::VAD_FRAME;

/// Onset tolerates unvoiced gaps up to this long inside the `min_speech` run ("mostly voiced").
pub const MAX_ONSET_GAP: Duration = Duration::from_millis(20);

/// libfvad aggressiveness: higher modes report speech less readily.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum VadMode {
    /// Mode 0: most speech detected, most false alarms.
    Quality,
    /// Mode 1.
    LowBitrate,
    /// Mode 2 (default): a balance for barge-in on real microphones.
    #[default]
    Aggressive,
    /// Mode 3: fewest false alarms, may miss soft onsets.
    VeryAggressive,
}

/// VAD settings. Defaults: `Aggressive`, 100 ms to start, 500 ms to stop, -55 dBFS floor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VadConfig {
    /// libfvad mode.
    pub mode: VadMode,
    /// Voiced audio needed before a start edge (>= 10 ms).
    pub min_speech: Duration,
    /// Unvoiced audio needed before a stop edge (>= 10 ms).
    pub min_silence: Duration,
    /// Frames with RMS below this (dB relative to full scale) count as unvoiced.
    pub energy_floor_dbfs: f32,
}

impl Default for VadConfig {
    fn default() -> Self {
        Self {
            mode: VadMode::default(),
            min_speech: Duration::from_millis(100),
            min_silence: Duration::from_millis(500),
            energy_floor_dbfs: -55.0,
        }
    }
}

impl VadConfig {
    /// Checks ranges; the error names the key and the fix.
    pub fn validate(&self) -> Result<(), MediaError> {
        if self.min_speech < VAD_FRAME || self.min_speech > Duration::from_secs(10) {
            return Err(MediaError::InvalidConfig { key: "vad.min_speech", reason: "must be 10 ms ..= 10 s" });
        }
        if self.min_silence < VAD_FRAME || self.min_silence > Duration::from_secs(10) {
            return Err(MediaError::InvalidConfig { key: "vad.min_silence", reason: "must be 10 ms ..= 10 s" });
        }
        if !self.energy_floor_dbfs.is_finite() || self.energy_floor_dbfs > 0.0 {
            return Err(MediaError::InvalidConfig {
                key: "vad.energy_floor_dbfs",
                reason: "must be a finite level <= 0 dBFS (use -100 to disable)",
            });
        }
        Ok(())
    }
}

/// A speech edge at a stream position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VadEdge {
    /// Speech began at `at` (start of its first voiced frame).
    Started {
        /// Stream position.
        at: Duration,
    },
    /// Speech ended at `at` (end of its last voiced frame).
    Stopped {
        /// Stream position.
        at: Duration,
    },
}

/// `webrtc_vad::Vad` holds a raw `*mut Fvad`, which makes it `!Send`.
struct Fvad(webrtc_vad::Vad);

// SAFETY: libfvad's state is a plain heap struct with no thread-local data and no thread
// affinity, and this wrapper owns it exclusively (never cloned, never shared by reference across
// threads: it is not `Sync`), so moving the owner to another thread is sound.
unsafe impl Send for Fvad {}

/// Per-frame voice decisions -> start/stop edges (pure, no libfvad).
#[derive(Clone, Debug)]
pub struct Hysteresis {
    min_speech_frames: u32,
    min_silence_frames: u32,
    max_gap_frames: u32,
    frame: Duration,
    frames_seen: u64,
    speaking: bool,
    // Onset candidate while silent.
    cand_start: Option<u64>,
    cand_voiced: u32,
    cand_gap: u32,
    // While speaking.
    last_voiced_end: u64,
    silence_run: u32,
    voiced_frames: u64,
}

fn frames_in(d: Duration, frame: Duration) -> u32 {
    (d.as_nanos().div_ceil(frame.as_nanos().max(1))).clamp(1, u128::from(u32::MAX)) as u32
}

impl Hysteresis {
    /// `frame` is the duration each [`Hysteresis::update`] call covers.
    pub fn new(min_speech: Duration, min_silence: Duration, frame: Duration) -> Self {
        Self {
            min_speech_frames: frames_in(min_speech, frame),
            min_silence_frames: frames_in(min_silence, frame),
            max_gap_frames: (MAX_ONSET_GAP.as_nanos() / frame.as_nanos().max(1)) as u32,
            frame,
            frames_seen: 0,
            speaking: false,
            cand_start: None,
            cand_voiced: 0,
            cand_gap: 0,
            last_voiced_end: 0,
            silence_run: 0,
            voiced_frames: 0,
        }
    }

    fn at(&self, frames: u64) -> Duration {
        Duration::from_nanos((self.frame.as_nanos() as u64).saturating_mul(frames))
    }

    /// Feeds one frame's decision; returns an edge when the state flips.
    pub fn update(&mut self, voiced: bool) -> Option<VadEdge> {
        let k = self.frames_seen;
        self.frames_seen += 1;
        if voiced {
            self.voiced_frames += 1;
        }
        if self.speaking {
            if voiced {
                self.last_voiced_end = k + 1;
                self.silence_run = 0;
                return None;
            }
            self.silence_run += 1;
            if self.silence_run >= self.min_silence_frames {
                self.speaking = false;
                self.silence_run = 0;
                return Some(VadEdge::Stopped { at: self.at(self.last_voiced_end) });
            }
            return None;
        }
        if voiced {
            let start = *self.cand_start.get_or_insert(k);
            self.cand_voiced += 1;
            self.cand_gap = 0;
            if self.cand_voiced >= self.min_speech_frames {
                self.speaking = true;
                self.cand_start = None;
                self.cand_voiced = 0;
                self.last_voiced_end = k + 1;
                self.silence_run = 0;
                return Some(VadEdge::Started { at: self.at(start) });
            }
        } else if self.cand_start.is_some() {
            self.cand_gap += 1;
            if self.cand_gap > self.max_gap_frames {
                self.cand_start = None;
                self.cand_voiced = 0;
                self.cand_gap = 0;
            }
        }
        None
    }

    /// In an utterance (between a start and a stop edge).
    pub fn is_speaking(&self) -> bool {
        self.speaking
    }

    /// Stream position: frames seen x frame duration.
    pub fn position(&self) -> Duration {
        self.at(self.frames_seen)
    }

    /// Total voiced audio seen.
    pub fn voiced(&self) -> Duration {
        self.at(self.voiced_frames)
    }

    /// Back to silence at position zero.
    pub fn reset(&mut self) {
        *self = Self::new(self.frame * self.min_speech_frames, self.frame * self.min_silence_frames, self.frame);
    }
}

/// libfvad + energy gate + [`Hysteresis`] over 10 ms frames at a fixed rate.
pub struct Vad {
    fvad: Fvad,
    rate_hz: u32,
    frame_len: usize,
    floor_sq: f64,
    hyst: Hysteresis,
}

impl std::fmt::Debug for Vad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vad").field("rate_hz", &self.rate_hz).field("hysteresis", &self.hyst).finish_non_exhaustive()
    }
}

fn fvad_mode(m: VadMode) -> webrtc_vad::VadMode {
    match m {
        VadMode::Quality => webrtc_vad::VadMode::Quality,
        VadMode::LowBitrate => webrtc_vad::VadMode::LowBitrate,
        VadMode::Aggressive => webrtc_vad::VadMode::Aggressive,
        VadMode::VeryAggressive => webrtc_vad::VadMode::VeryAggressive,
    }
}

impl Vad {
    /// A VAD for 10 ms frames at `rate_hz` (8000, 16000, 32000 or 48000).
    pub fn new(cfg: VadConfig, rate_hz: u32) -> Result<Self, MediaError> {
        cfg.validate()?;
        let rate = match rate_hz {
            8_000 => webrtc_vad::SampleRate::Rate8kHz,
            16_000 => webrtc_vad::SampleRate::Rate16kHz,
            32_000 => webrtc_vad::SampleRate::Rate32kHz,
            48_000 => webrtc_vad::SampleRate::Rate48kHz,
            _ => {
                return Err(MediaError::InvalidConfig {
                    key: "vad rate",
                    reason: "must be 8000, 16000, 32000 or 48000 Hz",
                });
            }
        };
        let fvad = webrtc_vad::Vad::new_with_rate_and_mode(rate, fvad_mode(cfg.mode));
        let floor = 32768.0 * 10f64.powf(f64::from(cfg.energy_floor_dbfs) / 20.0);
        Ok(Self {
            fvad: Fvad(fvad),
            rate_hz,
            frame_len: (rate_hz / 100) as usize,
            floor_sq: floor * floor,
            hyst: Hysteresis::new(cfg.min_speech, cfg.min_silence, VAD_FRAME),
        })
    }

    /// Samples per 10 ms frame.
    pub fn frame_len(&self) -> usize {
        self.frame_len
    }

    /// Raw per-frame decision (fvad and the energy gate), without hysteresis.
    pub fn classify(&mut self, frame: &[i16]) -> bool {
        if frame.len() != self.frame_len {
            return false;
        }
        let energy: f64 = frame.iter().map(|&s| f64::from(s) * f64::from(s)).sum::<f64>() / frame.len() as f64;
        if energy < self.floor_sq {
            return false;
        }
        // Only fails for frame lengths other than 10/20/30 ms, excluded above.
        self.fvad.0.is_voice_segment(frame).unwrap_or(false)
    }

    /// Classifies one 10 ms frame (`frame_len()` samples; anything else counts as unvoiced)
    /// and advances the stream position by 10 ms.
    pub fn process(&mut self, frame: &[i16]) -> Option<VadEdge> {
        let voiced = self.classify(frame);
        self.hyst.update(voiced)
    }

    /// In an utterance.
    pub fn is_speaking(&self) -> bool {
        self.hyst.is_speaking()
    }

    /// Stream position (frames processed x 10 ms).
    pub fn position(&self) -> Duration {
        self.hyst.position()
    }

    /// Total voiced audio.
    pub fn voiced(&self) -> Duration {
        self.hyst.voiced()
    }

    /// Rate the frames are expected at.
    pub fn rate_hz(&self) -> u32 {
        self.rate_hz
    }

    /// Clears libfvad's adaptive state and the hysteresis (position back to zero).
    pub fn reset(&mut self, cfg: VadConfig) {
        // `fvad_reset` also resets mode and rate to defaults, so set them again.
        self.fvad.0.reset();
        if let Ok(rate) = webrtc_vad::SampleRate::try_from(self.rate_hz as i32) {
            self.fvad.0.set_sample_rate(rate);
        }
        self.fvad.0.set_mode(fvad_mode(cfg.mode));
        self.hyst.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edges(h: &mut Hysteresis, pattern: &[(bool, u32)]) -> Vec<VadEdge> {
        let mut out = Vec::new();
        for &(v, n) in pattern {
            for _ in 0..n {
                out.extend(h.update(v));
            }
        }
        out
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn hysteresis_start_after_min_speech_stamped_at_onset() {
        let mut h = Hysteresis::new(ms(100), ms(500), VAD_FRAME);
        let e = edges(&mut h, &[(false, 30), (true, 9)]);
        assert!(e.is_empty(), "90 ms of voice must not start speech: {e:?}");
        assert!(!h.is_speaking());
        let e = edges(&mut h, &[(true, 1)]);
        assert_eq!(e, vec![VadEdge::Started { at: ms(300) }]);
        assert!(h.is_speaking());
    }

    #[test]
    fn hysteresis_short_bursts_never_start() {
        let mut h = Hysteresis::new(ms(100), ms(500), VAD_FRAME);
        // 50 ms bursts separated by 100 ms of silence, for 3 s.
        let e = edges(&mut h, &[(true, 5), (false, 10)].repeat(20));
        assert!(e.is_empty(), "{e:?}");
    }

    #[test]
    fn hysteresis_mostly_voiced_onset_tolerates_small_gaps() {
        let mut h = Hysteresis::new(ms(100), ms(500), VAD_FRAME);
        let e = edges(&mut h, &[(false, 10), (true, 4), (false, 2), (true, 6)]);
        assert_eq!(e, vec![VadEdge::Started { at: ms(100) }]);
    }

    #[test]
    fn hysteresis_gap_shorter_than_min_silence_keeps_one_utterance() {
        let mut h = Hysteresis::new(ms(100), ms(500), VAD_FRAME);
        let e = edges(&mut h, &[(false, 10), (true, 50), (false, 49), (true, 50), (false, 60)]);
        assert_eq!(e, vec![VadEdge::Started { at: ms(100) }, VadEdge::Stopped { at: ms(100 + 500 + 490 + 500) }]);
    }

    #[test]
    fn hysteresis_stop_after_min_silence_stamped_at_last_voice() {
        let mut h = Hysteresis::new(ms(100), ms(300), VAD_FRAME);
        let e = edges(&mut h, &[(true, 20), (false, 29)]);
        assert_eq!(e, vec![VadEdge::Started { at: ms(0) }]);
        let e = edges(&mut h, &[(false, 1)]);
        assert_eq!(e, vec![VadEdge::Stopped { at: ms(200) }]);
        assert!(!h.is_speaking());
        assert_eq!(h.voiced(), ms(200));
        assert_eq!(h.position(), ms(500));
    }

    #[test]
    fn config_validation_names_the_key() {
        let bad = VadConfig { min_speech: Duration::ZERO, ..VadConfig::default() };
        match Vad::new(bad, 48_000) {
            Err(MediaError::InvalidConfig { key, .. }) => assert_eq!(key, "vad.min_speech"),
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
        assert!(Vad::new(VadConfig::default(), 44_100).is_err());
    }

    #[test]
    fn vad_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<Vad>();
    }
}
