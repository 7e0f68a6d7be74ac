//! Fixed-ratio mono resampler: rubato's synchronous FFT resampler behind a sample-count-exact,
//! allocation-free, arbitrary-input-length interface.
//!
//! Input of any length is buffered into fixed chunks of ~10 ms (the exact size is what rubato's
//! `FixedSync::Both` needs for the rate pair; 10 ms for all the usual voice rates), so each
//! chunk costs one small FFT and the delay stays at half an FFT block (5 ms for 48 kHz <-> 24 kHz).
//! Equal rates are a passthrough with zero delay.
//!
//! Two alignments:
//! - [`Alignment::Stream`] (uplink): output sample `n` is produced once input up to
//!   `n / out_rate - delay` is in; the startup delay shows as leading zeros; [`Resampler::delay`]
//!   reports it.
//! - [`Alignment::Trimmed`] (downlink items): the startup delay is dropped and [`Resampler::flush`]
//!   emits the tail, so a clip of `n` input samples becomes exactly `round(n * out / in)` output
//!   samples that line up with it. That keeps per-item playout offsets exact.

use std::time::Duration;

use rubato::audioadapter_buffers::direct::InterleavedSlice;
use rubato::{Fft, FixedSync, Resampler as _};

use crate::pcm::samples_to_duration;

/// Errors of the resampler layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ResampleError {
    /// A rate was zero or above 384 kHz.
    #[error("unsupported sample rate {rate_hz} Hz (expected 1..=384000)")]
    UnsupportedRate {
        /// The rejected rate.
        rate_hz: u32,
    },
    /// rubato refused the rate pair.
    #[error("cannot build resampler {in_hz} Hz -> {out_hz} Hz: {source}")]
    Construction {
        /// Input rate.
        in_hz: u32,
        /// Output rate.
        out_hz: u32,
        /// rubato's reason.
        #[source]
        source: rubato::ResamplerConstructionError,
    },
    /// rubato failed while processing (buffer sizing bug; never expected).
    #[error("resampling failed: {0}")]
    Process(#[from] rubato::ResampleError),
    /// A scratch buffer did not fit rubato's adapter (sizing bug; never expected).
    #[error("resampler scratch buffers are mis-sized")]
    BufferSize,
}

/// Where the resampler's startup delay goes, see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alignment {
    /// Continuous stream: delay appears as leading zeros, no trimming.
    Stream,
    /// Clip: leading delay trimmed, tail emitted by [`Resampler::flush`].
    Trimmed,
}

/// Mono s16 fixed-ratio resampler. Allocation-free after [`Resampler::new`].
pub struct Resampler {
    in_rate: u32,
    out_rate: u32,
    fft: Option<Box<Fft<f32>>>,
    chunk_in: usize,
    chunk_out: usize,
    in_buf: Vec<f32>,
    in_fill: usize,
    out_buf: Vec<f32>,
    out_i16: Vec<i16>,
    delay_out: usize,
    alignment: Alignment,
    skip: usize,
    in_total: u64,
    out_total: u64,
    /// All-zero input chunks run through the FFT in a row (since a non-zero one or a reset).
    zero_chunks: u32,
    /// Output length of the last chunk run through the FFT.
    last_written: usize,
    /// Skip the FFT for silence once its state is all zeros (off only to test that path).
    silence_fast_path: bool,
}

/// All-zero chunks after which the FFT's overlap state holds only zeros: its output for another
/// all-zero chunk is exactly zero, so it is not computed (a silent session's uplink, DTX gaps).
const ZERO_CHUNKS_TO_SETTLE: u32 = 3;

impl std::fmt::Debug for Resampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resampler")
            .field("in_rate", &self.in_rate)
            .field("out_rate", &self.out_rate)
            .field("chunk_in", &self.chunk_in)
            .field("chunk_out", &self.chunk_out)
            .field("delay_out", &self.delay_out)
            .field("alignment", &self.alignment)
            .finish_non_exhaustive()
    }
}

const MAX_RATE: u32 = 384_000;

