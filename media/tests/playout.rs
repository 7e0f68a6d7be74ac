//! Playout pacing, clear() accounting, backpressure and barge-in, on virtual time.

mod common;

use std::time::Duration;

use common::*;
use media::codec::{EncoderConfig, MAX_PACKET_SAMPLES, OpusDecoder};
use media::pcm::{FRAME, FRAME_SAMPLES, PcmRef};
use media::{BargeIn, BargeInConfig, InterruptReason, Playout, PlayoutConfig};

#[derive(Debug, Clone)]
struct Sent {
    at: Duration,
    item: String,
    offset: Duration,
    due: Duration,
    spurt: bool,
    bytes: Vec<u8>,
}

fn poll_once(p: &mut Playout, now: Duration, out: &mut Vec<Sent>) -> bool {
    let mut buf = [0u8; 1500];
    match p.poll(now, &mut buf) {
        Some(f) => {
            out.push(Sent {
                at: now,
                item: f.item_id.to_owned(),
                offset: f.item_offset,
                due: f.due,
                spurt: f.talkspurt_start,
                bytes: buf[..f.len].to_vec(),
            });
            true
        }
        None => false,
    }
}

/// The ideal caller: sleeps exactly until `next_due`, polls until `None`.
fn drain_ideal(p: &mut Playout, mut now: Duration, out: &mut Vec<Sent>) -> Duration {
    while let Some(due) = p.next_due() {
        now = now.max(due);
        while poll_once(p, now, out) {}
    }
    now
}

/// [`drain_ideal`] up to `until` (a playout with DTX has a refresh due in every pause).
fn drain_ideal_until(p: &mut Playout, mut now: Duration, until: Duration, out: &mut Vec<Sent>) -> Duration {
    while let Some(due) = p.next_due().filter(|d| *d <= until) {
        now = now.max(due);
        while poll_once(p, now, out) {}
    }
    now
}

/// The encoder input (queue) rates the behaviour tests run at: the default 48 kHz, and 24 kHz,
/// the rate of the agent speech they push (no resampler).
const RATES: [u32; 2] = [48_000, 24_000];

/// `cfg` with its encoder (and queue) at `rate_hz`.
fn at_rate(rate_hz: u32, cfg: PlayoutConfig) -> PlayoutConfig {
    PlayoutConfig { encoder: EncoderConfig { input_rate_hz: rate_hz, ..cfg.encoder }, ..cfg }
}

fn agent_3s() -> Vec<i16> {
    agent_reply().samples[..72_000].to_vec()
}

fn assert_no_burst(sent: &[Sent], min_gap: Duration) {
    for w in sent.windows(2) {
        assert!(
            w[1].at >= w[0].at + min_gap,
            "two frames {:?} apart (at {:?} and {:?})",
            w[1].at - w[0].at,
            w[0].at,
            w[1].at
        );
    }
}

#[test]
fn ideal_clock_sends_one_frame_every_20_ms_for_exactly_the_audio() {
    let mut p = Playout::new(PlayoutConfig::default()).expect("playout");
    let pcm = agent_3s();
    assert_eq!(p.push("a", PcmRef::new(24_000, &pcm)).expect("push"), pcm.len());
    assert!(p.finish_item("a"));
    let mut sent = Vec::new();
    drain_ideal(&mut p, ms(1000), &mut sent);
    assert_eq!(sent.len(), 150, "3 s of audio = 150 frames");
    for (k, s) in sent.iter().enumerate() {
        assert_eq!(s.at, ms(1000) + FRAME * k as u32, "frame {k} sent off-grid");
        assert_eq!(s.offset, FRAME * k as u32);
        assert_eq!(s.spurt, k == 0);
        assert_eq!(s.item, "a");
    }
    let st = p.stats();
    assert_eq!((st.frames_out, st.late_frames, st.stalls, st.underruns), (150, 0, 0, 0));
    assert!(!p.is_active());
    assert_eq!(p.next_due(), None);
}

