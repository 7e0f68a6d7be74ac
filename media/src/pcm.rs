//! Unit-carrying PCM types: mono, signed 16-bit, with the sample rate in Hz next to the samples.

use std::time::Duration;

/// Opus always runs at 48 kHz inside this crate (decode and encode).
pub const OPUS_RATE: u32 = 48_000;
/// One Opus/RTP frame: 20 ms.
pub const FRAME: Duration = Duration::from_millis(20);
/// One VAD / resampler chunk: 10 ms.
pub const VAD_FRAME: Duration = Duration::from_millis(10);
/// Samples in one 20 ms frame at 48 kHz.
pub const FRAME_SAMPLES: usize = 960;
/// Samples in one 10 ms chunk at 48 kHz.
pub const CHUNK_SAMPLES: usize = 480;

/// Borrowed mono s16 audio at `rate_hz`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PcmRef<'a> {
    /// Sample rate in Hz.
    pub rate_hz: u32,
    /// Mono samples.
    pub samples: &'a [i16],
}

impl<'a> PcmRef<'a> {
    /// Wraps `samples` recorded at `rate_hz`.
    pub fn new(rate_hz: u32, samples: &'a [i16]) -> Self {
        Self { rate_hz, samples }
    }

    /// Duration of the audio (zero when `rate_hz` is zero).
    pub fn duration(&self) -> Duration {
        samples_to_duration(self.samples.len() as u64, self.rate_hz)
    }

    /// Root mean square of the samples (see [`rms`]).
    pub fn rms(&self) -> f64 {
        rms(self.samples)
    }

    /// Copies into an owned [`Pcm`].
    pub fn to_owned(&self) -> Pcm {
        Pcm { rate_hz: self.rate_hz, samples: self.samples.to_vec() }
    }
}

/// Owned mono s16 audio at `rate_hz`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pcm {
    /// Sample rate in Hz.
    pub rate_hz: u32,
    /// Mono samples.
    pub samples: Vec<i16>,
}

impl Pcm {
    /// Wraps `samples` recorded at `rate_hz`.
    pub fn new(rate_hz: u32, samples: Vec<i16>) -> Self {
        Self { rate_hz, samples }
    }

    /// Borrows as a [`PcmRef`].
    pub fn as_ref(&self) -> PcmRef<'_> {
        PcmRef { rate_hz: self.rate_hz, samples: &self.samples }
    }

    /// Duration of the audio.
    pub fn duration(&self) -> Duration {
        self.as_ref().duration()
    }

    /// Root mean square of the samples (see [`rms`]).
    pub fn rms(&self) -> f64 {
        rms(&self.samples)
    }
}

/// Root mean square of `samples`, in sample units (full scale 32768; speech is typically a few
/// hundred to a few thousand); 0 for no samples.
pub fn rms(samples: &[i16]) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    let energy: f64 = samples.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
    (energy / samples.len() as f64).sqrt()
}

/// `n` samples at `rate_hz` as a `Duration` (exact to the nanosecond, rounded down).
pub fn samples_to_duration(n: u64, rate_hz: u32) -> Duration {
    if rate_hz == 0 {
        return Duration::ZERO;
    }
    let rate = u64::from(rate_hz);
    let secs = n / rate;
    let rem = n % rate;
    // rem < rate <= u32::MAX, so rem * 1e9 fits in u64.
    Duration::new(secs, (rem * 1_000_000_000 / rate) as u32)
}

/// Number of whole samples at `rate_hz` in `d` (rounded down).
pub fn duration_to_samples(d: Duration, rate_hz: u32) -> u64 {
    (d.as_nanos() * u128::from(rate_hz) / 1_000_000_000) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_duration_round_trip() {
        assert_eq!(samples_to_duration(960, OPUS_RATE), FRAME);
        assert_eq!(samples_to_duration(240, 24_000), VAD_FRAME);
        assert_eq!(duration_to_samples(FRAME, OPUS_RATE), FRAME_SAMPLES as u64);
        assert_eq!(duration_to_samples(Duration::from_secs(3), 16_000), 48_000);
        assert_eq!(samples_to_duration(1, 0), Duration::ZERO);
        assert_eq!(PcmRef::new(24_000, &[0; 480]).duration(), FRAME);
    }

    #[test]
    fn rms_of_a_square_wave_is_its_amplitude() {
        let square: Vec<i16> = (0..480).map(|i| if i % 2 == 0 { 1000 } else { -1000 }).collect();
        assert_eq!(rms(&square), 1000.0);
        assert_eq!(Pcm::new(48_000, square).rms(), 1000.0);
        assert_eq!(rms(&[]), 0.0);
    }
}