impl Resampler {
    /// Builds a resampler from `in_rate` Hz to `out_rate` Hz.
    pub fn new(in_rate: u32, out_rate: u32, alignment: Alignment) -> Result<Self, ResampleError> {
        for rate_hz in [in_rate, out_rate] {
            if rate_hz == 0 || rate_hz > MAX_RATE {
                return Err(ResampleError::UnsupportedRate { rate_hz });
            }
        }
        if in_rate == out_rate {
            return Ok(Self {
                in_rate,
                out_rate,
                fft: None,
                chunk_in: 0,
                chunk_out: 0,
                in_buf: Vec::new(),
                in_fill: 0,
                out_buf: Vec::new(),
                out_i16: Vec::new(),
                delay_out: 0,
                alignment,
                skip: 0,
                in_total: 0,
                out_total: 0,
                zero_chunks: 0,
                last_written: 0,
                silence_fast_path: true,
            });
        }
        // 10 ms of input as the chunk-size hint; `Both` rounds it to what the ratio allows.
        let hint = (in_rate as usize / 100).max(1);
        let fft = Fft::<f32>::new(in_rate as usize, out_rate as usize, hint, 1, FixedSync::Both)
            .map_err(|source| ResampleError::Construction { in_hz: in_rate, out_hz: out_rate, source })?;
        let chunk_in = fft.input_frames_next();
        let chunk_out = fft.output_frames_max();
        let delay_out = fft.output_delay();
        let mut r = Self {
            in_rate,
            out_rate,
            fft: Some(Box::new(fft)),
            chunk_in,
            chunk_out,
            in_buf: vec![0.0; chunk_in],
            in_fill: 0,
            out_buf: vec![0.0; chunk_out],
            out_i16: vec![0; chunk_out],
            delay_out,
            alignment,
            skip: 0,
            in_total: 0,
            out_total: 0,
            zero_chunks: 0,
            last_written: 0,
            silence_fast_path: true,
        };
        r.reset();
        Ok(r)
    }

    /// Input rate in Hz.
    pub fn in_rate(&self) -> u32 {
        self.in_rate
    }

    /// Output rate in Hz.
    pub fn out_rate(&self) -> u32 {
        self.out_rate
    }

    /// True when rates are equal and samples pass straight through.
    pub fn is_passthrough(&self) -> bool {
        self.fft.is_none()
    }

    /// Input samples consumed per internal chunk (0 for passthrough).
    pub fn chunk_in(&self) -> usize {
        self.chunk_in
    }

    /// Most output samples one internal chunk produces (0 for passthrough).
    pub fn chunk_out(&self) -> usize {
        self.chunk_out
    }

    /// Algorithmic delay of the resampler (half an FFT block), excluding input buffering.
    pub fn delay(&self) -> Duration {
        samples_to_duration(self.delay_out as u64, self.out_rate)
    }

    /// Delay in output samples.
    pub fn delay_samples(&self) -> usize {
        self.delay_out
    }

    /// Input samples buffered, waiting for a full chunk.
    pub fn pending_input(&self) -> usize {
        self.in_fill
    }

    /// Output samples `n` input samples become once flushed (Trimmed alignment), rounded.
    pub fn output_len_for(&self, n: u64) -> u64 {
        (n * u64::from(self.out_rate) + u64::from(self.in_rate) / 2) / u64::from(self.in_rate)
    }

    /// Output samples still owed for input already accepted (what [`Resampler::flush`] would
    /// emit now, plus nothing for Stream's delay).
    pub fn owed_output(&self) -> u64 {
        self.output_len_for(self.in_total).saturating_sub(self.out_total_aligned())
    }

    fn out_total_aligned(&self) -> u64 {
        match self.alignment {
            Alignment::Trimmed => self.out_total,
            Alignment::Stream => self.out_total.saturating_sub(self.delay_out as u64),
        }
    }

