//! Uplink behaviour on virtual time with real libopus, libfvad and rubato.

mod common;

use std::time::Duration;

use common::*;
use media::codec::{EncoderConfig, packet_has_fec};
use media::pcm::{FRAME, FRAME_SAMPLES};
use media::{Uplink, UplinkConfig, UplinkEvent, UplinkStats};

#[derive(Default, Debug)]
struct Heard {
    audio: Vec<i16>,
    starts: Vec<Duration>,
    stops: Vec<Duration>,
    /// Index into `audio` at which each edge was yielded.
    edge_offsets: Vec<usize>,
}

fn drain(up: &mut Uplink, h: &mut Heard) {
    let rate = up.config().output_rate_hz;
    while let Some(ev) = up.poll() {
        match ev {
            UplinkEvent::Audio(pcm) => {
                assert_eq!(pcm.rate_hz, rate);
                h.audio.extend_from_slice(pcm.samples);
            }
            UplinkEvent::SpeechStarted { at } => {
                h.starts.push(at);
                h.edge_offsets.push(h.audio.len());
            }
            UplinkEvent::SpeechStopped { at } => {
                h.stops.push(at);
                h.edge_offsets.push(h.audio.len());
            }
        }
    }
}

/// Feeds `(seq, payload)` at one packet per 20 ms of `now`.
fn run(cfg: UplinkConfig, packets: &[(u16, &[u8])]) -> (Heard, UplinkStats, Uplink) {
    let mut up = Uplink::new(cfg).expect("uplink");
    let mut h = Heard::default();
    for (i, (seq, p)) in packets.iter().enumerate() {
        up.push(FRAME * i as u32, rtp(*seq, p));
        drain(&mut up, &mut h);
    }
    // The stream ends: whatever waits behind a gap is released when its hold runs out.
    if let Some(due) = up.next_timeout() {
        up.handle_timeout(due);
        drain(&mut up, &mut h);
    }
    let s = up.stats();
    (h, s, up)
}

fn cfg(rate: u32) -> UplinkConfig {
    UplinkConfig { output_rate_hz: rate, ..UplinkConfig::default() }
}

/// 10 ms RMS envelope.
fn envelope(x: &[i16], rate: u32) -> Vec<f64> {
    x.chunks((rate / 100) as usize).map(rms).collect()
}

/// Best normalized correlation of two envelopes over lags 0..=max_lag frames.
fn envelope_similarity(a: &[f64], b: &[f64], max_lag: usize) -> f64 {
    let mut best = f64::MIN;
    for lag in 0..=max_lag {
        let n = a.len().min(b.len().saturating_sub(lag));
        let (x, y) = (&a[..n], &b[lag..lag + n]);
        let mx = x.iter().sum::<f64>() / n as f64;
        let my = y.iter().sum::<f64>() / n as f64;
        let cov: f64 = x.iter().zip(y).map(|(p, q)| (p - mx) * (q - my)).sum();
        let vx: f64 = x.iter().map(|p| (p - mx).powi(2)).sum();
        let vy: f64 = y.iter().map(|q| (q - my).powi(2)).sum();
        best = best.max(cov / (vx * vy).sqrt());
    }
    best
}

/// [`envelope_similarity`] at the best alignment of the two signals in 1 ms steps, `heard`
/// up to 10 ms later or up to 80 ms earlier than `reference` (packets dropped as late at the
/// start of a jittery stream): the 10 ms envelopes of two signals a fraction of a window apart
/// (the codec's 6.5 ms lookahead, a resampler's 5 ms) correlate less than the same signals a
/// whole window apart.
fn aligned_similarity(reference: &[i16], ref_rate: u32, heard: &[i16], rate: u32) -> f64 {
    let heard_later = (0..10).map(|skip_ms| {
        let skip = (rate / 1000 * skip_ms) as usize;
        envelope_similarity(&envelope(reference, ref_rate), &envelope(&heard[skip.min(heard.len())..], rate), 3)
    });
    let heard_earlier = (1..=80).map(|skip_ms| {
        let skip = (ref_rate / 1000 * skip_ms) as usize;
        envelope_similarity(&envelope(&reference[skip.min(reference.len())..], ref_rate), &envelope(heard, rate), 0)
    });
    heard_later.chain(heard_earlier).fold(0.0, f64::max)
}

