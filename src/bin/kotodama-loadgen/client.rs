//! One simulated user: a real webrtc-rs peer that talks in a loop of turns and measures what it
//! receives (agent packet lateness against their RTP timestamps, loss, turn and barge-in latency).
//!
//! Cheap by construction, so that one core drives hundreds of sessions: the speech is encoded once
//! ([`Speech`]) and shared; nothing received is decoded (lateness and loss come from RTP headers
//! on arrival); a client has no task or timer of its own for sending: [`Client::frame`] is a
//! step of a state machine ([`Talker`]) that one pacing loop calls for every client per 20 ms
//! tick (`main.rs`).

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

use crate::client_peer::{ClientPeer, FRAME_TICKS, GatheringDone, MicSender, OPUS_PT, answered_opus_pt, load_peer};

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
        // A second of silence, as a sender keeps coding it: its last frame is what libopus sends
        // once its VAD has settled (flagged inactive), the frame a non-DTX client repeats.
        let mut n = 0;
        for _ in 0..50 {
            n = enc.encode(&[0i16; 960], &mut out)?;
        }
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

/// What a client has received (shared with its [`Probe`]).
#[derive(Default)]
pub(crate) struct Recv {
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
                    on_packet(&recv, &p.header, Instant::now());
                }
            }
        });
    }
}

/// Account one agent packet whose header is `h`, received at `now`.
pub(crate) fn on_packet(recv: &Mutex<Recv>, h: &rtp::header::Header, now: Instant) {
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

/// The talk profile shared by every client.
#[derive(Debug, Clone, Copy)]
pub struct TalkProfile {
    /// Share of replies talked over (barge-in) after [`BARGE_AFTER_FRAMES`] of the reply.
    pub barge: f64,
    /// `Some(p)`: a question starts every `p` (the profile: a 2.7 s sentence every 6 s),
    /// whether or not the reply has ended; `None`: take turns (ask, hear the whole reply, pause
    /// [`PAUSE_FRAMES`], ask again).
    pub every: Option<Duration>,
}

/// Frames (20 ms) of a reply heard before barging in.
const BARGE_AFTER_FRAMES: u32 = 50;
/// Frames (20 ms) of silence between a reply's end and the next question when taking turns.
const PAUSE_FRAMES: u32 = 25;
/// A reply has ended after this long without an agent packet.
const REPLY_END: Duration = Duration::from_millis(300);
/// A question without a reply for this long is given up (turn taking).
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Silent for this many more frames before the first question (staggers the sessions).
    Stagger(u32),
    /// The question's packet `i` is next.
    Speaking(usize),
    /// Asked; the reply has not started.
    AwaitReply,
    /// Hearing the reply for this many more frames, then talking over it.
    Hearing(u32),
    /// Waiting for the reply's end.
    AwaitEnd,
    /// Silent for this many more frames, then asking again.
    Pause(u32),
    /// Silent until the next periodic question (`every`) or forever (silent profile).
    Idle,
}

/// What one client says, one 20 ms frame at a time (sans-IO: the caller passes the time and the
/// last agent packet's arrival, and sends what it returns).
#[derive(Debug)]
pub struct Talker {
    phase: Phase,
    spoke_at: Instant,
    asked_at: Instant,
    next_start: Option<Instant>,
    barging: bool,
}

/// What a client measured at a step (recorded by the caller while a window is open), ms.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Measure {
    /// End of the question's speech -> first agent packet.
    Turn(f32),
    /// Start of a barge-in question -> last agent packet of the cut reply.
    Barge(f32),
}

impl Talker {
    /// A talker that starts after `stagger` silent frames (`None`: silent forever).
    pub fn new(now: Instant, stagger: Option<u32>) -> Self {
        let phase = stagger.map_or(Phase::Idle, Phase::Stagger);
        Self { phase, spoke_at: now, asked_at: now, next_start: None, barging: false }
    }

    fn ask(&mut self, now: Instant, p: &TalkProfile) -> Phase {
        self.spoke_at = now;
        self.next_start = p.every.map(|e| now + e);
        Phase::Speaking(0)
    }