    /// Clears all state (buffered input, FFT overlap) as if newly built.
    pub fn reset(&mut self) {
        if let Some(fft) = self.fft.as_mut() {
            fft.reset();
        }
        self.in_fill = 0;
        self.in_total = 0;
        self.out_total = 0;
        self.zero_chunks = 0;
        self.skip = match self.alignment {
            Alignment::Trimmed => self.delay_out,
            Alignment::Stream => 0,
        };
    }

    /// Resamples `input`, calling `sink` with each block of output as it becomes available
    /// (zero or more calls). Input not filling a whole chunk is kept for the next call.
    pub fn process(&mut self, mut input: &[i16], sink: &mut impl FnMut(&[i16])) -> Result<(), ResampleError> {
        self.in_total += input.len() as u64;
        if self.fft.is_none() {
            if !input.is_empty() {
                self.out_total += input.len() as u64;
                sink(input);
            }
            return Ok(());
        }
        while !input.is_empty() {
            let n = (self.chunk_in - self.in_fill).min(input.len());
            let (head, rest) = input.split_at(n);
            for (d, s) in self.in_buf[self.in_fill..self.in_fill + n].iter_mut().zip(head) {
                *d = f32::from(*s) * (1.0 / 32768.0);
            }
            self.in_fill += n;
            input = rest;
            if self.in_fill == self.chunk_in {
                self.run_chunk(u64::MAX, sink)?;
            }
        }
        Ok(())
    }

    /// Emits the output for all input accepted so far (zero-padding the partial chunk and
    /// pushing the delayed tail out), then resets. With [`Alignment::Trimmed`] the total output
    /// since the last reset is exactly `round(in * out_rate / in_rate)` samples.
    pub fn flush(&mut self, sink: &mut impl FnMut(&[i16])) -> Result<(), ResampleError> {
        if self.fft.is_some() {
            let target = self.output_len_for(self.in_total)
                + match self.alignment {
                    Alignment::Trimmed => 0,
                    Alignment::Stream => self.delay_out as u64,
                };
            // Each round adds at least one chunk of output, so this ends after
            // ceil((delay + chunk) / chunk_out) + 1 rounds at most.
            while self.out_total < target {
                self.in_buf[self.in_fill..].fill(0.0);
                self.in_fill = self.chunk_in;
                self.run_chunk(target, sink)?;
            }
        }
        self.reset();
        Ok(())
    }