#[test]
fn jittery_polls_and_a_200_ms_stall_never_burst_and_send_all_audio() {
    let mut p = Playout::new(PlayoutConfig::default()).expect("playout");
    let pcm = agent_3s();
    p.push("a", PcmRef::new(24_000, &pcm)).expect("push");
    p.finish_item("a");
    let mut rng = Rng(42);
    let mut now = ms(0);
    let mut sent = Vec::new();
    let mut stalled = false;
    while p.is_active() {
        // Irregular wakeups: 1..=9 ms, microsecond resolution, several polls per wakeup.
        now += Duration::from_micros(1_000 + rng.below(8_000));
        if !stalled && sent.len() == 60 {
            now += ms(200);
            stalled = true;
        }
        let before = sent.len();
        for _ in 0..3 {
            poll_once(&mut p, now, &mut sent);
        }
        assert!(sent.len() - before <= 1, "more than one frame at one `now`");
        assert!(now < ms(10_000), "playout stuck");
    }
    assert_no_burst(&sent, FRAME);
    assert_eq!(sent.len(), 150, "frames_out x 20 ms must equal the 3 s of audio");
    assert_eq!(p.stats().frames_out * 20, 3_000);
    // The stall is counted, and the frame after it resumes at real-time rate.
    let st = p.stats();
    assert!(st.stalls == 1 && st.max_lateness >= ms(170), "{st:?}");
    assert!(st.late_frames >= 1, "{st:?}");
    let i = sent.iter().position(|s| s.at - s.due >= ms(170)).expect("the stalled frame");
    assert!(sent[i + 1].at - sent[i].at >= FRAME && sent[i + 1].at - sent[i].at < FRAME + ms(10));
    // Offsets stay contiguous across the stall: nothing skipped, nothing repeated.
    for (k, s) in sent.iter().enumerate() {
        assert_eq!(s.offset, FRAME * k as u32);
    }
}

#[test]
fn tolerance_lets_a_consistently_late_timer_hold_the_grid() {
    // A timer that always fires 1.3 ms late (tokio rounds sleeps up to the next ms).
    let run = |tol: Duration| {
        let mut p = Playout::new(PlayoutConfig { jitter_tolerance: tol, ..PlayoutConfig::default() }).expect("playout");
        let pcm = agent_3s();
        p.push("a", PcmRef::new(24_000, &pcm)).expect("push");
        p.finish_item("a");
        let mut sent = Vec::new();
        let mut now = ms(0);
        while let Some(due) = p.next_due() {
            now = now.max(due + Duration::from_micros(1_300));
            while poll_once(&mut p, now, &mut sent) {}
        }
        (sent, p.stats())
    };
    let (strict, st) = run(Duration::ZERO);
    assert_no_burst(&strict, FRAME);
    // Strict spacing: each frame inherits the previous lateness, so the send rate slips by
    // 1.3 ms per frame (6.5 % slower than real time) while every frame is "on time".
    assert_eq!((st.stalls, st.late_frames), (0, 0), "{st:?}");
    assert_eq!(st.slip, Duration::from_micros(1_300) * 148, "{st:?}");
    let span = strict[149].at - strict[0].at;
    assert_eq!(span, Duration::from_micros(21_300) * 149);
    let (tolerant, st) = run(ms(2));
    assert_no_burst(&tolerant, FRAME - ms(2));
    assert_eq!((st.stalls, st.late_frames, st.slip), (0, 0, Duration::ZERO), "{st:?}");
    let last = tolerant.last().expect("frames");
    assert_eq!(last.due, tolerant[0].at + FRAME * 149, "grid held at real-time rate");
    assert!(last.at - last.due <= ms(2));
}

#[test]
fn sent_frames_decode_to_the_pushed_speech() {
    let mut p = Playout::new(PlayoutConfig::default()).expect("playout");
    let reply = agent_reply();
    let mut offered = 0;
    let mut now = ms(0);
    let mut sent = Vec::new();
    // Provider-like: deltas of 100 ms, pushed as room allows.
    for chunk in reply.samples.chunks(2_400) {
        let mut rest = chunk;
        while !rest.is_empty() {
            let n = p.push("r1", PcmRef::new(24_000, rest)).expect("push");
            offered += n;
            rest = &rest[n..];
            if n == 0 {
                now = now.max(p.next_due().expect("queue full means frames are due"));
                poll_once(&mut p, now, &mut sent);
            }
        }
    }
    assert_eq!(offered, reply.samples.len());
    p.finish_item("r1");
    drain_ideal(&mut p, now, &mut sent);
    let frames = (reply.samples.len() * 2).div_ceil(FRAME_SAMPLES);
    assert_eq!(sent.len(), frames);
    let mut dec = OpusDecoder::new().expect("decoder");
    let mut pcm = vec![0i16; MAX_PACKET_SAMPLES];
    let mut heard = Vec::new();
    for s in &sent {
        let n = dec.decode(&s.bytes, &mut pcm).expect("decodable");
        heard.extend_from_slice(&pcm[..n]);
    }
    let dur = heard.len() as f64 / 48_000.0;
    let want = reply.samples.len() as f64 / 24_000.0;
    assert!((dur - want).abs() < 0.021, "heard {dur} s of {want} s");
    let (ri, ro) = (rms(&reply.samples), rms(&heard));
    assert!((ro - ri).abs() / ri < 0.10, "rms {ro:.1} vs {ri:.1}");
    // Same speech, in time: 10 ms envelopes line up (opus lookahead < 1 frame).
    let env_in: Vec<f64> = reply.samples.chunks(240).map(rms).collect();
    let env_out: Vec<f64> = heard.chunks(480).map(rms).collect();
    let n = env_in.len().min(env_out.len());
    let corr = pearson(&env_in[..n], &env_out[..n]);
    assert!(corr > 0.95, "envelope correlation {corr:.3}");
}

fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let cov: f64 = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum();
    let vx: f64 = x.iter().map(|a| (a - mx).powi(2)).sum();
    let vy: f64 = y.iter().map(|b| (b - my).powi(2)).sum();
    cov / (vx * vy).sqrt()
}

/// Whole 24 kHz reply pushed as a provider would (100 ms deltas, backpressure) into a playout
/// encoding at `rate`, then drained on the ideal clock.
fn play_reply_at(rate: u32, reply: &[i16]) -> (Vec<Sent>, Playout) {
    let mut p = Playout::new(at_rate(rate, PlayoutConfig::default())).expect("playout");
    assert_eq!(p.rate_hz(), rate);
    let mut now = ms(0);
    let mut sent = Vec::new();
    for chunk in reply.chunks(2_400) {
        let mut rest = chunk;
        while !rest.is_empty() {
            let n = p.push("r1", PcmRef::new(24_000, rest)).expect("push");
            rest = &rest[n..];
            if n == 0 {
                now = now.max(p.next_due().expect("queue full means frames are due"));
                poll_once(&mut p, now, &mut sent);
            }
        }
    }
    p.finish_item("r1");
    drain_ideal(&mut p, now, &mut sent);
    (sent, p)
}

fn decode_all(sent: &[Sent]) -> Vec<i16> {
    let mut dec = OpusDecoder::new().expect("decoder");
    let mut pcm = vec![0i16; MAX_PACKET_SAMPLES];
    let mut heard = Vec::new();
    for s in sent {
        let n = dec.decode(&s.bytes, &mut pcm).expect("decodable");
        assert_eq!(n, FRAME_SAMPLES, "every frame is 20 ms at 48 kHz");
        heard.extend_from_slice(&pcm[..n]);
    }
    heard
}

/// Opus bandwidth of a packet from its TOC config (RFC 6716 §3.1, Table 2): fullband?
fn is_fullband(packet: &[u8]) -> bool {
    matches!(packet[0] >> 3, 14 | 15 | 28..=31)
}

#[test]
fn a_24_khz_playout_sends_what_the_48_khz_one_does_without_resampling() {
    let reply = agent_reply();
    let (full, _) = play_reply_at(48_000, &reply.samples);
    let (swb, p) = play_reply_at(24_000, &reply.samples);
    // Same frames on the same grid, for the same items and offsets: only the coding differs.
    assert_eq!(swb.len(), full.len());
    assert_eq!(swb.len(), reply.samples.len().div_ceil(480), "20 ms = 480 samples at 24 kHz");
    for (a, b) in full.iter().zip(&swb) {
        assert_eq!((a.at, a.due, a.offset, a.spurt, &a.item), (b.at, b.due, b.offset, b.spurt, &b.item));
    }
    assert_eq!(p.stats().frames_out, swb.len() as u64);
    // Encoded from 48 kHz, speech is coded fullband; from 24 kHz never (nothing above 12 kHz).
    assert!(full.iter().filter(|s| is_fullband(&s.bytes)).count() * 2 > full.len(), "the 48 kHz path codes fullband");
    assert!(swb.iter().all(|s| !is_fullband(&s.bytes)), "a 24 kHz encoder coded fullband");
    let (heard_full, heard) = (decode_all(&full), decode_all(&swb));
    let dur = heard.len() as f64 / 48_000.0;
    let want = reply.samples.len() as f64 / 24_000.0;
    assert!((dur - want).abs() < 0.021, "heard {dur} s of {want} s");
    let (ri, rf, rs) = (rms(&reply.samples), rms(&heard_full), rms(&heard));
    assert!((rs - ri).abs() / ri < 0.10, "rms {rs:.1} vs input {ri:.1}");
    assert!((rs - rf).abs() / rf < 0.05, "rms {rs:.1} vs the 48 kHz path's {rf:.1}");
    // In time with the input: 10 ms envelopes line up (no resampler delay to add).
    let env_in: Vec<f64> = reply.samples.chunks(240).map(rms).collect();
    let env_out: Vec<f64> = heard.chunks(480).map(rms).collect();
    let n = env_in.len().min(env_out.len());
    let corr = pearson(&env_in[..n], &env_out[..n]);
    assert!(corr > 0.95, "envelope correlation {corr:.3}");
}

