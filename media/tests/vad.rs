//! VAD hysteresis on real speech (libfvad), on virtual stream time.

mod common;

use std::time::Duration;

use common::*;
use media::pcm::CHUNK_SAMPLES;
use media::{Vad, VadConfig, VadEdge};

fn edges(cfg: VadConfig, samples: &[i16]) -> (Vec<Duration>, Vec<Duration>, Vad) {
    let mut vad = Vad::new(cfg, 48_000).expect("vad");
    let (mut starts, mut stops) = (Vec::new(), Vec::new());
    for frame in samples.chunks_exact(CHUNK_SAMPLES) {
        match vad.process(frame) {
            Some(VadEdge::Started { at }) => starts.push(at),
            Some(VadEdge::Stopped { at }) => stops.push(at),
            None => {}
        }
    }
    (starts, stops, vad)
}

#[test]
fn speech_file_yields_one_start_before_and_one_stop_after_the_speech() {
    let speech = pad(&user_question().samples, 48_000, ms(1000), ms(1500));
    let (first, last) = energy_envelope(&speech, 48_000, 100.0);
    for mode in [media::VadMode::Quality, media::VadMode::Aggressive, media::VadMode::VeryAggressive] {
        let (starts, stops, vad) = edges(VadConfig { mode, ..VadConfig::default() }, &speech);
        assert_eq!(starts.len(), 1, "{mode:?}: starts {starts:?}");
        assert_eq!(stops.len(), 1, "{mode:?}: stops {stops:?}");
        assert!(starts[0].abs_diff(first) <= ms(150), "{mode:?}: start {:?} vs energy onset {first:?}", starts[0]);
        assert!(stops[0].abs_diff(last) <= ms(150), "{mode:?}: stop {:?} vs energy end {last:?}", stops[0]);
        assert!(starts[0] < stops[0]);
        assert!(!vad.is_speaking());
    }
}

#[test]
fn is_speaking_follows_the_edges() {
    let speech = pad(&user_question().samples, 48_000, ms(500), ms(1000));
    let mut vad = Vad::new(VadConfig::default(), 48_000).expect("vad");
    let mut speaking_frames = 0;
    for frame in speech.chunks_exact(CHUNK_SAMPLES) {
        let edge = vad.process(frame);
        if matches!(edge, Some(VadEdge::Started { .. })) {
            assert!(vad.is_speaking());
        }
        if matches!(edge, Some(VadEdge::Stopped { .. })) {
            assert!(!vad.is_speaking());
        }
        speaking_frames += usize::from(vad.is_speaking());
    }
    // ~3.9 s of speech, with the 100 ms onset and 500 ms release.
    assert!((350..=480).contains(&speaking_frames), "speaking for {speaking_frames} x 10 ms");
}

/// Room noise at about -64 dBFS (RMS ~20): above libfvad's energy minimum, below our gate.
fn room_noise(rng: &mut Rng, n: usize) -> impl Iterator<Item = i16> + '_ {
    (0..n).map(move |_| ((rng.unit() - 0.5) * 70.0) as i16)
}

fn bursts(burst: &[i16], gap_ms: usize, count: usize) -> Vec<i16> {
    let mut rng = Rng(4);
    let mut x: Vec<i16> = room_noise(&mut rng, 48_000).collect();
    for _ in 0..count {
        x.extend_from_slice(burst);
        let noise: Vec<i16> = room_noise(&mut rng, 48 * gap_ms).collect();
        x.extend(noise);
    }
    x
}

#[test]
fn short_voiced_bursts_below_min_speech_never_start() {
    let speech = user_question().samples;
    // Loud voiced snippets from the middle of "Hello", in room noise.
    for burst_ms in [10usize, 30, 50, 80] {
        let x = bursts(&speech[48 * 150..48 * (150 + burst_ms)], 400, 12);
        let (starts, _, vad) = edges(VadConfig::default(), &x);
        assert!(starts.is_empty(), "{burst_ms} ms bursts started speech at {starts:?}");
        assert!(
            vad.voiced() > Duration::ZERO || burst_ms <= 10,
            "{burst_ms} ms bursts were never voiced (vacuous test)"
        );
    }
    // Why the energy gate exists: without it libfvad's 60-90 ms hangover over the room noise
    // turns even 30 ms bursts into more than min_speech of "voice".
    let x = bursts(&speech[48 * 150..48 * 180], 400, 12);
    let (starts, _, _) = edges(VadConfig { energy_floor_dbfs: -100.0, ..VadConfig::default() }, &x);
    assert!(!starts.is_empty(), "expected libfvad hangover to start speech without the gate");
    // A sharp click (5 ms of decaying full-scale noise) too.
    let mut rng = Rng(5);
    let mut x = vec![0i16; 48_000];
    for _ in 0..20 {
        x.extend((0..240).map(|i| ((rng.unit() - 0.5) * 60_000.0 * (1.0 - i as f64 / 240.0)) as i16));
        let noise: Vec<i16> = room_noise(&mut rng, 48 * 300).collect();
        x.extend(noise);
    }
    let (starts, _, _) = edges(VadConfig::default(), &x);
    assert!(starts.is_empty(), "clicks started speech at {starts:?}");
}

#[test]
fn speech_in_room_noise_is_still_one_utterance() {
    let mut rng = Rng(8);
    let speech = user_question().samples;
    let mut x: Vec<i16> = room_noise(&mut rng, 48_000).collect();
    let onset = ms(1000);
    x.extend(speech.iter().zip(room_noise(&mut rng, speech.len())).map(|(s, n)| s.saturating_add(n)));
    let tail: Vec<i16> = room_noise(&mut rng, 48 * 1500).collect();
    x.extend(tail);
    let (starts, stops, _) = edges(VadConfig::default(), &x);
    assert_eq!((starts.len(), stops.len()), (1, 1), "starts {starts:?} stops {stops:?}");
    let (first, last) = energy_envelope(&speech, 48_000, 100.0);
    assert!(starts[0].abs_diff(onset + first) <= ms(150), "start {:?}", starts[0]);
    assert!(stops[0].abs_diff(onset + last) <= ms(150), "stop {:?}", stops[0]);
}

#[test]
fn silence_gap_shorter_than_min_silence_does_not_split_an_utterance() {
    let speech = user_question().samples;
    let a = &speech[..48 * 800]; // "Hello there."
    let b = &speech[48 * 1300..48 * 2700];
    for (gap_ms, utterances) in [(300u64, 1usize), (450, 1), (900, 2)] {
        let mut x = vec![0i16; 48 * 500];
        x.extend_from_slice(a);
        x.extend(std::iter::repeat_n(0, 48 * gap_ms as usize));
        x.extend_from_slice(b);
        x.extend(std::iter::repeat_n(0, 48 * 1000));
        let (starts, stops, _) = edges(VadConfig::default(), &x);
        assert_eq!(starts.len(), utterances, "gap {gap_ms} ms: starts {starts:?} stops {stops:?}");
        assert_eq!(stops.len(), utterances, "gap {gap_ms} ms: stops {stops:?}");
    }
}

#[test]
fn longer_min_speech_delays_detection_not_the_onset_time() {
    let speech = pad(&user_question().samples, 48_000, ms(1000), ms(1000));
    let (short, _, _) = edges(VadConfig::default(), &speech);
    let (long, _, _) = edges(VadConfig { min_speech: ms(300), ..VadConfig::default() }, &speech);
    assert_eq!(short.len(), 1);
    assert_eq!(long.len(), 1);
    assert!(short[0].abs_diff(long[0]) <= ms(30), "onset {:?} vs {:?}", short[0], long[0]);
}