    /// One 20 ms step at `now`: the index of the question's packet to send, or `None` for a
    /// frame of silence, and what was measured at this step.
    pub fn step(
        &mut self,
        now: Instant,
        last_packet: Option<Instant>,
        speech: &Speech,
        p: &TalkProfile,
    ) -> (Option<usize>, Option<Measure>) {
        if !matches!(self.phase, Phase::Speaking(_)) && self.next_start.is_some_and(|t| now >= t) {
            self.barging = false;
            self.phase = self.ask(now, p);
        }
        let mut measure = None;
        let (send, next) = match self.phase {
            Phase::Stagger(0) | Phase::Pause(0) | Phase::Hearing(0) => {
                self.phase = self.ask(now, p);
                return self.step(now, last_packet, speech, p);
            }
            Phase::Stagger(n) => (None, Phase::Stagger(n - 1)),
            Phase::Pause(n) => (None, Phase::Pause(n - 1)),
            Phase::Hearing(n) => (None, Phase::Hearing(n - 1)),
            Phase::Speaking(i) => {
                if i == speech.speech_end {
                    self.asked_at = now;
                }
                let last = i + 1 >= speech.question.len();
                if last && std::mem::take(&mut self.barging) {
                    measure = last_packet
                        .filter(|&t| t > self.spoke_at)
                        .map(|t| Measure::Barge((t - self.spoke_at).as_secs_f32() * 1000.0));
                }
                (Some(i), if last { Phase::AwaitReply } else { Phase::Speaking(i + 1) })
            }
            Phase::AwaitReply => match last_packet.filter(|&t| t > self.asked_at + Duration::from_millis(20)) {
                Some(t) => {
                    measure = Some(Measure::Turn((t - self.asked_at).as_secs_f32() * 1000.0));
                    self.barging = rand::random_bool(p.barge);
                    (None, self.after_reply_start(p))
                }
                None if p.every.is_none() && now - self.asked_at > REPLY_TIMEOUT => (None, Phase::Pause(PAUSE_FRAMES)),
                None => (None, Phase::AwaitReply),
            },
            Phase::AwaitEnd => match last_packet {
                Some(t) if now.saturating_duration_since(t) <= REPLY_END => (None, Phase::AwaitEnd),
                _ => (None, Phase::Pause(PAUSE_FRAMES)),
            },
            Phase::Idle => (None, Phase::Idle),
        };
        self.phase = next;
        (send, measure)
    }

    fn after_reply_start(&self, p: &TalkProfile) -> Phase {
        match (self.barging, p.every) {
            (true, _) => Phase::Hearing(BARGE_AFTER_FRAMES),
            (false, Some(_)) => Phase::Idle,
            (false, None) => Phase::AwaitEnd,
        }
    }
}

/// What one client sends, frame by frame: its [`Talker`], its microphone's silence mode, and
/// the measures it records (shared by both client drivers).
pub(crate) struct Voice {
    recv: Arc<Mutex<Recv>>,
    mode: MicMode,
    talker: Talker,
    /// 20 ms frames of silence since the last speech packet.
    silent_frames: u32,
}

impl Voice {
    /// A voice that records into `recv`; silent until [`Voice::with_profile`].
    pub(crate) fn new(recv: Arc<Mutex<Recv>>) -> Self {
        Self { recv, mode: MicMode::Silence, talker: Talker::new(Instant::now(), None), silent_frames: 0 }
    }

    /// Send silence as `mode` says and act as `profile` says (talk: start after a random part of
    /// a silent second, or of the period with `every`, so that sessions do not speak in step).
    pub(crate) fn with_profile(mut self, mode: MicMode, profile: Profile, every: Option<Duration>) -> Self {
        self.mode = mode;
        let spread = every.map_or(50, |e| (e.as_millis() / 20).clamp(1, u128::from(u32::MAX)) as u32);
        let stagger = (profile == Profile::Talk).then(|| rand::random_range(0..spread));
        self.talker = Talker::new(Instant::now(), stagger);
        self
    }