#[test]
fn a_24_khz_playout_queues_24_khz_audio_as_is_and_resamples_other_rates() {
    let mut p = Playout::new(at_rate(24_000, PlayoutConfig::default())).expect("playout");
    let pcm = agent_3s();
    // No resampler delay: all 200 ms pushed are queued and go out while the item is open.
    assert_eq!(p.push("a", PcmRef::new(24_000, &pcm[..4_800])).expect("push"), 4_800);
    assert_eq!(p.buffered(), ms(200));
    let mut sent = Vec::new();
    let now = drain_ideal(&mut p, ms(0), &mut sent);
    assert_eq!(sent.len(), 10);
    assert!(p.is_active(), "open item");
    // 48 kHz audio (a rate change mid-item) is resampled to 24 kHz: 500 ms more, 25 frames.
    let tone: Vec<i16> = (0..24_000).map(|i| (6000.0 * (i as f64 * 0.05).sin()) as i16).collect();
    assert_eq!(p.push("a", PcmRef::new(48_000, &tone)).expect("push"), 24_000);
    p.finish_item("a");
    drain_ideal(&mut p, now, &mut sent);
    assert_eq!(sent.len(), 35, "200 ms + 500 ms (+ the resampler's tail, padded) = 35 frames");
    let heard = decode_all(&sent[10..]);
    let (ri, ro) = (rms(&tone), rms(&heard[4_800..heard.len() - 4_800]));
    assert!((ro - ri).abs() / ri < 0.15, "rms {ro:.1} vs {ri:.1}");
    // Bounded at the queue's rate: 10 s of 24 kHz audio fits the default queue, 11 s does not.
    let mut q = Playout::new(at_rate(24_000, PlayoutConfig::default())).expect("playout");
    let long = vec![100i16; 24_000 * 11];
    let n = q.push("b", PcmRef::new(24_000, &long)).expect("push");
    assert!((239_000..240_000).contains(&n), "accepted {n} samples of 24 kHz (~10 s)");
    assert!(q.buffered() <= Duration::from_secs(10) && q.buffered() > ms(9_900));
    let c = q.clear().expect("active");
    assert_eq!((c.item_id.as_str(), c.played), ("b", Duration::ZERO));
    assert!(q.stats().dropped > ms(9_900), "{:?}", q.stats());
}

#[test]
fn a_playout_refuses_an_encoder_rate_libopus_does_not_take() {
    for bad in [22_050, 44_100, 32_000] {
        let err = Playout::new(at_rate(bad, PlayoutConfig::default())).expect_err("refused");
        assert!(err.to_string().contains("input_rate_hz"), "{err}");
    }
}

#[test]
fn clear_reports_frames_emitted_for_the_current_item_and_next_item_starts_clean() {
    for rate in RATES {
        clear_reports_frames_emitted_at(rate);
    }
}