#[test]
fn speech_round_trips_through_opus_and_resampler_at_24k_16k_and_48k() {
    let speech = pad(&user_question().samples, 48_000, ms(300), ms(700));
    let packets = encode_packets(&speech, client_encoder());
    let list: Vec<(u16, &[u8])> = packets.iter().enumerate().map(|(i, p)| (i as u16, p.as_slice())).collect();
    let in_secs = packets.len() as f64 * 0.02;
    let in_rms = rms(&speech);
    // Decoded at the output rate (no resampler), at 48 kHz and resampled (as recordings made
    // before the decode rate replay), and a rate libopus does not decode to (48 kHz + resampler).
    let cases = [
        (24_000u32, true, 24_000, Duration::ZERO),
        (16_000, true, 16_000, Duration::ZERO),
        (48_000, true, 48_000, Duration::ZERO),
        (24_000, false, 48_000, ms(5)),
        (16_000, false, 48_000, ms(5)),
        (22_050, true, 48_000, Duration::from_nanos(6_666_666)),
    ];
    for (rate, at_rate, decode_rate, delay) in cases {
        let (h, s, up) = run(UplinkConfig { decode_at_output_rate: at_rate, ..cfg(rate) }, &list);
        let case = format!("{rate} Hz, decode_at_output_rate {at_rate}");
        assert_eq!(up.decode_rate_hz(), decode_rate, "{case}");
        let out_secs = h.audio.len() as f64 / f64::from(rate);
        assert!((out_secs - in_secs).abs() / in_secs < 0.10, "{case}: heard {out_secs:.3} s of {in_secs:.3} s");
        // Only one 10 ms chunk may sit in the resampler.
        assert!(in_secs - out_secs <= 0.0101, "{case}: {out_secs} s out of {in_secs} s");
        let out_rms = rms(&h.audio);
        assert!((out_rms - in_rms).abs() / in_rms < 0.10, "{case}: rms {out_rms:.1} vs input {in_rms:.1}");
        let sim = aligned_similarity(&speech, 48_000, &h.audio, rate);
        assert!(sim > 0.95, "{case}: heard envelope correlates only {sim:.3} with the speech");
        assert_eq!(s.lost + s.plc_frames + s.fec_frames + s.decode_errors + s.late_or_duplicate, 0, "{s:?}");
        assert_eq!(s.decoded, FRAME * packets.len() as u32, "{case}");
        assert_eq!(up.resampler_delay(), delay, "{case}");
        assert_eq!((h.starts.len(), h.stops.len()), (1, 1), "{case}: one utterance: {h:?}");
    }
}

#[test]
fn decoding_at_24k_is_the_48k_decode_resampled_without_its_delay() {
    // What the provider hears is the same speech either way: the 24 kHz decode is the 48 kHz
    // decode + resampler, 5 ms (the resampler's delay, 120 samples) earlier.
    let speech = pad(&user_question().samples, 48_000, ms(300), ms(700));
    let packets = encode_packets(&speech, client_encoder());
    let list: Vec<(u16, &[u8])> = packets.iter().enumerate().map(|(i, p)| (i as u16, p.as_slice())).collect();
    let (direct, _, _) = run(cfg(24_000), &list);
    let (resampled, _, _) = run(UplinkConfig { decode_at_output_rate: false, ..cfg(24_000) }, &list);
    let corr = |lag: usize| {
        let n = resampled.audio.len() - lag;
        let (x, y) = (&resampled.audio[lag..], &direct.audio[..n]);
        let dot: f64 = x.iter().zip(y).map(|(&p, &q)| f64::from(p) * f64::from(q)).sum();
        let ex: f64 = x.iter().map(|&p| f64::from(p).powi(2)).sum();
        let ey: f64 = y.iter().map(|&q| f64::from(q).powi(2)).sum();
        dot / (ex * ey).sqrt()
    };
    let (best_lag, best) = (0..240).map(|lag| (lag, corr(lag))).fold((0, 0.0), |b, c| if c.1 > b.1 { c } else { b });
    assert!(best > 0.99, "waveforms correlate only {best:.3} (at lag {best_lag})");
    assert!((115..=125).contains(&best_lag), "the 24 kHz decode leads by {best_lag} samples, not the resampler's 120");
    assert!(corr(0) < 0.9, "without the lag the two differ ({:.3}): the test would not see a shift", corr(0));
}

#[test]
fn vad_on_uplink_marks_one_utterance_around_the_speech() {
    let speech = pad(&user_question().samples, 48_000, ms(1000), ms(1500));
    let (first, last) = energy_envelope(&speech, 48_000, 100.0);
    let packets = encode_packets(&speech, client_encoder());
    let list: Vec<(u16, &[u8])> = packets.iter().enumerate().map(|(i, p)| (i as u16, p.as_slice())).collect();
    let (h, s, up) = run(cfg(24_000), &list);
    assert_eq!(h.starts.len(), 1, "starts {:?}", h.starts);
    assert_eq!(h.stops.len(), 1, "stops {:?}", h.stops);
    let (start, stop) = (h.starts[0], h.stops[0]);
    assert!(start.abs_diff(first) <= ms(150), "start {start:?} vs speech onset {first:?}");
    assert!(stop.abs_diff(last) <= ms(150), "stop {stop:?} vs speech end {last:?}");
    assert!(!up.is_speaking());
    assert_eq!(s.utterances, 1);
    assert!(s.speech > ms(2500) && s.speech < ms(4400), "voiced {:?}", s.speech);
    // Edges are yielded in stream order with the audio (24 kHz offsets ~ stream position).
    let start_off = h.edge_offsets[0] as f64 / 24_000.0;
    assert!((start_off - (start + ms(100)).as_secs_f64()).abs() < 0.05, "start yielded at {start_off} s");
}

