//! Per-20 ms-frame cost of the media pipeline with real speech.
//!
//! `cargo bench -p media --bench pipeline` — each iteration is one 20 ms frame:
//! - `uplink/frame`: RTP Opus packet -> decode -> 2 x 10 ms VAD -> resample 48k -> 24k (+ poll)
//! - `downlink/frame`: push 20 ms of 24 kHz speech -> resample to 48k -> Opus encode (defaults) -> poll
//! - `duplex/frame`: both, i.e. one live session's media CPU per 20 ms
//! - `stage/*`: the stages alone, to see where the time goes.
//!
//! Times are the benchmark thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`), not wall time: the
//! dev machines are shared 2-core boxes where wall time mostly measures the neighbours' builds.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use media::codec::{EncoderConfig, MAX_PACKET_SAMPLES, OpusDecoder, OpusEncoder};
use media::pcm::{CHUNK_SAMPLES, FRAME, FRAME_SAMPLES, PcmRef};
use media::resample::{Alignment, Resampler};
use media::{Playout, PlayoutConfig, RtpIn, Uplink, UplinkConfig, UplinkEvent, Vad, VadConfig};

const USER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/user_question.wav");
const AGENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/agent_reply.wav");

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant Linux supports.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Benchmarks `f` (one 20 ms frame per call) in thread CPU time.
fn cpu_bench(c: &mut Criterion, name: &str, mut f: impl FnMut()) {
    c.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let t0 = thread_cpu();
            for _ in 0..iters {
                f();
            }
            thread_cpu() - t0
        })
    });
}

fn speech_packets() -> (Vec<i16>, Vec<Vec<u8>>) {
    let pcm = media::wav::read(USER).expect("tests/data/user_question.wav");
    // Browser-like sender: in-band FEC with loss reported, so packets carry LBRR.
    let mut enc =
        OpusEncoder::new(EncoderConfig { expected_loss_pct: 10, ..EncoderConfig::default() }).expect("encoder");
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

/// Uplink driven one real speech packet per call.
struct UplinkRig {
    up: Uplink,
    packets: Vec<Vec<u8>>,
    seq: u16,
    i: usize,
}

impl UplinkRig {
    fn new() -> Self {
        let (_, packets) = speech_packets();
        Self { up: Uplink::new(UplinkConfig::default()).expect("uplink"), packets, seq: 0, i: 0 }
    }
    fn frame(&mut self) {
        let ts = u32::from(self.seq).wrapping_mul(960);
        let packet = RtpIn { seq: self.seq, timestamp: ts, payload_type: 111, ssrc: 1, payload: &self.packets[self.i] };
        self.up.push(FRAME * u32::from(self.seq), packet);
        self.seq = self.seq.wrapping_add(1);
        self.i = (self.i + 1) % self.packets.len();
        let mut n = 0;
        while let Some(ev) = self.up.poll() {
            if let UplinkEvent::Audio(a) = ev {
                n += a.samples.len();
            }
        }
        black_box(n);
    }
}

/// Playout fed 20 ms of 24 kHz agent speech and polled once per call.
struct DownlinkRig {
    p: Playout,
    reply: Vec<i16>,
    buf: [u8; 1500],
    now: Duration,
    pos: usize,
    item: usize,
}

const IDS: [&str; 2] = ["item-a", "item-b"];

impl DownlinkRig {
    fn new(expected_loss_pct: u8) -> Self {
        let reply = media::wav::read(AGENT).expect("tests/data/agent_reply.wav").samples;
        let mut p = Playout::new(PlayoutConfig::default()).expect("playout");
        p.set_expected_loss(expected_loss_pct).expect("loss");
        Self { p, reply, buf: [0; 1500], now: Duration::ZERO, pos: 0, item: 0 }
    }
    fn frame(&mut self) {
        if self.pos + 480 > self.reply.len() {
            self.p.finish_item(IDS[self.item % 2]);
            self.item += 1;
            self.pos = 0;
        }
        let pcm = PcmRef::new(24_000, &self.reply[self.pos..self.pos + 480]);
        self.pos += self.p.push(IDS[self.item % 2], pcm).expect("push");
        self.now += FRAME;
        black_box(self.p.poll(self.now, &mut self.buf).map(|f| f.len));
    }
}

fn pipeline(c: &mut Criterion) {
    let mut up = UplinkRig::new();
    cpu_bench(c, "uplink/frame (decode + vad + 48k->24k)", || up.frame());
    // Without loss, then with the client reporting 10 % loss: the encoder then codes LBRR (FEC)
    // every frame.
    let variants = [
        (0, "downlink/frame (24k->48k + opus encode)", "duplex/frame (uplink + downlink)"),
        (10, "downlink/frame with FEC coded (10% loss reported)", "duplex/frame with FEC coded (10% loss reported)"),
    ];
    for (loss_percent, downlink, duplex) in variants {
        let mut down = DownlinkRig::new(loss_percent);
        cpu_bench(c, downlink, || down.frame());
        let (mut up, mut down) = (UplinkRig::new(), DownlinkRig::new(loss_percent));
        cpu_bench(c, duplex, || {
            up.frame();
            down.frame();
        });
    }
}

fn stages(c: &mut Criterion) {
    let (pcm48, packets) = speech_packets();
    let mut dec = OpusDecoder::new().expect("decoder");
    let mut out = vec![0i16; MAX_PACKET_SAMPLES];
    let mut i = 0;
    cpu_bench(c, "stage/opus decode 20ms", || {
        i = (i + 1) % packets.len();
        black_box(dec.decode(&packets[i], &mut out).expect("decode"));
    });
    let mut buf = [0u8; 1500];
    let variants = [
        ("c5 default", EncoderConfig::default()),
        ("c5 fec coded (10% loss)", EncoderConfig { expected_loss_pct: 10, ..EncoderConfig::default() }),
        ("c0", EncoderConfig { complexity: 0, ..EncoderConfig::default() }),
        ("c10", EncoderConfig { complexity: 10, ..EncoderConfig::default() }),
    ];
    for (name, cfg) in variants {
        let mut enc = OpusEncoder::new(cfg).expect("encoder");
        let mut j = 0;
        cpu_bench(c, &format!("stage/opus encode 20ms {name}"), || {
            j = (j + FRAME_SAMPLES) % (pcm48.len() - FRAME_SAMPLES);
            black_box(enc.encode(&pcm48[j..j + FRAME_SAMPLES], &mut buf).expect("encode"));
        });
    }
    let mut vad = Vad::new(VadConfig::default(), 48_000).expect("vad");
    let mut j = 0;
    cpu_bench(c, "stage/vad 2x10ms", || {
        j = (j + FRAME_SAMPLES) % (pcm48.len() - FRAME_SAMPLES);
        black_box(vad.process(&pcm48[j..j + CHUNK_SAMPLES]));
        black_box(vad.process(&pcm48[j + CHUNK_SAMPLES..j + FRAME_SAMPLES]));
    });
    for (from, to) in [(48_000u32, 24_000u32), (48_000, 16_000), (24_000, 48_000)] {
        let mut rs = Resampler::new(from, to, Alignment::Stream).expect("resampler");
        let n = (from / 50) as usize;
        let mut j = 0;
        cpu_bench(c, &format!("stage/resample 20ms {from}->{to}"), || {
            j = (j + n) % (pcm48.len() - n);
            let mut got = 0;
            rs.process(&pcm48[j..j + n], &mut |s: &[i16]| got += s.len()).expect("resample");
            black_box(got);
        });
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
    targets = pipeline, stages
}
criterion_main!(benches);