fn clear_reports_frames_emitted_at(rate: u32) {
    let mut p = Playout::new(at_rate(rate, PlayoutConfig::default())).expect("playout");
    let pcm = agent_3s();
    p.push("a", PcmRef::new(24_000, &pcm[..48_000])).expect("push"); // 2 s, still open
    let mut sent = Vec::new();
    let mut now = ms(500);
    for _ in 0..37 {
        now = now.max(p.next_due().expect("due"));
        assert!(poll_once(&mut p, now, &mut sent));
    }
    let c = p.clear().expect("active");
    assert_eq!(c.item_id, "a");
    assert_eq!(c.played, FRAME * 37);
    assert_eq!(c.played, FRAME * sent.len() as u32);
    assert!(!p.is_active());
    assert_eq!(p.buffered(), Duration::ZERO);
    assert_eq!(p.next_due(), None);
    assert!(p.stats().dropped >= ms(1_200), "{:?}", p.stats());
    assert!(p.clear().is_none(), "nothing left to clear");
    // Stragglers for the cleared item are swallowed.
    assert_eq!(p.push("a", PcmRef::new(24_000, &pcm[..2_400])).expect("push"), 2_400);
    assert!(!p.is_active());
    assert!(!p.finish_item("a"));
    // The next item starts cleanly: new spurt, offset 0, not before 20 ms after the last frame.
    p.push("b", PcmRef::new(24_000, &pcm[..12_000])).expect("push");
    p.finish_item("b");
    let first_b = sent.len();
    drain_ideal(&mut p, now, &mut sent);
    let b = &sent[first_b..];
    assert_eq!(b.len(), 25);
    assert!(b[0].spurt && b[0].item == "b" && b[0].offset == Duration::ZERO);
    assert_eq!(b[0].at, now + FRAME, "min spacing holds across clear()");
    assert!(b.iter().all(|s| s.item == "b"));
    assert_no_burst(&sent, FRAME);
}

#[test]
fn items_in_sequence_have_their_own_offsets_and_played_accounting() {
    let mut p = Playout::new(PlayoutConfig::default()).expect("playout");
    let pcm = agent_3s();
    p.push("a", PcmRef::new(24_000, &pcm[..24_000])).expect("push"); // 1 s
    // No finish_item("a"): the next id finishes it.
    p.push("b", PcmRef::new(24_000, &pcm[..12_168])).expect("push"); // 507 ms -> padded to 520
    p.push("b", PcmRef::new(16_000, &vec![1000; 1_600])).expect("push rate change"); // +100 ms at 16 kHz
    p.finish_item("b");
    assert!(p.push("b", PcmRef::new(24_000, &pcm[..10])).is_err(), "b is finished");
    let mut sent = Vec::new();
    let now = drain_ideal(&mut p, ms(0), &mut sent);
    let a: Vec<_> = sent.iter().filter(|s| s.item == "a").collect();
    let b: Vec<_> = sent.iter().filter(|s| s.item == "b").collect();
    assert_eq!(a.len(), 50);
    assert_eq!(b.len(), 31, "607 ms padded to 620 ms");
    assert!(sent[..50].iter().all(|s| s.item == "a"), "items play in order");
    for (k, s) in b.iter().enumerate() {
        assert_eq!(s.offset, FRAME * k as u32);
    }
    assert!(!b[0].spurt, "back-to-back items are one talk spurt");
    assert_eq!(now, FRAME * 80);
    // Clear in the middle of a second run reports that item's own count.
    p.push("c", PcmRef::new(48_000, &vec![500; 48_000])).expect("push");
    let mut now = now;
    for _ in 0..4 {
        now = now.max(p.next_due().expect("due"));
        poll_once(&mut p, now, &mut sent);
    }
    let c = p.clear().expect("c active");
    assert_eq!((c.item_id.as_str(), c.played), ("c", ms(80)));
    assert_eq!(p.stats().items, 3);
}

#[test]
fn queue_is_bounded_and_push_reports_partial_acceptance() {
    for rate in RATES {
        queue_is_bounded_at(rate);
    }
}

fn queue_is_bounded_at(rate: u32) {
    let cfg = at_rate(rate, PlayoutConfig { max_buffered: ms(1_000), ..PlayoutConfig::default() });
    let mut p = Playout::new(cfg).expect("playout");
    let pcm = agent_3s();
    let n = p.push("a", PcmRef::new(24_000, &pcm)).expect("push");
    assert!(n < pcm.len(), "3 s cannot fit in a 1 s queue");
    assert!((22_000..=24_000).contains(&n), "accepted {n} samples (~1 s at 24 kHz)");
    assert!(p.buffered() <= ms(1_000));
    assert!(!p.has_room_for(ms(100)));
    assert_eq!(p.push("a", PcmRef::new(24_000, &pcm[n..])).expect("push"), 0, "still full");
    // Sending 10 frames frees 200 ms.
    let mut sent = Vec::new();
    let mut now = ms(0);
    for _ in 0..10 {
        now = now.max(p.next_due().expect("due"));
        poll_once(&mut p, now, &mut sent);
    }
    assert!(p.has_room_for(ms(150)));
    let mut off = n;
    while off < pcm.len() {
        let k = p.push("a", PcmRef::new(24_000, &pcm[off..])).expect("push");
        off += k;
        assert!(p.buffered() <= ms(1_000));
        if k == 0 {
            now = now.max(p.next_due().expect("due"));
            poll_once(&mut p, now, &mut sent);
        }
    }
    p.finish_item("a");
    drain_ideal(&mut p, now, &mut sent);
    assert_eq!(sent.len(), 150, "nothing lost to backpressure");
    assert_no_burst(&sent, FRAME);
}

