//! Mouth shapes estimated from the character's audio, for providers that give no phoneme timings.
//!
//! Each 20 ms frame of the agent's PCM is windowed and transformed; the smoothed spectrum gives
//! the first two formants (F1: the peak in 250-1000 Hz, F2: the peak above it up to 3 kHz), and
//! the nearest vowel of a small chart (in log-frequency) names the shape. Frames quieter than the
//! gate are `Closed`. Consecutive equal shapes merge into one run, cut at [`MAX_RUN`] so a run's
//! event never waits long for its end.
//!
//! The small set and its mapping to the 15 Oculus/Meta visemes (`signaling::events::Viseme`):
//!
//! | shape | F1, F2 (Hz) | viseme |
//! |---|---|---|
//! | `Closed` | (quiet) | `sil` |
//! | `A` | 730, 1090 | `aa` |
//! | `I` | 330, 2200 | `ih` |
//! | `U` | 320, 900 | `ou` |
//! | `E` | 530, 1840 | `E` |
//! | `O` | 570, 840 | `oh` |
//!
//! Sans-IO and allocation-free after construction; positions are offsets in the item's audio.

use std::sync::Arc;
use std::time::Duration;

use realfft::num_complex::Complex;
use realfft::{RealFftPlanner, RealToComplex};

/// Analysis frame.
pub const FRAME: Duration = Duration::from_millis(20);
/// Longest run reported as one event.
pub const MAX_RUN: Duration = Duration::from_millis(100);
/// Frames below this RMS (dBFS) are `Closed`.
pub const DEFAULT_GATE_DBFS: f32 = -42.0;

/// A mouth shape of the small set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MouthShape {
    /// Silence or closure.
    Closed,
    /// Open: "father".
    A,
    /// Spread: "see".
    I,
    /// Rounded, closed: "blue".
    U,
    /// Mid spread: "bed".
    E,
    /// Rounded, open: "saw".
    O,
}

impl MouthShape {
    /// The Oculus/Meta viseme name this shape maps to.
    pub fn viseme_name(self) -> &'static str {
        match self {
            MouthShape::Closed => "sil",
            MouthShape::A => "aa",
            MouthShape::I => "ih",
            MouthShape::U => "ou",
            MouthShape::E => "E",
            MouthShape::O => "oh",
        }
    }
}

const VOWELS: [(MouthShape, f32, f32); 5] = [
    (MouthShape::A, 730.0, 1090.0),
    (MouthShape::I, 330.0, 2200.0),
    (MouthShape::U, 320.0, 900.0),
    (MouthShape::E, 530.0, 1840.0),
    (MouthShape::O, 570.0, 840.0),
];

/// One run of a shape: where it starts in the item's audio and how long it lasts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShapeRun {
    /// Offset of the run's start in the item's audio.
    pub start: Duration,
    /// Length of the run.
    pub duration: Duration,
    /// The shape.
    pub shape: MouthShape,
}

/// Estimates shapes from a stream of PCM at one rate.
pub struct VisemeEstimator {
    rate_hz: u32,
    frame_len: usize,
    fft: Arc<dyn RealToComplex<f32>>,
    window: Vec<f32>,
    input: Vec<f32>,
    spectrum: Vec<Complex<f32>>,
    scratch: Vec<Complex<f32>>,
    magnitude: Vec<f32>,
    smoothed: Vec<f32>,
    /// Samples of the current frame gathered so far.
    pending: Vec<i16>,
    /// Position (in samples) of the next frame's start.
    position: u64,
    gate: f32,
    run: Option<ShapeRun>,
}

impl std::fmt::Debug for VisemeEstimator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VisemeEstimator").field("rate_hz", &self.rate_hz).field("position", &self.position).finish()
    }
}

impl VisemeEstimator {
    /// An estimator for PCM at `rate_hz` (8 kHz .. 48 kHz) with the default gate.
    pub fn new(rate_hz: u32) -> Self {
        let rate_hz = rate_hz.clamp(8_000, 48_000);
        let frame_len = (rate_hz as usize) / 50;
        let fft_len = frame_len.next_power_of_two();
        let mut planner = RealFftPlanner::<f32>::new();
        let fft = planner.plan_fft_forward(fft_len);
        let spectrum = fft.make_output_vec();
        let scratch = fft.make_scratch_vec();
        let window = (0..frame_len)
            .map(|i| 0.5 - 0.5 * (2.0 * std::f32::consts::PI * i as f32 / (frame_len - 1) as f32).cos())
            .collect();
        let bins = spectrum.len();
        Self {
            rate_hz,
            frame_len,
            fft,
            window,
            input: vec![0.0; fft_len],
            spectrum,
            scratch,
            magnitude: vec![0.0; bins],
            smoothed: vec![0.0; bins],
            pending: Vec::with_capacity(frame_len),
            position: 0,
            gate: 10f32.powf(DEFAULT_GATE_DBFS / 20.0) * 32768.0,
            run: None,
        }
    }