fn lossy(packets: &[Vec<u8>], loss: f64, seed: u64) -> (Vec<(u16, &[u8])>, u64, u64) {
    let mut rng = Rng(seed);
    let mut out = Vec::new();
    let (mut dropped, mut fec_expected) = (0u64, 0u64);
    let mut run_len = 0;
    let mut gap_open = false;
    for (i, p) in packets.iter().enumerate() {
        // Never drop the first/last packet, and keep bursts within the 100 ms concealment cap.
        let drop = i > 0 && i + 1 < packets.len() && run_len < 4 && rng.unit() < loss;
        if drop {
            dropped += 1;
            run_len += 1;
            gap_open = true;
        } else {
            if gap_open && packet_has_fec(p) {
                fec_expected += 1;
            }
            gap_open = false;
            run_len = 0;
            out.push((i as u16, p.as_slice()));
        }
    }
    (out, dropped, fec_expected)
}

#[test]
fn loss_of_1_3_and_10_percent_is_concealed_with_plc_and_fec() {
    let speech = pad(&user_question().samples, 48_000, ms(200), ms(200));
    let packets = encode_packets(&speech, client_encoder());
    let (clean, _, _) =
        run(cfg(48_000), &packets.iter().enumerate().map(|(i, p)| (i as u16, p.as_slice())).collect::<Vec<_>>());
    for (loss, seed) in [(0.01, 1u64), (0.03, 2), (0.10, 3)] {
        let (list, dropped, fec_expected) = lossy(&packets, loss, seed);
        assert!(dropped > 0, "seed {seed} dropped nothing");
        let (h, s, _) = run(cfg(48_000), &list);
        assert_eq!(h.audio.len(), packets.len() * FRAME_SAMPLES, "{loss}: output duration must equal input duration");
        assert_eq!(s.decoded, FRAME * packets.len() as u32);
        assert_eq!(s.lost, dropped, "{loss}: {s:?}");
        assert_eq!(s.plc_frames + s.fec_frames, dropped, "{loss}: {s:?}");
        assert_eq!(s.fec_frames, fec_expected, "{loss}: FEC used exactly when the next packet had LBRR");
        if loss >= 0.03 {
            assert!(s.fec_frames > 0, "{loss}: the client encoder sends LBRR, FEC must be used");
        }
        assert_eq!(s.concealed, FRAME * dropped as u32);
        let ratio = energy(&h.audio) / energy(&clean.audio);
        assert!((0.75..1.25).contains(&ratio), "{loss}: energy ratio {ratio:.3} vs lossless");
        // Every concealed frame inside loud speech is itself audible.
        for (idx, _) in packets.iter().enumerate().filter(|(i, _)| !list.iter().any(|(s, _)| usize::from(*s) == *i)) {
            let r = idx * FRAME_SAMPLES..(idx + 1) * FRAME_SAMPLES;
            if rms(&clean.audio[r.clone()]) > 1000.0 {
                assert!(rms(&h.audio[r]) > 30.0, "{loss}: concealed frame {idx} is silent");
            }
        }
    }
}

#[test]
fn fec_recovers_lost_frames_better_than_plc() {
    let speech = pad(&user_question().samples, 48_000, ms(100), ms(100));
    let mut err = [0f64; 2];
    let mut measured: Vec<usize> = Vec::new();
    for (k, fec) in [true, false].into_iter().enumerate() {
        let packets = encode_packets(&speech, EncoderConfig { fec, ..client_encoder() });
        let all: Vec<(u16, &[u8])> = packets.iter().enumerate().map(|(i, p)| (i as u16, p.as_slice())).collect();
        let (clean, _, _) = run(cfg(48_000), &all);
        let list: Vec<(u16, &[u8])> =
            all.iter().copied().filter(|(s, _)| s % 7 != 3 || usize::from(*s) + 1 == all.len()).collect();
        let lost = (all.len() - list.len()) as u64;
        // Lost frames whose successor carries LBRR (with FEC on), measured on those only.
        let recoverable: Vec<usize> =
            (0..all.len() - 1).filter(|i| i % 7 == 3 && packet_has_fec(&packets[i + 1])).collect();
        let (h, s, _) = run(cfg(48_000), &list);
        assert_eq!(s.lost, lost);
        assert_eq!(s.plc_frames + s.fec_frames, lost, "{s:?}");
        if fec {
            assert_eq!(s.fec_frames, recoverable.len() as u64, "{s:?}");
            assert!(recoverable.len() as u64 * 2 > lost, "most lost speech frames have LBRR after them");
            measured = recoverable;
        } else {
            assert_eq!((s.fec_frames, s.plc_frames), (0, lost), "{s:?}");
        }
        // Error energy in the recoverable lost frames vs the lossless decode.
        for &i in &measured {
            let r = i * FRAME_SAMPLES..(i + 1) * FRAME_SAMPLES;
            err[k] += clean.audio[r.clone()]
                .iter()
                .zip(&h.audio[r])
                .map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2))
                .sum::<f64>();
        }
    }
    assert!(err[0] < 0.5 * err[1], "FEC error {:.3e} should be well below PLC error {:.3e}", err[0], err[1]);
}