#[test]
fn underrun_mid_item_is_counted_and_resumes_as_a_new_talkspurt() {
    let mut p = Playout::new(PlayoutConfig::default()).expect("playout");
    let pcm = agent_3s();
    p.push("a", PcmRef::new(24_000, &pcm[..4_800])).expect("push"); // 200 ms, item open
    let mut sent = Vec::new();
    let now = drain_ideal(&mut p, ms(0), &mut sent);
    // The 10th frame is still partly in the resampler (5 ms delay) while the item is open.
    assert_eq!(sent.len(), 9);
    assert!(p.is_active(), "open item keeps the playout active");
    // The provider is slow: the next delta arrives 300 ms later.
    let now = now + ms(300);
    p.push("a", PcmRef::new(24_000, &pcm[4_800..9_600])).expect("push");
    p.finish_item("a");
    drain_ideal(&mut p, now, &mut sent);
    assert_eq!(sent.len(), 20);
    assert!(sent[9].spurt, "resumes as a new talk spurt");
    assert_eq!(sent[9].offset, ms(180));
    assert_eq!(p.stats().underruns, 1);
    assert_eq!(p.stats().stalls, 0, "a dry queue is not a stall");
}

#[test]
fn barge_in_clears_active_playout_and_reports_played_ms() {
    let mut p = Playout::new(PlayoutConfig::default()).expect("playout");
    let mut b = BargeIn::new(BargeInConfig::default());
    assert!(b.on_speech_started(ms(5), &mut p).is_none(), "nothing playing");
    let pcm = agent_3s();
    p.push("resp_1", PcmRef::new(24_000, &pcm)).expect("push");
    let mut sent = Vec::new();
    let mut now = ms(0);
    for _ in 0..23 {
        now = now.max(p.next_due().expect("due"));
        poll_once(&mut p, now, &mut sent);
    }
    let i = b.on_speech_started(ms(1234), &mut p).expect("interrupts");
    assert_eq!(i.item_id, "resp_1");
    assert_eq!(i.played_ms(), 460);
    assert_eq!(i.reason, InterruptReason::UserSpeech { at: ms(1234) });
    assert!(!p.is_active());
    assert!(p.poll(now + ms(100), &mut [0u8; 1500]).is_none(), "no agent packet after the decision");
    // Disabled barge-in ignores speech but honours an explicit interrupt.
    let mut off = BargeIn::new(BargeInConfig { enabled: false });
    p.push("resp_2", PcmRef::new(24_000, &pcm[..24_000])).expect("push");
    assert!(off.on_speech_started(ms(2000), &mut p).is_none());
    assert!(p.is_active());
    let i = off.interrupt(&mut p).expect("explicit interrupt");
    assert_eq!((i.item_id.as_str(), i.played_ms(), i.reason), ("resp_2", 0, InterruptReason::ClientRequest));
    assert_eq!(b.interruptions() + off.interruptions(), 2);
}

#[test]
fn extreme_now_values_and_empty_pushes_do_not_panic() {
    let mut p = Playout::new(PlayoutConfig::default()).expect("playout");
    assert_eq!(p.push("a", PcmRef::new(24_000, &[])).expect("empty push"), 0);
    assert!(p.push("a", PcmRef::new(0, &[1, 2, 3])).is_err(), "rate 0 is rejected");
    p.push("a", PcmRef::new(8_000, &vec![300; 8_000])).expect("push");
    p.finish_item("a");
    let mut buf = [0u8; 1500];
    let big = Duration::MAX - ms(1);
    assert!(p.poll(big, &mut buf).is_some());
    assert!(p.poll(big, &mut buf).is_none(), "one frame per now");
    assert!(p.poll(Duration::ZERO, &mut buf).is_none(), "time going backwards sends nothing");
    let _ = p.next_due();
    // An empty `out` buffer is an encode error, counted, not a panic (libopus fits a 1-byte
    // buffer by sending a TOC-only frame).
    let mut p = Playout::new(PlayoutConfig::default()).expect("playout");
    p.push("b", PcmRef::new(48_000, &vec![3000; 960])).expect("push");
    p.finish_item("b");
    assert!(p.poll(ms(0), &mut []).is_none());
    assert_eq!(p.stats().encode_errors, 1);
}