    /// The sample rate analysed.
    pub fn rate_hz(&self) -> u32 {
        self.rate_hz
    }

    /// Feed the next samples of the item; completed runs are appended to `out`.
    pub fn push(&mut self, mut samples: &[i16], out: &mut Vec<ShapeRun>) {
        while !samples.is_empty() {
            let take = (self.frame_len - self.pending.len()).min(samples.len());
            self.pending.extend_from_slice(&samples[..take]);
            samples = &samples[take..];
            if self.pending.len() == self.frame_len {
                let shape = self.classify_pending();
                self.pending.clear();
                let start = self.offset(self.position);
                self.position += self.frame_len as u64;
                self.extend_run(start, shape, out);
            }
        }
    }

    /// The item's audio ended: report the run in progress (and a partial last frame).
    pub fn finish(&mut self, out: &mut Vec<ShapeRun>) {
        if !self.pending.is_empty() {
            let n = self.pending.len();
            self.pending.resize(self.frame_len, 0);
            let shape = self.classify_pending();
            self.pending.clear();
            let start = self.offset(self.position);
            self.position += n as u64;
            self.extend_run(start, shape, out);
            let tail = self.offset(n as u64);
            if let Some(r) = self.run.as_mut() {
                r.duration = r.duration.saturating_sub(FRAME) + tail;
            }
        }
        out.extend(self.run.take());
    }

    /// Start over for a new item.
    pub fn reset(&mut self) {
        self.pending.clear();
        self.position = 0;
        self.run = None;
    }

    fn offset(&self, samples: u64) -> Duration {
        Duration::from_nanos(samples * 1_000_000_000 / u64::from(self.rate_hz))
    }

    fn extend_run(&mut self, start: Duration, shape: MouthShape, out: &mut Vec<ShapeRun>) {
        match self.run.as_mut() {
            Some(r) if r.shape == shape && r.duration + FRAME <= MAX_RUN => r.duration += FRAME,
            _ => {
                out.extend(self.run.take());
                self.run = Some(ShapeRun { start, duration: FRAME, shape });
            }
        }
    }

