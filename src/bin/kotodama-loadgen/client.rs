//! One simulated user: a real webrtc-rs peer that talks in a loop of turns and measures what it
//! receives (agent packet lateness against their RTP timestamps, loss, turn and barge-in latency).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use rtc::rtp;
use webrtc::data_channel::DataChannel;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionEventHandler, RTCIceGatheringState, RTCSessionDescription,
};

use crate::client_peer::{ClientPeer, GatheringDone, MicSender, OPUS_PT, answered_opus_pt, client_peer};

/// Pre-encoded audio shared by every client (encoding is not what we measure).
pub struct Speech {
    /// 20 ms Opus packets of the question.
    pub question: Vec<Bytes>,
    /// One 20 ms Opus packet of silence.
    pub silence: Bytes,
    /// An Opus DTX packet: the silence packet's TOC byte with code 0 and no frame (RFC 6716
    /// §3.1, §3.2.1), what a DTX sender sends when a pause begins.
    pub dtx: Bytes,
    /// Index of the question's last packet with speech in it (the WAV has trailing silence; the
    /// turn's end is the end of speech, not of the file).
    pub speech_end: usize,
}

impl Speech {
    /// Encode `pcm` (48 kHz mono) into 20 ms packets.
    pub fn encode(pcm: &[i16]) -> anyhow::Result<Self> {
        let mut enc = opus::Encoder::new(48_000, opus::Channels::Mono, opus::Application::Voip)?;
        let mut out = [0u8; 1500];
        let mut question = Vec::new();
        let mut speech_end = 0;
        for (i, chunk) in pcm.chunks(960).enumerate() {
            if media::pcm::rms(chunk) > 300.0 {
                speech_end = i;
            }
            let mut frame = [0i16; 960];
            frame[..chunk.len()].copy_from_slice(chunk);
            let n = enc.encode(&frame, &mut out)?;
            question.push(Bytes::copy_from_slice(&out[..n]));
        }
        let n = enc.encode(&[0i16; 960], &mut out)?;
        let dtx = Bytes::copy_from_slice(&[out[0] & 0xFC]);
        Ok(Self { question, silence: Bytes::copy_from_slice(&out[..n]), dtx, speech_end })
    }
}

/// What one client measured during a measurement window.
#[derive(Debug, Default, Clone)]
pub struct Sample {
    /// Agent packets received.
    pub packets: u64,
    /// Agent packets missing (sequence gaps).
    pub lost: u64,
    /// Lateness of each agent packet against its RTP timestamp, relative to the earliest packet of
    /// its talk spurt (ms).
    pub lateness_ms: Vec<f32>,
    /// End of the user's question -> first agent packet (ms).
    pub turn_ms: Vec<f32>,
    /// Start of a barge-in utterance -> last agent packet of the cut reply (ms).
    pub barge_ms: Vec<f32>,
}

#[derive(Default)]
struct Recv {
    sample: Sample,
    last_seq: Option<u16>,
    last_packet_at: Option<Instant>,
    /// (arrival - RTP time) minimum within the current talk spurt.
    baseline: Option<f64>,
    spurt_origin: Option<(Instant, u32)>,
    recording: bool,
}

struct Handler {
    recv: Arc<Mutex<Recv>>,
    gathered: GatheringDone,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        self.gathered.on_state(state);
    }
    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        let recv = Arc::clone(&self.recv);
        tokio::spawn(async move {
            while let Some(ev) = track.poll().await {
                if let TrackRemoteEvent::OnRtpPacket(p) = ev {
                    on_packet(&recv, &p.header);
                }
            }
        });
    }
}

