//! Per-20 ms-frame cost of the media pipeline with real speech.
//!
//! `cargo bench -p media --bench pipeline` — each iteration is one 20 ms frame:
//! - `uplink/frame`: RTP Opus packet -> decode -> 2 x 10 ms VAD -> resample 48k -> 24k (+ poll)
//! - `downlink/frame`: push 20 ms of 24 kHz speech -> resample to 48k -> Opus encode (defaults) -> poll
//! - `stage/*`: the stages alone, to see where the time goes.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use media::codec::{EncoderConfig, MAX_PACKET_SAMPLES, OpusDecoder, OpusEncoder};
use media::pcm::{CHUNK_SAMPLES, FRAME, FRAME_SAMPLES, PcmRef};
use media::resample::{Alignment, Resampler};
use media::{Playout, PlayoutConfig, Uplink, UplinkConfig, UplinkEvent, Vad, VadConfig};

const USER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/user_question.wav");
const AGENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/agent_reply.wav");

fn speech_packets() -> (Vec<i16>, Vec<Vec<u8>>) {
    let pcm = media::wav::read(USER).expect("tests/data/user_question.wav");
    let mut enc = OpusEncoder::new(EncoderConfig::default()).expect("encoder");
    let mut buf = [0u8; 1500];
    let packets = pcm
        .samples
        .chunks_exact(FRAME_SAMPLES)
        .map(|f| {
            let n = enc.encode(f, &mut buf).expect("encode");
            buf[..n].to_vec()
        })
        .collect();
    (pcm.samples, packets)
}

fn uplink(c: &mut Criterion) {
    let (_, packets) = speech_packets();
    let mut up = Uplink::new(UplinkConfig::default()).expect("uplink");
    let mut seq = 0u16;
    let mut i = 0usize;
    c.bench_function("uplink/frame (decode + vad + 48k->24k)", |b| {
        b.iter(|| {
            up.push_rtp(FRAME * u32::from(seq), seq, &packets[i]);
            seq = seq.wrapping_add(1);
            i = (i + 1) % packets.len();
            let mut n = 0;
            while let Some(ev) = up.poll() {
                if let UplinkEvent::Audio(a) = ev {
                    n += a.samples.len();
                }
            }
            black_box(n)
        })
    });
}

fn downlink(c: &mut Criterion) {
    let reply = media::wav::read(AGENT).expect("tests/data/agent_reply.wav");
    let mut p = Playout::new(PlayoutConfig::default()).expect("playout");
    let mut buf = [0u8; 1500];
    let mut now = Duration::ZERO;
    let mut pos = 0usize;
    let mut item = 0u32;
    let ids = ["item-a", "item-b"];
    c.bench_function("downlink/frame (24k->48k + opus encode)", |b| {
        b.iter(|| {
            if pos + 480 > reply.samples.len() {
                p.finish_item(ids[(item % 2) as usize]);
                item += 1;
                pos = 0;
            }
            let pushed =
                p.push(ids[(item % 2) as usize], PcmRef::new(24_000, &reply.samples[pos..pos + 480])).expect("push");
            pos += pushed;
            now += FRAME;
            black_box(p.poll(now, &mut buf).map(|f| f.len))
        })
    });
}

fn stages(c: &mut Criterion) {
    let (pcm48, packets) = speech_packets();
    let mut dec = OpusDecoder::new().expect("decoder");
    let mut out = vec![0i16; MAX_PACKET_SAMPLES];
    let mut i = 0;
    c.bench_function("stage/opus decode 20ms", |b| {
        b.iter(|| {
            i = (i + 1) % packets.len();
            black_box(dec.decode(&packets[i], &mut out).expect("decode"))
        })
    });
    let mut buf = [0u8; 1500];
    for complexity in [0u8, 5, 10] {
        let mut enc = OpusEncoder::new(EncoderConfig { complexity, ..EncoderConfig::default() }).expect("encoder");
        let mut j = 0;
        c.bench_function(&format!("stage/opus encode 20ms c{complexity}"), |b| {
            b.iter(|| {
                j = (j + FRAME_SAMPLES) % (pcm48.len() - FRAME_SAMPLES);
                black_box(enc.encode(&pcm48[j..j + FRAME_SAMPLES], &mut buf).expect("encode"))
            })
        });
    }
    let mut vad = Vad::new(VadConfig::default(), 48_000).expect("vad");
    let mut j = 0;
    c.bench_function("stage/vad 2x10ms", |b| {
        b.iter(|| {
            j = (j + FRAME_SAMPLES) % (pcm48.len() - FRAME_SAMPLES);
            black_box(vad.process(&pcm48[j..j + CHUNK_SAMPLES]));
            black_box(vad.process(&pcm48[j + CHUNK_SAMPLES..j + FRAME_SAMPLES]))
        })
    });
    for (from, to) in [(48_000u32, 24_000u32), (48_000, 16_000), (24_000, 48_000)] {
        let mut rs = Resampler::new(from, to, Alignment::Stream).expect("resampler");
        let n = (from / 50) as usize;
        let mut j = 0;
        c.bench_function(&format!("stage/resample 20ms {from}->{to}"), |b| {
            b.iter(|| {
                j = (j + n) % (pcm48.len() - n);
                let mut got = 0;
                rs.process(&pcm48[j..j + n], &mut |s: &[i16]| got += s.len()).expect("resample");
                black_box(got)
            })
        });
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = uplink, downlink, stages
}
criterion_main!(benches);