    fn run_chunk(&mut self, limit: u64, sink: &mut impl FnMut(&[i16])) -> Result<(), ResampleError> {
        let Some(fft) = self.fft.as_mut() else {
            return Ok(());
        };
        self.in_fill = 0;
        let silent = self.in_buf.iter().all(|&x| x == 0.0);
        let written = if silent && self.silence_fast_path && self.zero_chunks >= ZERO_CHUNKS_TO_SETTLE {
            // Zero in, zero state: the FFT would return exactly zeros of the same length.
            self.out_i16[..self.last_written].fill(0);
            self.last_written
        } else {
            self.zero_chunks = if silent { self.zero_chunks.saturating_add(1) } else { 0 };
            // Buffer sizes were taken from the resampler itself, so these cannot fail;
            // map the error anyway instead of panicking.
            let inp =
                InterleavedSlice::new(&self.in_buf[..], 1, self.chunk_in).map_err(|_| ResampleError::BufferSize)?;
            let mut outp = InterleavedSlice::new_mut(&mut self.out_buf[..], 1, self.chunk_out)
                .map_err(|_| ResampleError::BufferSize)?;
            let (_read, written) = fft.process_into_buffer(&inp, &mut outp, None)?;
            let written = written.min(self.out_buf.len());
            for (d, s) in self.out_i16[..written].iter_mut().zip(&self.out_buf[..written]) {
                *d = (s * 32768.0).round().clamp(-32768.0, 32767.0) as i16;
            }
            self.last_written = written;
            written
        };
        let mut start = self.skip.min(written);
        self.skip -= start;
        let remaining_allowed = limit.saturating_sub(self.out_total);
        let end = written.min(start + remaining_allowed.min(written as u64) as usize);
        if start > end {
            start = end;
        }
        if end > start {
            self.out_total += (end - start) as u64;
            sink(&self.out_i16[start..end]);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(r: &mut Resampler, input: &[i16], step: usize) -> Vec<i16> {
        let mut out = Vec::new();
        for chunk in input.chunks(step.max(1)) {
            r.process(chunk, &mut |s: &[i16]| out.extend_from_slice(s)).expect("process");
        }
        out
    }

    fn sine(rate: u32, freq: f64, secs: f64, amp: f64) -> Vec<i16> {
        let n = (f64::from(rate) * secs) as usize;
        (0..n).map(|i| (amp * (2.0 * std::f64::consts::PI * freq * i as f64 / f64::from(rate)).sin()) as i16).collect()
    }

    /// Goertzel power of `freq` relative to total power; ~1.0 for a pure tone at `freq`.
    fn tone_fraction(x: &[i16], rate: u32, freq: f64) -> f64 {
        let w = 2.0 * std::f64::consts::PI * freq / f64::from(rate);
        let (mut s1, mut s2) = (0.0f64, 0.0f64);
        let mut total = 0.0;
        for &v in x {
            let v = f64::from(v);
            let s0 = v + 2.0 * w.cos() * s1 - s2;
            s2 = s1;
            s1 = s0;
            total += v * v;
        }
        let p = s1 * s1 + s2 * s2 - 2.0 * w.cos() * s1 * s2;
        // Goertzel |X|^2 for a sinusoid of amplitude A over N samples is (A N / 2)^2, total = A^2 N / 2.
        2.0 * p / (x.len() as f64 * total)
    }

    fn zero_crossing_freq(x: &[i16], rate: u32) -> f64 {
        let crossings = x.windows(2).filter(|w| (w[0] < 0) != (w[1] < 0)).count();
        crossings as f64 / 2.0 / (x.len() as f64 / f64::from(rate))
    }

    #[test]
    fn sine_keeps_its_frequency_for_every_voice_rate_pair() {
        for (from, to) in [(48_000, 24_000), (48_000, 16_000), (24_000, 48_000), (16_000, 48_000)] {
            let x = sine(from, 440.0, 1.0, 12_000.0);
            let mut r = Resampler::new(from, to, Alignment::Stream).expect("build");
            // Odd step sizes exercise the internal buffering.
            let y = run(&mut r, &x, 333);
            let body = &y[to as usize / 10..y.len() - to as usize / 20];
            let f = zero_crossing_freq(body, to);
            assert!((f - 440.0).abs() < 2.0, "{from}->{to}: zero-crossing frequency {f} Hz, expected 440");
            let frac = tone_fraction(body, to, 440.0);
            assert!(frac > 0.95, "{from}->{to}: only {frac:.3} of the power is at 440 Hz");
            let expected = x.len() as f64 * f64::from(to) / f64::from(from);
            // Stream mode: at most one chunk of input still buffered.
            let missing = expected - y.len() as f64;
            assert!(
                (0.0..=r.chunk_out() as f64).contains(&missing),
                "{from}->{to}: got {} samples, expected {expected} minus at most one chunk",
                y.len()
            );
        }
    }

    #[test]
    fn trimmed_flush_gives_exact_length() {
        for (from, to, n) in [(24_000, 48_000, 12_345), (48_000, 16_000, 4_801), (22_050, 48_000, 7_000)] {
            let x = sine(from, 300.0, n as f64 / f64::from(from), 8_000.0);
            let mut r = Resampler::new(from, to, Alignment::Trimmed).expect("build");
            let mut y = run(&mut r, &x, 97);
            r.flush(&mut |s: &[i16]| y.extend_from_slice(s)).expect("flush");
            assert_eq!(y.len() as u64, r.output_len_for(n as u64), "{from}->{to} n={n}");
            assert_eq!(y.len() as u64, ((n as u64) * u64::from(to) + u64::from(from) / 2) / u64::from(from));
        }
    }

    /// Cross-correlation lag (in output samples) that best aligns `y` with the input `x`
    /// sampled on the output grid.
    fn measured_delay(x: &[f64], y: &[i16], from: u32, to: u32) -> usize {
        let ratio = f64::from(from) / f64::from(to);
        let mut best = (0usize, f64::MIN);
        for lag in 0..600usize {
            let mut acc = 0.0;
            let mut m = 0usize;
            while m + lag < y.len() {
                let xi = m as f64 * ratio;
                if xi.fract() == 0.0 && (xi as usize) < x.len() {
                    acc += x[xi as usize] * f64::from(y[m + lag]);
                }
                m += 1;
            }
            if acc > best.1 {
                best = (lag, acc);
            }
        }
        best.0
    }

    #[test]
    fn reported_delay_matches_cross_correlation() {
        // Band-limited noise (moving average of a LCG) so aliasing does not blur the peak.
        let mut seed = 12345u32;
        let raw: Vec<f64> = (0..48_000)
            .map(|_| {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                f64::from((seed >> 16) as i16)
            })
            .collect();
        let lp: Vec<f64> = raw.windows(12).map(|w| w.iter().sum::<f64>() / 12.0 / 4.0).collect();
        for (from, to) in [(48_000u32, 24_000u32), (48_000, 16_000), (24_000, 48_000)] {
            // Take the input at `from` by decimating the 48 kHz band-limited noise when needed.
            let step = (48_000 / from) as usize;
            let x: Vec<f64> = lp.iter().step_by(step).copied().collect();
            let xi: Vec<i16> = x.iter().map(|v| *v as i16).collect();
            let mut r = Resampler::new(from, to, Alignment::Stream).expect("build");
            let y = run(&mut r, &xi, 480);
            let d = measured_delay(&x, &y, from, to);
            assert!(
                d.abs_diff(r.delay_samples()) <= 1,
                "{from}->{to}: measured delay {d} samples, reported {} ({:?})",
                r.delay_samples(),
                r.delay()
            );
            assert_eq!(r.delay(), Duration::from_millis(5), "{from}->{to}: 10 ms chunks give 5 ms delay");
        }
    }

    #[test]
    fn passthrough_has_no_delay_and_copies() {
        let mut r = Resampler::new(48_000, 48_000, Alignment::Stream).expect("build");
        assert!(r.is_passthrough());
        assert_eq!(r.delay(), Duration::ZERO);
        let x: Vec<i16> = (0..1000).map(|i| i as i16).collect();
        assert_eq!(run(&mut r, &x, 77), x);
    }

    #[test]
    fn silence_skips_the_fft_once_settled_with_the_same_output() {
        let mut input = sine(48_000, 440.0, 0.2, 20_000.0);
        input.extend(std::iter::repeat_n(0, 48_000));
        input.extend(sine(48_000, 300.0, 0.2, 20_000.0));
        input.extend(std::iter::repeat_n(0, 4_800));
        for (from, to) in [(48_000, 24_000), (48_000, 16_000), (24_000, 48_000)] {
            let mut fast = Resampler::new(from, to, Alignment::Stream).expect("build");
            let mut full = Resampler::new(from, to, Alignment::Stream).expect("build");
            full.silence_fast_path = false;
            let (a, b) = (run(&mut fast, &input, 960), run(&mut full, &input, 960));
            assert_eq!(a.len(), b.len(), "{from}->{to}");
            assert!(a == b, "{from}->{to}: output differs with the fast path");
            assert!(a.iter().any(|&x| x.abs() > 5_000), "the tones came through");
        }
    }

    #[test]
    fn reset_clears_history() {
        let mut r = Resampler::new(48_000, 24_000, Alignment::Stream).expect("build");
        let loud = sine(48_000, 440.0, 0.1, 20_000.0);
        let _ = run(&mut r, &loud, 480);
        r.reset();
        let y = run(&mut r, &[0; 4800], 480);
        assert!(y.iter().all(|&s| s == 0), "after reset, silence in gives silence out");
    }

    #[test]
    fn rejects_zero_rate() {
        assert!(matches!(
            Resampler::new(0, 48_000, Alignment::Stream),
            Err(ResampleError::UnsupportedRate { rate_hz: 0 })
        ));
    }
}