fn on_packet(recv: &Mutex<Recv>, h: &rtp::header::Header) {
    let now = Instant::now();
    let mut r = recv.lock().unwrap_or_else(|p| p.into_inner());
    // A new talk spurt: the marker bit, or a pause of more than 200 ms.
    let new_spurt = h.marker || r.last_packet_at.is_none_or(|t| now - t > Duration::from_millis(200));
    if new_spurt {
        r.spurt_origin = Some((now, h.timestamp));
        r.baseline = None;
    }
    if let Some(prev) = r.last_seq {
        let gap = h.sequence_number.wrapping_sub(prev);
        if (2..1000).contains(&gap) && r.recording {
            r.sample.lost += u64::from(gap - 1);
        }
    }
    r.last_seq = Some(h.sequence_number);
    r.last_packet_at = Some(now);
    if let Some((t0, ts0)) = r.spurt_origin {
        let media = f64::from(h.timestamp.wrapping_sub(ts0)) / 48.0; // ms of audio since spurt start
        let arrival = (now - t0).as_secs_f64() * 1000.0;
        let offset = arrival - media;
        let base = r.baseline.map_or(offset, |b: f64| b.min(offset));
        r.baseline = Some(base);
        if r.recording {
            r.sample.packets += 1;
            r.sample.lateness_ms.push((offset - base) as f32);
        }
    }
}

/// Reads a client's measurements while it talks.
pub struct Probe(Arc<Mutex<Recv>>);

impl Probe {
    /// Start or stop recording; returns what was recorded since the last call.
    pub fn take(&self, recording: bool) -> Sample {
        let mut r = self.0.lock().unwrap_or_else(|p| p.into_inner());
        r.recording = recording;
        std::mem::take(&mut r.sample)
    }
}

/// How a client's microphone sends silence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MicMode {
    /// A coded silence frame every 20 ms (aiortc, or a browser without DTX).
    Silence,
    /// Opus DTX as libwebrtc sends it with `usedtx=1`: 200 ms of coded silence after speech, one
    /// DTX packet, then one refresh frame + DTX packet per 400 ms; nothing in between (the RTP
    /// timestamp runs on).
    Dtx,
}

/// What a client does once connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// Ask, hear the answer (or barge in), pause, repeat.
    Talk,
    /// Stay connected and silent (the cost of an idle session).
    Silent,
}

/// A connected simulated user.
pub struct Client {
    pc: Arc<dyn PeerConnection>,
    _dc: Arc<dyn DataChannel>,
    mic: MicSender,
    recv: Arc<Mutex<Recv>>,
    mode: MicMode,
    /// 20 ms frames of silence since the last speech packet.
    silent_frames: u32,
}

impl Client {
    /// Create a session on `base` and connect to it.
    pub async fn connect(http: &reqwest::Client, base: &str, api_key: Option<&str>) -> anyhow::Result<Client> {
        let mut req = http.post(format!("{base}/v1/sessions")).json(&serde_json::json!({ "provider": "scripted" }));
        if let Some(k) = api_key {
            req = req.bearer_auth(k);
        }
        let res = req.send().await?;
        anyhow::ensure!(res.status().as_u16() == 201, "POST /v1/sessions: {}", res.status());
        let v: serde_json::Value = res.json().await?;
        let token = v["token"].as_str().unwrap_or_default().to_owned();
        let offer_url = v["offer_url"].as_str().unwrap_or_default().to_owned();

        let recv = Arc::new(Mutex::new(Recv::default()));
        let (gathered, grx) = GatheringDone::new();
        let handler = Arc::new(Handler { recv: Arc::clone(&recv), gathered });
        let ClientPeer { pc, track, dc, ssrc, offer: sdp } =
            client_peer(handler, grx, true, true).await.map_err(|e| anyhow::anyhow!("client peer: {e}"))?;
        let (track, dc) = track.zip(dc).context("the peer has its track and data channel")?;
        let res = http
            .post(format!("{base}{offer_url}"))
            .header("Content-Type", "application/sdp")
            .bearer_auth(&token)
            .body(sdp)
            .send()
            .await?;
        anyhow::ensure!(res.status().as_u16() == 201, "POST offer: {}", res.status());
        let answer = res.text().await?;
        let pt = answered_opus_pt(&answer).unwrap_or(OPUS_PT);
        pc.set_remote_description(RTCSessionDescription::answer(answer)?).await?;
        Ok(Client { pc, _dc: dc, mic: MicSender::new(track, ssrc, pt), recv, mode: MicMode::Silence, silent_frames: 0 })
    }