    /// One 20 ms frame at `now`: the payload to send as the next RTP packet, or `None` for a
    /// frame not sent (DTX: the RTP timestamp runs on by one frame).
    pub(crate) fn frame(&mut self, now: Instant, speech: &Speech, profile: &TalkProfile) -> Option<Bytes> {
        let last_packet = self.recv.lock().unwrap_or_else(|p| p.into_inner()).last_packet_at;
        let (send, measure) = self.talker.step(now, last_packet, speech, profile);
        if let Some(m) = measure {
            let mut r = self.recv.lock().unwrap_or_else(|p| p.into_inner());
            if r.recording {
                match m {
                    Measure::Turn(ms) => r.sample.turn_ms.push(ms),
                    Measure::Barge(ms) => r.sample.barge_ms.push(ms),
                }
            }
        }
        if let Some(i) = send {
            self.silent_frames = 0;
            return Some(speech.question[i].clone());
        }
        let k = self.silent_frames;
        self.silent_frames = k.saturating_add(1);
        match self.mode {
            MicMode::Silence => Some(speech.silence.clone()),
            MicMode::Dtx if k < 10 => Some(speech.silence.clone()),
            MicMode::Dtx if k == 10 || (k > 10 && (k - 10) % 20 == 1) => Some(speech.dtx.clone()),
            MicMode::Dtx if k > 10 && (k - 10).is_multiple_of(20) => Some(speech.silence.clone()),
            MicMode::Dtx => None,
        }
    }

    /// A handle to this voice's measurements.
    pub(crate) fn probe(&self) -> Probe {
        Probe(Arc::clone(&self.recv))
    }
}

/// The session a client is to connect to (`POST /v1/sessions`).
pub(crate) struct NewSession {
    /// The session's bearer token.
    pub token: String,
    /// Where the offer goes (a path on the server).
    pub offer_url: String,
}

impl NewSession {
    /// Create a session on `base` with the scripted provider. Errors: HTTP, or a status other
    /// than 201.
    pub(crate) async fn create(http: &reqwest::Client, base: &str, api_key: Option<&str>) -> anyhow::Result<Self> {
        let mut req = http.post(format!("{base}/v1/sessions")).json(&serde_json::json!({ "provider": "scripted" }));
        if let Some(k) = api_key {
            req = req.bearer_auth(k);
        }
        let res = req.send().await?;
        anyhow::ensure!(res.status().as_u16() == 201, "POST /v1/sessions: {}", res.status());
        let v: serde_json::Value = res.json().await?;
        let token = v["token"].as_str().unwrap_or_default().to_owned();
        let offer_url = v["offer_url"].as_str().unwrap_or_default().to_owned();
        Ok(Self { token, offer_url })
    }

    /// Post the offer `sdp`; returns the answer SDP. Errors: HTTP, or a status other than 201.
    pub(crate) async fn offer(&self, http: &reqwest::Client, base: &str, sdp: String) -> anyhow::Result<String> {
        let res = http
            .post(format!("{base}{}", self.offer_url))
            .header("Content-Type", "application/sdp")
            .bearer_auth(&self.token)
            .body(sdp)
            .send()
            .await?;
        anyhow::ensure!(res.status().as_u16() == 201, "POST offer: {}", res.status());
        Ok(res.text().await?)
    }
}

/// A connected simulated user on a webrtc-rs peer with its own driver task
/// (`--client-driver task`).
pub struct Client {
    pc: Arc<dyn PeerConnection>,
    _dc: Arc<dyn DataChannel>,
    mic: MicSender,
    voice: Voice,
}

impl Client {
    /// Create a session on `base` and connect to it. Errors: HTTP, the peer's set-up.
    pub async fn connect(http: &reqwest::Client, base: &str, api_key: Option<&str>) -> anyhow::Result<Client> {
        let session = NewSession::create(http, base, api_key).await?;
        let recv = Arc::new(Mutex::new(Recv::default()));
        let (gathered, grx) = GatheringDone::new();
        let handler = Arc::new(Handler { recv: Arc::clone(&recv), gathered });
        let ClientPeer { pc, track, dc, ssrc, offer: sdp } =
            load_peer(handler, grx).await.map_err(|e| anyhow::anyhow!("client peer: {e}"))?;
        let (track, dc) = track.zip(dc).context("the peer has its track and data channel")?;
        let answer = session.offer(http, base, sdp).await?;
        let pt = answered_opus_pt(&answer).unwrap_or(OPUS_PT);
        pc.set_remote_description(RTCSessionDescription::answer(answer)?).await?;
        Ok(Client { pc, _dc: dc, mic: MicSender::new(track, ssrc, pt), voice: Voice::new(recv) })
    }