fn seqs_for(packets: &[Vec<u8>], seqs: &[u16]) -> Vec<(u16, Vec<u8>)> {
    seqs.iter().enumerate().map(|(i, s)| (*s, packets[i % packets.len()].clone())).collect()
}

fn run_owned(cfg: UplinkConfig, list: &[(u16, Vec<u8>)]) -> (Heard, UplinkStats) {
    let l: Vec<(u16, &[u8])> = list.iter().map(|(s, p)| (*s, p.as_slice())).collect();
    let (h, s, _) = run(cfg, &l);
    (h, s)
}

fn speech_packets() -> Vec<Vec<u8>> {
    encode_packets(&user_question().samples[..48_000], client_encoder())
}

#[test]
fn sequence_wraparound_is_continuous() {
    let p = speech_packets();
    let seqs: Vec<u16> = (0..20u16).map(|i| 65_530u16.wrapping_add(i)).collect();
    let (h, s) = run_owned(cfg(48_000), &seqs_for(&p, &seqs));
    assert_eq!((s.lost, s.late_or_duplicate, s.plc_frames, s.resets), (0, 0, 0, 0), "{s:?}");
    assert_eq!(h.audio.len(), 20 * FRAME_SAMPLES);
    // A loss right across the wrap is one lost packet.
    let (_, s) = run_owned(cfg(48_000), &seqs_for(&p, &[65_533, 65_534, 65_535, 1, 2]));
    assert_eq!((s.lost, s.plc_frames + s.fec_frames, s.resets), (1, 1, 0), "{s:?}");
}

#[test]
fn a_swapped_pair_is_put_back_in_order_and_duplicates_are_dropped() {
    let p = speech_packets();
    let (h, s) = run_owned(cfg(48_000), &seqs_for(&p, &[10, 11, 12, 12, 14, 13, 15, 11, 16]));
    assert_eq!(s.late_or_duplicate, 2, "12 again, 11 again: {s:?}");
    assert_eq!(s.reordered, 1, "13 after 14 is put back in order: {s:?}");
    assert_eq!((s.lost, s.plc_frames + s.fec_frames), (0, 0), "nothing concealed: {s:?}");
    // 10, 11, 12, 13, 14, 15, 16, all decoded.
    assert_eq!(h.audio.len(), 7 * FRAME_SAMPLES);
    assert_eq!(s.packets, 9);
}

#[test]
fn huge_sequence_jump_resets_without_a_plc_flood() {
    let p = speech_packets();
    let mut seqs: Vec<u16> = (0..10).collect();
    seqs.extend(30_000..30_010);
    seqs.extend(29_000..29_010); // far behind: another restart, not "late"
    let (h, s) = run_owned(cfg(48_000), &seqs_for(&p, &seqs));
    assert_eq!(s.resets, 2, "{s:?}");
    assert_eq!((s.plc_frames, s.fec_frames, s.lost), (0, 0, 0), "{s:?}");
    assert_eq!(h.audio.len(), 30 * FRAME_SAMPLES);
}