    /// Send silence as `mode` says from now on.
    pub fn with_mic(mut self, mode: MicMode) -> Self {
        self.mode = mode;
        self
    }

    async fn send(&mut self, payload: Bytes) {
        self.silent_frames = 0;
        self.mic.send(payload).await;
    }

    /// The next 20 ms of silence, as the microphone mode sends it.
    async fn silence(&mut self, speech: &Speech) {
        let k = self.silent_frames;
        self.silent_frames = k.saturating_add(1);
        let payload = match self.mode {
            MicMode::Silence => speech.silence.clone(),
            MicMode::Dtx if k < 10 => speech.silence.clone(),
            MicMode::Dtx if k == 10 || (k > 10 && (k - 10) % 20 == 1) => speech.dtx.clone(),
            MicMode::Dtx if k > 10 && (k - 10) % 20 == 0 => speech.silence.clone(),
            MicMode::Dtx => {
                self.mic.skip(960);
                return;
            }
        };
        self.mic.send(payload).await;
    }

    /// Stay connected and silent until `stop`.
    pub async fn idle(mut self, speech: Arc<Speech>, stop: Arc<AtomicBool>) {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            self.silence(&speech).await;
        }
        let _ = self.pc.close().await;
    }

    fn last_packet_at(&self) -> Option<Instant> {
        self.recv.lock().unwrap_or_else(|p| p.into_inner()).last_packet_at
    }

    /// A handle to this client's measurements.
    pub fn probe(&self) -> Probe {
        Probe(Arc::clone(&self.recv))
    }

    fn record_turn(&self, field: fn(&mut Sample) -> &mut Vec<f32>, ms: f32) {
        let mut r = self.recv.lock().unwrap_or_else(|p| p.into_inner());
        if r.recording {
            field(&mut r.sample).push(ms);
        }
    }

    /// Talk until `stop`: ask, wait for the answer (or barge in with probability `barge`), repeat.
    pub async fn talk(mut self, speech: Arc<Speech>, barge: f64, stop: Arc<AtomicBool>) {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Stagger: start at a random point of a silent second.
        for _ in 0..rand::random_range(0..50) {
            tick.tick().await;
            self.silence(&speech).await;
        }
        let mut barge_next = false;
        while !stop.load(Ordering::Relaxed) {
            let spoke_at = Instant::now();
            let mut asked_at = spoke_at;
            for (i, p) in speech.question.iter().enumerate() {
                tick.tick().await;
                self.send(p.clone()).await;
                if i == speech.speech_end {
                    asked_at = Instant::now();
                }
            }
            if barge_next {
                // We interrupted: the cut reply's last packet came at most this long after we began.
                if let Some(last) = self.last_packet_at()
                    && last > spoke_at
                {
                    self.record_turn(|s| &mut s.barge_ms, (last - spoke_at).as_secs_f32() * 1000.0);
                }
            }
            // Silence until the answer starts (or give up after 10 s).
            let mut started = None;
            while started.is_none() && asked_at.elapsed() < Duration::from_secs(10) {
                tick.tick().await;
                self.silence(&speech).await;
                if let Some(t) = self.last_packet_at()
                    && t > asked_at + Duration::from_millis(20)
                {
                    started = Some(t);
                }
            }
            if let Some(t) = started {
                self.record_turn(|s| &mut s.turn_ms, (t - asked_at).as_secs_f32() * 1000.0);
            }
            barge_next = rand::random_bool(barge);
            if barge_next {
                // Let a second of the answer play, then talk over it.
                for _ in 0..50 {
                    tick.tick().await;
                    self.silence(&speech).await;
                }
                continue;
            }
            // Wait for the answer to end (300 ms without packets), then a short pause.
            loop {
                tick.tick().await;
                self.silence(&speech).await;
                if self.last_packet_at().is_none_or(|t| t.elapsed() > Duration::from_millis(300))
                    || stop.load(Ordering::Relaxed)
                {
                    break;
                }
            }
            for _ in 0..25 {
                tick.tick().await;
                self.silence(&speech).await;
            }
        }
        let _ = self.pc.close().await;
    }
}