    /// The shape of the frame in `pending`.
    fn classify_pending(&mut self) -> MouthShape {
        let n = self.frame_len;
        let energy: f64 = self.pending.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>() / n as f64;
        if (energy.sqrt() as f32) < self.gate {
            return MouthShape::Closed;
        }
        for (i, slot) in self.input.iter_mut().enumerate() {
            *slot = if i < n { f32::from(self.pending[i]) / 32768.0 * self.window[i] } else { 0.0 };
        }
        if self.fft.process_with_scratch(&mut self.input, &mut self.spectrum, &mut self.scratch).is_err() {
            return MouthShape::Closed;
        }
        for (m, c) in self.magnitude.iter_mut().zip(&self.spectrum) {
            *m = c.norm_sqr();
        }
        // Smooth over ~200 Hz: harmonics (every 80-250 Hz) merge into formant humps while F1 and F2
        // of back vowels (~300 Hz apart) stay apart.
        let hz_per_bin = self.rate_hz as f32 / self.input.len() as f32;
        let half = ((100.0 / hz_per_bin).round() as usize).max(1);
        let bins = self.magnitude.len();
        let mut acc = 0.0f32;
        for i in 0..(half.min(bins)) {
            acc += self.magnitude[i];
        }
        for i in 0..bins {
            let add = i + half;
            if add < bins {
                acc += self.magnitude[add];
            }
            if i > half {
                acc -= self.magnitude[i - half - 1];
            }
            self.smoothed[i] = acc.max(0.0);
        }
        let peak = |lo: f32, hi: f32| -> Option<f32> {
            let a = (lo / hz_per_bin).ceil() as usize;
            let b = ((hi / hz_per_bin).floor() as usize).min(bins - 1);
            (a..=b)
                .filter(|&i| i < bins)
                .max_by(|&x, &y| self.smoothed[x].total_cmp(&self.smoothed[y]))
                .map(|i| i as f32 * hz_per_bin)
        };
        let Some(f1) = peak(250.0, 1000.0) else { return MouthShape::Closed };
        let Some(f2) = peak((f1 + 200.0).max(650.0), 3000.0) else { return MouthShape::Closed };
        let (lf1, lf2) = (f1.ln(), f2.ln());
        VOWELS
            .iter()
            .map(|&(s, c1, c2)| (s, (lf1 - c1.ln()).powi(2) + (lf2 - c2.ln()).powi(2)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map_or(MouthShape::Closed, |(s, _)| s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vowel: a 120 Hz glottal pulse train through resonators at the formants.
    fn vowel(rate: u32, f1: f32, f2: f32, f3: f32, secs: f32) -> Vec<i16> {
        let n = (rate as f32 * secs) as usize;
        let mut x: Vec<f32> = (0..n).map(|i| if i % (rate as usize / 120) == 0 { 1.0 } else { 0.0 }).collect();
        for (f, bw) in [(f1, 80.0), (f2, 100.0), (f3, 120.0)] {
            let r = (-std::f32::consts::PI * bw / rate as f32).exp();
            let theta = 2.0 * std::f32::consts::PI * f / rate as f32;
            let (a1, a2) = (2.0 * r * theta.cos(), -r * r);
            let (mut y1, mut y2) = (0.0f32, 0.0f32);
            for s in x.iter_mut() {
                let y = *s + a1 * y1 + a2 * y2;
                y2 = y1;
                y1 = y;
                *s = y;
            }
        }
        let peak = x.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-9);
        x.iter().map(|v| (v / peak * 12000.0) as i16).collect()
    }

    fn dominant(rate: u32, samples: &[i16]) -> MouthShape {
        let mut e = VisemeEstimator::new(rate);
        let mut runs = Vec::new();
        e.push(samples, &mut runs);
        e.finish(&mut runs);
        let mut counts = std::collections::HashMap::new();
        for r in runs {
            *counts.entry(r.shape).or_insert(Duration::ZERO) += r.duration;
        }
        counts.into_iter().max_by_key(|(_, d)| *d).map(|(s, _)| s).unwrap()
    }

    #[test]
    fn synthetic_vowels_get_their_shapes_at_24_and_48_khz() {
        for rate in [24_000, 48_000] {
            for (shape, f1, f2) in [
                (MouthShape::A, 730.0, 1090.0),
                (MouthShape::I, 300.0, 2300.0),
                (MouthShape::U, 320.0, 870.0),
                (MouthShape::E, 530.0, 1840.0),
                (MouthShape::O, 570.0, 840.0),
            ] {
                let s = vowel(rate, f1, f2, 2600.0, 0.5);
                assert_eq!(dominant(rate, &s), shape, "{shape:?} at {rate} Hz (F1 {f1}, F2 {f2})");
            }
        }
    }

    #[test]
    fn silence_is_closed_and_runs_cover_the_audio_without_gaps() {
        let rate = 24_000;
        let mut audio = vec![0i16; rate as usize / 2];
        audio.extend(vowel(rate, 730.0, 1090.0, 2600.0, 0.5));
        audio.extend(vec![0i16; 4_800]);
        let mut e = VisemeEstimator::new(rate);
        let mut runs = Vec::new();
        for chunk in audio.chunks(777) {
            e.push(chunk, &mut runs);
        }
        e.finish(&mut runs);
        assert_eq!(runs[0].shape, MouthShape::Closed);
        assert_eq!(runs[0].start, Duration::ZERO);
        let mut at = Duration::ZERO;
        for r in &runs {
            assert_eq!(r.start, at, "runs are contiguous");
            assert!(r.duration <= MAX_RUN, "runs are cut at MAX_RUN");
            at += r.duration;
        }
        assert_eq!(at, Duration::from_millis(1200), "runs cover the whole item");
        let open: Duration = runs.iter().filter(|r| r.shape == MouthShape::A).map(|r| r.duration).sum();
        assert!(open >= Duration::from_millis(400), "the vowel's half second is mostly A: {open:?}");
        assert_eq!(runs.last().unwrap().shape, MouthShape::Closed);
    }

    #[test]
    fn real_speech_opens_the_mouth_while_speaking() {
        let bytes = include_bytes!("../../tests/data/agent_reply.wav");
        let pcm = crate::wav::parse(bytes).unwrap();
        let mut e = VisemeEstimator::new(pcm.rate_hz);
        let mut runs = Vec::new();
        e.push(&pcm.samples, &mut runs);
        e.finish(&mut runs);
        let open: Duration = runs.iter().filter(|r| r.shape != MouthShape::Closed).map(|r| r.duration).sum();
        let total = pcm.duration();
        assert!(open > total / 2, "speech keeps the mouth moving: open {open:?} of {total:?}");
        let distinct: std::collections::HashSet<_> = runs.iter().map(|r| r.shape).collect();
        assert!(distinct.len() >= 4, "several shapes in real speech: {distinct:?}");
    }

    #[test]
    fn names_map_to_the_oculus_set() {
        let names: Vec<&str> =
            [MouthShape::Closed, MouthShape::A, MouthShape::I, MouthShape::U, MouthShape::E, MouthShape::O]
                .iter()
                .map(|s| s.viseme_name())
                .collect();
        assert_eq!(names, ["sil", "aa", "ih", "ou", "E", "oh"]);
    }
}