#[test]
fn fec_is_coded_once_loss_is_reported() {
    let count_fec = |loss: Option<u8>| {
        let mut p = Playout::new(PlayoutConfig::default()).expect("playout");
        if let Some(l) = loss {
            p.set_expected_loss(l).expect("set loss");
        }
        let pcm = agent_3s();
        p.push("a", PcmRef::new(24_000, &pcm)).expect("push");
        p.finish_item("a");
        let mut sent = Vec::new();
        drain_ideal(&mut p, ms(0), &mut sent);
        sent.iter().filter(|s| media::codec::packet_has_fec(&s.bytes)).count()
    };
    assert_eq!(count_fec(None), 0, "no LBRR until loss is reported");
    let with = count_fec(Some(10));
    assert!(with > 75, "only {with}/150 frames carry LBRR at 10 % reported loss");
}

fn dtx_playout() -> Playout {
    dtx_playout_at(48_000)
}

fn dtx_playout_at(rate: u32) -> Playout {
    Playout::new(at_rate(rate, PlayoutConfig { dtx: true, ..PlayoutConfig::default() })).expect("playout")
}

/// Two replies separated by a pause, as a receiver sees them: each spurt is its audio frames on
/// the grid, then one TOC-only frame (RFC 6716 §3.1 code 0, empty frame) in the next slot; the
/// pause itself sends nothing; the second spurt is marked and stamped with the clock's time, so
/// RTP timestamps advance by the pause.
#[test]
fn dtx_ends_each_spurt_with_one_toc_only_frame_and_the_pause_sends_nothing() {
    for rate in RATES {
        dtx_ends_each_spurt_at(rate);
    }
}

fn dtx_ends_each_spurt_at(rate: u32) {
    let mut p = dtx_playout_at(rate);
    let pcm = agent_3s();
    p.push("a", PcmRef::new(24_000, &pcm[..9_600])).expect("push"); // 400 ms
    p.finish_item("a");
    let mut sent = Vec::new();
    drain_ideal_until(&mut p, ms(1000), ms(1_400), &mut sent);
    assert_eq!(sent.len(), 21, "20 audio frames + 1 DTX frame");
    let dtx = &sent[20];
    assert_eq!(dtx.bytes.len(), 1, "a DTX frame is the TOC byte alone");
    assert_eq!(dtx.bytes[0], sent[19].bytes[0] & 0xFC, "same configuration as the audio, code 0");
    assert_eq!((dtx.due, dtx.at), (ms(1400), ms(1400)), "in the slot after the last audio frame");
    assert!(!dtx.spurt && dtx.item.is_empty());
    assert!(sent[..20].iter().all(|s| s.bytes.len() > 2 && s.item == "a"));
    // The DTX frame decodes as one 20 ms frame (libopus conceals an empty frame).
    let mut dec = OpusDecoder::new().expect("decoder");
    let mut out = vec![0i16; MAX_PACKET_SAMPLES];
    assert_eq!(dec.decode(&dtx.bytes, &mut out).expect("decodes"), FRAME_SAMPLES);

    // The pause: only the DTX frame again every 400 ms, however often the caller polls.
    assert_eq!(p.next_due(), Some(ms(1_800)));
    for t in (1_420..3_000).step_by(7) {
        poll_once(&mut p, ms(t), &mut sent);
    }
    let refresh: Vec<(usize, Duration)> = sent[21..].iter().map(|s| (s.bytes.len(), s.due)).collect();
    assert_eq!(refresh, [(1, ms(1_800)), (1, ms(2_200)), (1, ms(2_600))]);
    p.push("b", PcmRef::new(24_000, &pcm[..4_800])).expect("push"); // 200 ms
    p.finish_item("b");
    drain_ideal_until(&mut p, ms(3_003), ms(3_300), &mut sent);
    assert_eq!(sent.len(), 24 + 11);
    let b: Vec<&Sent> = sent[24..].iter().collect();
    assert!(b[0].spurt, "the second reply is a new talk spurt (RTP marker)");
    assert_eq!(b[0].due, ms(3_003), "stamped with the clock: the RTP timestamp jumps by the pause");
    assert!(b[1..].iter().all(|s| !s.spurt));
    assert_eq!((b[10].bytes.len(), b[10].due), (1, ms(3_203)));
    let st = p.stats();
    assert_eq!((st.frames_out, st.dtx_frames, st.underruns, st.stalls), (30, 5, 0, 0));
    assert_no_burst(&sent, FRAME);
}