#[test]
fn long_gap_concealment_is_capped_at_100_ms_and_the_rest_is_silence() {
    let p = speech_packets();
    let mut seqs: Vec<u16> = (0..5).collect();
    seqs.extend(50..55); // 45 packets (900 ms) missing
    let list: Vec<(Duration, media::RtpIn<'_>)> =
        seqs.iter().enumerate().map(|(i, &seq)| (FRAME * u32::from(seq), rtp(seq, &p[i]))).collect();
    let (h, _, s) = run_timed(cfg(48_000), &list);
    assert_eq!(s.lost, 45);
    assert_eq!(s.plc_frames + s.fec_frames, 5, "100 ms cap = 5 frames: {s:?}");
    assert_eq!(s.concealed, ms(100));
    assert_eq!(s.silence, ms(800), "the rest of the gap is RTP time too: {s:?}");
    // Media time is RTP time: 55 packets' worth from the first timestamp to the last packet's end.
    assert_eq!(h.audio.len(), 55 * FRAME_SAMPLES);
}

#[test]
fn hostile_payloads_never_panic_and_are_counted() {
    let p = speech_packets();
    let mut rng = Rng(99);
    let mut list: Vec<(u16, Vec<u8>)> = Vec::new();
    let mut seq = 0u16;
    let mut push = |payload: Vec<u8>, list: &mut Vec<(u16, Vec<u8>)>| {
        list.push((seq, payload));
        seq = seq.wrapping_add(1);
    };
    push(p[0].clone(), &mut list);
    push(Vec::new(), &mut list); // empty
    push(vec![0xfc; 1 << 20], &mut list); // 1 MiB
    push(vec![0x00; 1 << 20], &mut list); // 1 MiB, different TOC
    for k in 0..40 {
        let len = 1 + rng.below(400) as usize;
        push((0..len).map(|_| rng.next_u64() as u8).collect(), &mut list);
        let real = &p[1 + k % (p.len() - 1)];
        push(real[..1 + rng.below(real.len() as u64 - 1) as usize].to_vec(), &mut list); // truncated
        push(vec![0xff, 0xff, 0xff], &mut list); // code 3, bogus count
    }
    push(p[1].clone(), &mut list);
    let mut up = Uplink::new(cfg(24_000)).expect("uplink");
    let mut h = Heard::default();
    for (i, (s, pl)) in list.iter().enumerate() {
        let before = up.stats();
        up.push(FRAME * i as u32, rtp(*s, pl));
        drain(&mut up, &mut h);
        let after = up.stats();
        assert!(after.decoded > before.decoded, "packet {i} ({} bytes) produced no audio", pl.len());
        assert!(after.decoded - before.decoded <= ms(120));
    }
    let s = up.stats();
    assert!(s.decode_errors >= 3 + 40, "empty, 2 x 1 MiB and the bogus code-3 packets are errors: {s:?}");
    assert_eq!(s.packets, list.len() as u64);
    assert_eq!(s.lost, 0);
    // The stream still works: a fresh valid packet decodes to 20 ms.
    let before = up.stats().decoded;
    up.push(ms(10_000), rtp(seq, &p[2]));
    drain(&mut up, &mut h);
    assert_eq!(up.stats().decoded - before, FRAME);
}

#[test]
fn packets_not_yet_polled_wait_in_the_window_and_are_not_lost() {
    let p = speech_packets();
    let mut up = Uplink::new(cfg(48_000)).expect("uplink");
    up.push(ms(0), rtp(0, &p[0]));
    up.push(ms(20), rtp(1, &p[1]));
    assert_eq!(up.stats().discarded_samples, 0);
    let mut n = 0;
    while let Some(ev) = up.poll() {
        if let UplinkEvent::Audio(a) = ev {
            n += a.samples.len();
        }
    }
    assert_eq!(n, 2 * FRAME_SAMPLES);
}

#[test]
fn invalid_output_rate_is_rejected_with_the_key() {
    for rate in [0, 7_999, 96_000] {
        match Uplink::new(cfg(rate)) {
            Err(media::MediaError::InvalidConfig { key, .. }) => assert_eq!(key, "uplink.output_rate_hz"),
            other => panic!("rate {rate}: expected InvalidConfig, got {other:?}"),
        }
    }
}

/// Drives `packets` (arrival, RTP packet) like the session task: each packet at its arrival,
/// and the uplink's timeout whenever it falls before the next arrival. Returns what was heard,
/// with the arrival time at which each edge came out.
fn run_timed(cfg: UplinkConfig, packets: &[(Duration, media::RtpIn<'_>)]) -> (Heard, Vec<Duration>, UplinkStats) {
    let mut up = Uplink::new(cfg).expect("uplink");
    let mut h = Heard::default();
    let mut edge_times = Vec::new();
    let mut drain_at = |up: &mut Uplink, h: &mut Heard, now: Duration| {
        let before = h.starts.len() + h.stops.len();
        drain(up, h);
        for _ in before..h.starts.len() + h.stops.len() {
            edge_times.push(now);
        }
    };
    for (at, p) in packets {
        while let Some(due) = up.next_timeout().filter(|d| d < at) {
            up.handle_timeout(due);
            drain_at(&mut up, &mut h, due);
        }
        up.push(*at, *p);
        drain_at(&mut up, &mut h, *at);
    }
    if let Some(due) = up.next_timeout() {
        up.handle_timeout(due);
        drain_at(&mut up, &mut h, due);
    }
    (h, edge_times, up.stats())
}

#[test]
fn timestamps_running_ahead_of_arrivals_never_make_more_silence_than_time_passed() {
    // A hostile sender: every 20 ms a packet whose timestamp jumps 9 s.
    let p = speech_packets();
    let list: Vec<(Duration, media::RtpIn<'_>)> = (0..50u16)
        .map(|i| {
            let mut r = rtp(i, &p[usize::from(i)]);
            r.timestamp = u32::from(i) * 432_000;
            (FRAME * u32::from(i), r)
        })
        .collect();
    let (_, _, s) = run_timed(cfg(24_000), &list);
    assert!(s.decoded <= ms(1_000) + ms(60) * 50, "media time {:?} for 1 s of arrivals", s.decoded);
}

#[test]
fn dtx_silence_counts_as_elapsed_time_and_ends_the_turn_on_time() {
    // Speech, then Opus DTX: one packet per 400 ms of silence, contiguous sequence numbers,
    // timestamps jumping by 400 ms (what libopus with usedtx=1 and libwebrtc send).
    let speech = pad(&user_question().samples, 48_000, ms(300), Duration::ZERO);
    let voiced = encode_packets(&speech, client_encoder());
    let quiet = encode_packets(&vec![0i16; 48_000], client_encoder());
    let mut packets = Vec::new();
    let mut ts = 0u32;
    for (i, p) in voiced.iter().enumerate() {
        packets.push((FRAME * i as u32, i as u16, ts, p.as_slice()));
        ts += 960;
    }
    let speech_end = FRAME * voiced.len() as u32;
    for k in 0..25u32 {
        ts += if k == 0 { 0 } else { 19_200 - 960 };
        let seq = (voiced.len() as u32 + k) as u16;
        packets.push((speech_end + ms(400) * k, seq, ts, quiet[1].as_slice()));
        ts += 960;
    }
    let list: Vec<(Duration, media::RtpIn<'_>)> = packets
        .iter()
        .map(|&(at, seq, timestamp, payload)| {
            (at, media::RtpIn { seq, timestamp, payload_type: 111, ssrc: 7, payload })
        })
        .collect();
    let (h, edge_times, s) = run_timed(cfg(24_000), &list);
    assert_eq!((h.starts.len(), h.stops.len()), (1, 1), "one utterance: {h:?}");
    let stopped_at = edge_times[1];
    // min_silence 500 ms, plus at most one DTX interval before the packet that tells us.
    assert!(
        stopped_at <= speech_end + ms(500) + ms(400) + ms(60),
        "end of turn came {:?} after the speech ended (6 s when DTX time was not counted)",
        stopped_at - speech_end
    );
    assert!(s.silence >= ms(9_000), "24 DTX gaps of 380 ms are silence: {s:?}");
    assert_eq!((s.lost, s.plc_frames), (0, 0), "DTX is not loss: {s:?}");
}

/// A small deterministic generator for arrival jitter.
fn jittered(n: usize, base: Duration, jitter_ms: u64, seed: u64) -> Vec<Duration> {
    let mut rng = Rng(seed);
    (0..n).map(|i| FRAME * i as u32 + base + ms(rng.below(2 * jitter_ms + 1)) - ms(jitter_ms)).collect()
}

#[test]
fn sixty_plus_minus_fifty_ms_of_jitter_is_reordered_not_concealed() {
    let speech = pad(&user_question().samples, 48_000, ms(300), ms(800));
    let packets = encode_packets(&speech, client_encoder());
    let arrivals = jittered(packets.len(), ms(60), 50, 42);
    let mut list: Vec<(Duration, media::RtpIn<'_>)> =
        packets.iter().enumerate().map(|(i, p)| (arrivals[i], rtp(i as u16, p))).collect();
    list.sort_by_key(|(at, _)| *at);
    let out_of_order = list.windows(2).filter(|w| w[1].1.seq < w[0].1.seq).count();
    assert!(out_of_order > packets.len() / 5, "the link really reorders ({out_of_order})");
    let (h, _, s) = run_timed(cfg(24_000), &list);
    let concealed = (s.plc_frames + s.fec_frames) as f64 / packets.len() as f64;
    assert!(concealed < 0.03, "{:.1} % concealed (40-50 % without a reorder window): {s:?}", concealed * 100.0);
    assert_eq!(h.starts.len(), 1, "one utterance heard: {h:?}");
    let sim = aligned_similarity(&speech, 48_000, &h.audio, 24_000);
    assert!(sim > 0.95, "heard envelope correlates only {sim:.3} with the speech");
}

#[test]
fn telephone_events_never_reach_the_decoder_and_are_not_loss() {
    let p = speech_packets();
    let mut cfg = cfg(48_000);
    cfg.opus_payload_type = Some(111);
    let dtmf = [5u8, 0x0a, 0x01, 0x40]; // RFC 4733 event 5, volume 10, duration 320
    let mut list = Vec::new();
    let mut seq = 0u16;
    for i in 0..40u32 {
        let at = FRAME * i;
        if (10..16).contains(&i) {
            let te = media::RtpIn { seq, timestamp: i * 960, payload_type: 126, ssrc: 9, payload: &dtmf };
            list.push((at, te));
            seq = seq.wrapping_add(1);
        }
        let audio = media::RtpIn { seq, timestamp: i * 960, payload_type: 111, ssrc: 9, payload: &p[i as usize] };
        list.push((at, audio));
        seq = seq.wrapping_add(1);
    }
    let (h, _, s) = run_timed(cfg, &list);
    assert_eq!(s.foreign_payload, 6, "{s:?}");
    assert_eq!((s.decode_errors, s.lost, s.plc_frames, s.late_or_duplicate), (0, 0, 0, 0), "{s:?}");
    assert_eq!(h.audio.len(), 40 * FRAME_SAMPLES, "every Opus packet decoded once");
}

#[test]
fn a_burst_after_a_stall_is_decoded_whole_without_overflow() {
    let p = speech_packets();
    let mut list = Vec::new();
    for i in 0..150u16 {
        // 20 packets in time, a 3 s stall, then the sender's queue (130 packets) at once;
        // packet 20 itself was lost in the stall.
        let at = if i < 20 { FRAME * u32::from(i) } else { ms(3_400) };
        if i != 20 {
            list.push((at, rtp(i, &p[usize::from(i) % p.len()])));
        }
    }
    let (h, _, s) = run_timed(cfg(48_000), &list);
    assert_eq!(s.lost, 1, "{s:?}");
    assert_eq!((s.late_or_duplicate, s.resets), (0, 0), "{s:?}");
    assert_eq!(h.audio.len(), 150 * FRAME_SAMPLES, "149 packets decoded and one concealed");
}

#[test]
fn a_new_ssrc_is_a_new_stream_not_late_packets() {
    let p = speech_packets();
    let mut list = Vec::new();
    for i in 0..30u16 {
        let mut a = rtp(1_000 + i, &p[usize::from(i)]);
        a.ssrc = 1;
        list.push((FRAME * u32::from(i), a));
    }
    for i in 0..30u16 {
        // The SDK re-created its sender: new SSRC, sequence and timestamp base behind the old.
        let mut b = rtp(7 + i, &p[usize::from(i)]);
        b.ssrc = 2;
        list.push((FRAME * u32::from(30 + i), b));
    }
    let (h, _, s) = run_timed(cfg(48_000), &list);
    assert_eq!(s.ssrc_changes, 1, "{s:?}");
    assert_eq!((s.late_or_duplicate, s.lost, s.plc_frames), (0, 0, 0), "{s:?}");
    assert_eq!(h.audio.len(), 60 * FRAME_SAMPLES);
}

/// What Chrome sends with `usedtx=1` (libopus DTX behind libwebrtc): after speech, 200 ms of
/// small silence frames, then one TOC-only DTX packet; libopus refreshes its comfort noise every
/// 400 ms with one coded frame followed by a DTX packet, and libwebrtc drops every other DTX
/// frame. Sequence numbers stay contiguous; timestamps follow the 20 ms slots.
struct DtxSender<'a> {
    list: Vec<(u32, &'a [u8])>,
    slot: u32,
}

impl<'a> DtxSender<'a> {
    fn speech(&mut self, packets: &'a [Vec<u8>]) {
        for p in packets {
            self.list.push((self.slot, p));
            self.slot += 1;
        }
    }

    fn pause(&mut self, slots: u32, silence: &'a [u8], dtx: &'a [u8]) {
        let end = self.slot + slots;
        for _ in 0..10 {
            self.list.push((self.slot, silence));
            self.slot += 1;
        }
        let mut next_refresh = self.slot + 20;
        self.list.push((self.slot, dtx));
        while next_refresh + 1 < end {
            self.list.push((next_refresh, silence));
            self.list.push((next_refresh + 1, dtx));
            next_refresh += 20;
        }
        self.slot = end;
    }
}

#[test]
fn a_dtx_client_ends_its_turns_on_time_keeps_its_onsets_and_costs_no_timer_between_turns() {
    let speech = pad(&user_question().samples, 48_000, ms(300), Duration::ZERO);
    // The question up to its last loud frame: the sender's DTX starts 200 ms after the speech,
    // well before the VAD's 500 ms of silence have passed.
    let last_loud = speech.chunks(FRAME_SAMPLES).rposition(|c| rms(c) > 300.0).expect("speech");
    let voiced = encode_packets(&speech[..(last_loud + 1) * FRAME_SAMPLES], client_encoder());
    let quiet = encode_packets(&vec![0i16; 9_600], client_encoder());
    let silence = quiet[5].as_slice();
    let dtx = [silence[0] & 0xFC];
    let mut tx = DtxSender { list: Vec::new(), slot: 0 };
    tx.speech(&voiced);
    let pause_from = tx.slot;
    tx.pause(100, silence, &dtx); // 2 s
    let second = tx.slot;
    tx.speech(&voiced);
    tx.pause(75, silence, &dtx);

    let mut up = Uplink::new(cfg(24_000)).expect("uplink");
    let mut h = Heard::default();
    let mut edge_times = Vec::new();
    let (mut timeouts, mut idle_timer_seen) = (0, false);
    for (seq, &(slot, payload)) in tx.list.iter().enumerate() {
        let at = FRAME * slot;
        while let Some(due) = up.next_timeout().filter(|d| *d < at) {
            timeouts += 1;
            up.handle_timeout(due);
            let before = h.stops.len() + h.starts.len();
            drain(&mut up, &mut h);
            edge_times.extend(std::iter::repeat_n(due, h.stops.len() + h.starts.len() - before));
            idle_timer_seen |= !up.is_speaking() && up.next_timeout().is_some();
        }
        let p = media::RtpIn { seq: seq as u16, timestamp: slot * 960, payload_type: 111, ssrc: 9, payload };
        up.push(at, p);
        let before = h.stops.len() + h.starts.len();
        drain(&mut up, &mut h);
        edge_times.extend(std::iter::repeat_n(at, h.stops.len() + h.starts.len() - before));
    }
    let s = up.stats();
    assert_eq!((h.starts.len(), h.stops.len()), (2, 2), "two turns, no false ones: {h:?}");
    // Both ends come min_silence (500 ms) after the speech, on the clock: not when the next
    // refresh packet (up to 400 ms later) would have told us. (A packet's 20 ms are stream time
    // as soon as it arrives, so stream time leads the arrival clock by up to one packet.)
    for (k, &stop) in h.stops.iter().enumerate() {
        let emitted = edge_times[2 * k + 1];
        assert!(
            emitted + FRAME >= stop + ms(500) && emitted <= stop + ms(500) + ms(40),
            "turn {k} ended at {emitted:?} for speech ending at {stop:?}"
        );
    }
    // The second onset is where the sender put it: stream time tracks the sender's clock across
    // the DTX pause (one speech packet sequence later by `second` slots).
    let shift = h.starts[1].checked_sub(h.starts[0]).expect("second onset later");
    let expected = FRAME * second;
    assert!(
        shift.abs_diff(expected) <= ms(20),
        "second onset {shift:?} after the first, sent {expected:?} after it (pause from slot {pause_from})"
    );
    assert_eq!(s.dtx_packets, 5 + 4, "every DTX packet taken as silence: {s:?}");
    assert_eq!((s.lost, s.plc_frames, s.decode_errors), (0, 0, 0), "DTX is neither loss nor an error: {s:?}");
    assert!(s.dtx_fill >= ms(200) && s.dtx_fill <= ms(700), "clock fill only inside utterances: {s:?}");
    assert!(!idle_timer_seen, "between turns a DTX client arms no timer");
    assert!(timeouts <= 2 * 30, "{timeouts} timeouts for two turn ends (one per 20 ms of fill)");
    let total = FRAME * tx.slot;
    assert!(s.decoded.abs_diff(total) <= ms(60), "media time {:?} vs {:?} sent", s.decoded, total);
}

#[test]
fn silence_frames_between_turns_are_not_decoded_and_the_turn_is_heard_the_same() {
    // A sender without DTX: 1 s of coded silence, the question, 1.5 s of coded silence.
    let speech = pad(&user_question().samples, 48_000, ms(1000), ms(1500));
    let packets = encode_packets(&speech, client_encoder());
    let list: Vec<(u16, &[u8])> = packets.iter().enumerate().map(|(i, p)| (i as u16, p.as_slice())).collect();
    let (full, sf, _) = run(UplinkConfig { skip_inactive_frames: false, ..cfg(24_000) }, &list);
    let (lean, sl, _) = run(cfg(24_000), &list);
    assert_eq!(sf.inactive_packets, 0);
    // Most of the lead-in and the tail (the sender's VAD flags them) are not decoded; nothing
    // inside the utterance is skipped.
    assert!(sl.inactive_packets >= 60, "{sl:?}");
    assert_eq!((sl.decode_errors, sl.plc_frames, sl.utterances), (0, 0, 1), "{sl:?}");
    assert_eq!(lean.audio.len(), full.audio.len(), "the same media time");
    assert_eq!((lean.starts.len(), lean.stops.len()), (1, 1), "{lean:?}");
    assert!(lean.starts[0].abs_diff(full.starts[0]) <= ms(20), "onset {:?} vs {:?}", lean.starts, full.starts);
    assert!(lean.stops[0].abs_diff(full.stops[0]) <= ms(20), "end {:?} vs {:?}", lean.stops, full.stops);
    assert!(sl.speech.abs_diff(sf.speech) <= ms(40), "voiced {:?} vs {:?}", sl.speech, sf.speech);
    // What the provider hears of the question is the same speech.
    let (a, b) = (envelope(&lean.audio, 24_000), envelope(&full.audio, 24_000));
    assert!(envelope_similarity(&a, &b, 2) > 0.98, "the question is heard the same");
}

#[test]
fn a_toc_only_dtx_packet_is_silence_without_decoding() {
    // Without DTX, libopus codes digital silence in ~35-byte frames (32 kbit/s VOIP): those are
    // only skipped by their SILK VAD flag (test above); DTX packets (<= 2 bytes) always are.
    let quiet = encode_packets(&vec![0i16; 48_000], EncoderConfig::default());
    assert!(quiet.iter().all(|p| p.len() > media::DTX_MAX_BYTES));
    let dtx = [quiet[0][0] & 0xFC];
    let mut up = Uplink::new(cfg(16_000)).expect("uplink");
    let mut h = Heard::default();
    for i in 0..50u16 {
        up.push(FRAME * u32::from(i), rtp(i, &dtx));
        drain(&mut up, &mut h);
    }
    let s = up.stats();
    assert_eq!((s.dtx_packets, s.decode_errors, s.plc_frames), (50, 0, 0));
    assert_eq!(h.audio.len(), 16_000, "one second of silence at 16 kHz");
    assert!(h.audio.iter().all(|&x| x == 0));
}