    /// See [`Voice::with_profile`].
    pub fn with_profile(mut self, mode: MicMode, profile: Profile, every: Option<Duration>) -> Self {
        self.voice = self.voice.with_profile(mode, profile, every);
        self
    }

    /// One 20 ms frame at `now`: send the talker's next packet, or silence as the microphone
    /// mode sends it.
    pub async fn frame(&mut self, now: Instant, speech: &Speech, profile: &TalkProfile) {
        match self.voice.frame(now, speech, profile) {
            Some(payload) => self.mic.send(payload).await,
            None => self.mic.skip(FRAME_TICKS),
        }
    }

    /// A handle to this client's measurements.
    pub fn probe(&self) -> Probe {
        self.voice.probe()
    }

    /// Hang up.
    pub async fn close(self) {
        let _ = self.pc.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn speech() -> Speech {
        let pkt = Bytes::from_static(&[0x78, 0, 0]);
        Speech { question: vec![pkt.clone(); 10], silence: pkt, dtx: Bytes::from_static(&[0x78]), speech_end: 7 }
    }

    /// Runs `frames` steps 20 ms apart; the agent answers `reply_after` after each question's
    /// end of speech for `reply_len`. Returns the frames on which a question started and what
    /// was measured.
    fn run(p: &TalkProfile, frames: u32, reply_after: Duration, reply_len: Duration) -> (Vec<u32>, Vec<Measure>) {
        let speech = speech();
        let t0 = Instant::now();
        let mut talker = Talker::new(t0, Some(3));
        let (mut starts, mut measures) = (Vec::new(), Vec::new());
        let mut reply: Option<(Instant, Instant)> = None;
        let mut last_packet = None;
        for f in 0..frames {
            let now = t0 + Duration::from_millis(20 * u64::from(f));
            if let Some((a, b)) = reply
                && now >= a
                && now < b
            {
                last_packet = Some(now);
            }
            let (send, m) = talker.step(now, last_packet, &speech, p);
            if send == Some(0) {
                starts.push(f);
            }
            if send == Some(speech.speech_end) {
                reply = Some((now + reply_after, now + reply_after + reply_len));
            }
            measures.extend(m);
        }
        (starts, measures)
    }

    #[test]
    fn turns_wait_for_the_reply_then_pause() {
        let p = TalkProfile { barge: 0.0, every: None };
        let (starts, measures) = run(&p, 200, Duration::from_millis(500), Duration::from_secs(1));
        // Stagger 3, question 10 frames (end of speech at frame 10), reply 35..85, ends
        // (300 ms without packets) at 100, pause 25: the next question at 126.
        assert_eq!(&starts[..2], &[3, 126]);
        assert!(matches!(measures[0], Measure::Turn(ms) if (500.0..=520.0).contains(&ms)), "{measures:?}");
    }

    #[test]
    fn periodic_questions_keep_their_period_and_barge_ins_cut_replies() {
        let p = TalkProfile { barge: 0.0, every: Some(Duration::from_secs(2)) };
        let (starts, _) = run(&p, 400, Duration::from_millis(500), Duration::from_secs(5));
        assert_eq!(starts, vec![3, 103, 203, 303], "a question every 100 frames whatever the reply does");
        let p = TalkProfile { barge: 1.0, every: None };
        let (starts, measures) = run(&p, 200, Duration::from_millis(200), Duration::from_secs(10));
        // The reply starts 10 frames after the end of speech (frame 10), at 20; 50 frames of it
        // heard, the barge-in starts at 71.
        assert_eq!(&starts[..2], &[3, 71]);
        assert!(measures.iter().any(|m| matches!(m, Measure::Barge(_))), "{measures:?}");
    }
}