#[test]
fn dtx_follows_a_barge_in_unless_the_next_reply_comes_first() {
    for rate in RATES {
        dtx_follows_a_barge_in_at(rate);
    }
}

fn dtx_follows_a_barge_in_at(rate: u32) {
    let mut p = dtx_playout_at(rate);
    let pcm = agent_3s();
    p.push("a", PcmRef::new(24_000, &pcm)).expect("push");
    let mut sent = Vec::new();
    let mut now = ms(0);
    for _ in 0..5 {
        now = now.max(p.next_due().expect("due"));
        poll_once(&mut p, now, &mut sent);
    }
    assert_eq!(p.clear().expect("cleared").played, ms(100));
    assert_eq!(p.next_due(), Some(ms(100)), "the DTX frame is owed in the next slot");
    assert!(!poll_once(&mut p, ms(99), &mut sent), "not before its slot");
    assert!(poll_once(&mut p, ms(100), &mut sent));
    assert_eq!((sent[5].bytes.len(), sent[5].due), (1, ms(100)));
    assert_eq!(p.next_due(), Some(ms(500)), "the pause repeats it 400 ms later");

    // Cut again, and the next reply is queued before the owed slot: it starts a spurt, no DTX.
    p.push("b", PcmRef::new(24_000, &pcm)).expect("push");
    now = ms(500);
    for _ in 0..3 {
        now = now.max(p.next_due().expect("due"));
        poll_once(&mut p, now, &mut sent);
    }
    p.clear();
    p.push("c", PcmRef::new(24_000, &pcm[..4_800])).expect("push");
    p.finish_item("c");
    let from = sent.len();
    drain_ideal_until(&mut p, now, now + ms(250), &mut sent);
    let c = &sent[from..];
    assert!(c[0].spurt && c[0].item == "c");
    assert_eq!(c.iter().filter(|s| s.bytes.len() == 1).count(), 1, "only c's own DTX frame");
    assert_eq!(c.last().map(|s| s.bytes.len()), Some(1));
}

#[test]
fn an_open_item_gets_a_slot_of_grace_before_its_spurt_ends_with_dtx() {
    let mut p = dtx_playout();
    let pcm = agent_3s();
    p.push("a", PcmRef::new(24_000, &pcm[..4_800])).expect("push"); // 200 ms, item open
    let mut sent = Vec::new();
    let now = drain_ideal_until(&mut p, ms(0), ms(200), &mut sent);
    // The 10th frame is still partly in the resampler; the item is open: DTX a slot late.
    assert_eq!(sent.len(), 10);
    assert_eq!((sent[9].bytes.len(), sent[9].due, sent[9].at), (1, ms(180), ms(200)));
    assert_eq!(now, ms(200));
    // The next delta comes after the slot of grace: a new spurt.
    p.push("a", PcmRef::new(24_000, &pcm[4_800..9_600])).expect("push");
    p.finish_item("a");
    drain_ideal_until(&mut p, ms(215), ms(500), &mut sent);
    assert!(sent[10].spurt);
    assert_eq!(p.stats().underruns, 1);

    // Audio arriving within the slot of grace continues the spurt, with no DTX frame.
    let mut q = dtx_playout();
    q.push("x", PcmRef::new(24_000, &pcm[..4_800])).expect("push");
    let mut sent = Vec::new();
    let mut now = ms(0);
    for _ in 0..9 {
        now = now.max(q.next_due().expect("due"));
        poll_once(&mut q, now, &mut sent);
    }
    assert_eq!(now, ms(160));
    assert!(!poll_once(&mut q, ms(185), &mut sent), "in the slot of grace: nothing to send yet");
    q.push("x", PcmRef::new(24_000, &pcm[4_800..9_600])).expect("push");
    q.finish_item("x");
    assert!(poll_once(&mut q, ms(190), &mut sent));
    let last = sent.last().expect("frame");
    assert!(!last.spurt && last.bytes.len() > 1 && last.due == ms(180), "the spurt continued on its grid");
    assert_eq!(q.stats().dtx_frames, 0);
}
