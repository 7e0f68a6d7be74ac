//! A real webrtc-rs client peer on loopback, as a browser would open it: one Opus microphone track
//! (payload type 111, in-band FEC offered), a data channel labelled `events`, all candidates in
//! the offer (no trickle). Shared by the integration tests (`tests/common`) and the load
//! generator (`src/bin/kotodama-loadgen`, which includes this file), so both speak to the server
//! exactly the same way.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rtc::media_stream::MediaStreamTrack;
use rtc::rtp;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use tokio::sync::oneshot;
use webrtc::data_channel::DataChannel;
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCConfigurationBuilder,
    RTCIceGatheringState, RTCIceServer, RTCIceTransportPolicy, Registry, SettingEngineBuilder, configure_rtcp_reports,
    register_default_interceptors,
};

/// Any error of building the peer (webrtc-rs, SDP).
pub type PeerError = Box<dyn std::error::Error + Send + Sync>;

/// The payload type offered for Opus.
pub const OPUS_PT: u8 = 111;
/// RTP timestamp step of one 20 ms frame at 48 kHz.
pub const FRAME_TICKS: u32 = 960;
/// How long to wait for ICE gathering before offering what was gathered.
const GATHER_TIMEOUT: Duration = Duration::from_secs(3);

/// Opus as browsers offer it: 48 kHz, 2 channels in SDP, `useinbandfec=1`.
pub fn opus_codec() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: "audio/opus".to_owned(),
        clock_rate: 48_000,
        channels: 2,
        sdp_fmtp_line: "minptime=10;useinbandfec=1".to_owned(),
        rtcp_feedback: vec![],
    }
}

/// Fires once ICE gathering completes: call [`GatheringDone::on_state`] from the handler's
/// `on_ice_gathering_state_change`.
pub struct GatheringDone(Mutex<Option<oneshot::Sender<()>>>);

impl GatheringDone {
    /// The signal and the receiver [`client_peer`] waits on.
    pub fn new() -> (Self, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        (Self(Mutex::new(Some(tx))), rx)
    }

    /// Forward every gathering state here.
    pub fn on_state(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete
            && let Some(tx) = self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
        {
            let _ = tx.send(());
        }
    }
}

/// A client peer with its offer set as local description.
pub struct ClientPeer {
    /// The peer connection.
    pub pc: Arc<dyn PeerConnection>,
    /// The microphone track (when asked for).
    pub track: Option<Arc<TrackLocalStaticRTP>>,
    /// The `events` data channel (when asked for).
    pub dc: Option<Arc<dyn DataChannel>>,
    /// SSRC of the microphone track.
    pub ssrc: u32,
    /// The offer SDP, with every gathered candidate.
    pub offer: String,
}

/// How the client peer reaches the network.
#[derive(Clone)]
pub struct ClientNet {
    /// STUN/TURN servers (from `ice_servers`).
    pub ice_servers: Vec<RTCIceServer>,
    /// `iceTransportPolicy: "relay"`: only relay candidates.
    pub relay_only: bool,
    /// Local UDP addresses to bind.
    pub udp_addrs: Vec<SocketAddr>,
    /// Keep the `a=candidate` lines in the offer (false: a candidate-less, non-trickling offer,
    /// as the OpenAI Agents SDK sends).
    pub offer_candidates: bool,
    /// An ICE restart binds new sockets on the interfaces that exist then (a network change).
    pub rebind_on_restart: bool,
    /// ICE over TCP only (active candidates, RFC 6544), as behind a UDP-blocking firewall.
    pub tcp_only: bool,
    /// Without a microphone, a receive-only audio transceiver (a WHEP player).
    pub receive_only_audio: bool,
    /// Adds interceptors to the client's chain after the default ones (e.g. a sender that
    /// switches its SSRC mid-stream, `tests/common/ssrc_switch.rs`).
    pub interceptors: Option<Arc<dyn Fn(Registry) -> Registry + Send + Sync>>,
    /// RTCP sender/receiver reports as the only default interceptors (the load generator's
    /// trimmed peer, [`load_peer`]).
    pub rtcp_reports_only: bool,
}

impl Default for ClientNet {
    fn default() -> Self {
        ClientNet {
            ice_servers: Vec::new(),
            relay_only: false,
            udp_addrs: vec!["127.0.0.1:0".parse().unwrap()],
            offer_candidates: true,
            rebind_on_restart: false,
            tcp_only: false,
            receive_only_audio: false,
            interceptors: None,
            rtcp_reports_only: false,
        }
    }
}

/// Build a loopback client peer whose events go to `handler` and make its offer; waits for
/// `gathered` (see [`GatheringDone`]) up to 3 s. `with_audio` / `with_dc` allow offers the
/// server must reject.
pub async fn client_peer(
    handler: Arc<dyn PeerConnectionEventHandler>,
    gathered: oneshot::Receiver<()>,
    with_audio: bool,
    with_dc: bool,
) -> Result<ClientPeer, PeerError> {
    client_peer_on(&ClientNet::default(), handler, gathered, with_audio, with_dc).await
}

/// [`client_peer`] with an audio track and the data channel, trimmed for the load generator:
/// RTCP sender/receiver reports as its only interceptors (no NACK responder copying every sent
/// packet, no TWCC: the server negotiates neither for audio, see `src/peer.rs`) and no mDNS
/// (webrtc-rs' default opens one multicast socket per peer, and every mDNS datagram on the host
/// then reaches each of them). ICE, DTLS-SRTP, RTP/RTCP and SCTP are the same as a full peer's.
pub async fn load_peer(
    handler: Arc<dyn PeerConnectionEventHandler>,
    gathered: oneshot::Receiver<()>,
) -> Result<ClientPeer, PeerError> {
    let net = ClientNet { rtcp_reports_only: true, ..ClientNet::default() };
    client_peer_on(&net, handler, gathered, true, true).await
}

/// [`client_peer`] on the network `net` describes (relay-only, TCP-only, receive-only, ...).
pub async fn client_peer_on(
    net: &ClientNet,
    handler: Arc<dyn PeerConnectionEventHandler>,
    gathered: oneshot::Receiver<()>,
    with_audio: bool,
    with_dc: bool,
) -> Result<ClientPeer, PeerError> {
    let mut me = MediaEngine::default();
    me.register_codec(RTCRtpCodecParameters { rtp_codec: opus_codec(), payload_type: OPUS_PT }, RtpCodecKind::Audio)?;
    let mut registry = match net.rtcp_reports_only {
        true => configure_rtcp_reports(Registry::new()),
        false => register_default_interceptors(Registry::new(), &mut me)?,
    };
    if let Some(add) = &net.interceptors {
        registry = add(registry);
    }
    let policy = if net.relay_only { RTCIceTransportPolicy::Relay } else { RTCIceTransportPolicy::All };
    let configuration =
        RTCConfigurationBuilder::new().with_ice_servers(net.ice_servers.clone()).with_ice_transport_policy(policy);
    let mut setting = SettingEngineBuilder::new()
        .with_include_loopback_candidate(true)
        // No multicast socket in the client's process (a test counts the server's sockets).
        .with_multicast_dns_mode(rtc::ice::mdns::MulticastDnsMode::Disabled)
        .with_discard_local_candidates_during_ice_restart(net.rebind_on_restart);
    let (udp, tcp) = match net.tcp_only {
        true => {
            setting = setting.with_network_types(vec![rtc::ice::network_type::NetworkType::Tcp4]);
            (vec![], vec!["127.0.0.1:0".parse::<SocketAddr>()?])
        }
        false => (net.udp_addrs.clone(), vec![]),
    };
    let pc = PeerConnectionBuilder::new()
        .with_configuration(configuration.build())
        .with_media_engine(me)
        .with_setting_engine(setting.build())
        .with_interceptor_registry(registry)
        .with_handler(handler)
        .with_udp_addrs(udp)
        .with_tcp_addrs(tcp)
        .build()
        .await?;
    let pc: Arc<dyn PeerConnection> = Arc::new(pc);
    let ssrc: u32 = rand::random();
    let track = if with_audio { Some(mic_track(&pc, ssrc).await?) } else { None };
    if net.receive_only_audio {
        let init = rtc::rtp_transceiver::RTCRtpTransceiverInit {
            direction: rtc::rtp_transceiver::RTCRtpTransceiverDirection::Recvonly,
            streams: vec![],
            send_encodings: vec![],
        };
        pc.add_transceiver_from_kind(RtpCodecKind::Audio, Some(init)).await?;
    }
    let dc = if with_dc { Some(pc.create_data_channel("events", None).await?) } else { None };
    let offer = pc.create_offer(None).await?;
    pc.set_local_description(offer).await?;
    let _ = tokio::time::timeout(GATHER_TIMEOUT, gathered).await;
    let mut offer = pc.local_description().await.map(|d| d.sdp).unwrap_or_default();
    if !net.offer_candidates {
        offer = offer.split_inclusive('\n').filter(|l| !l.starts_with("a=candidate:")).collect();
    }
    Ok(ClientPeer { pc, track, dc, ssrc, offer })
}

/// The microphone's track description: Opus, one encoding with `ssrc`.
pub fn mic_stream_track(ssrc: u32) -> MediaStreamTrack {
    MediaStreamTrack::new(
        "mic".into(),
        "mic".into(),
        "mic".into(),
        RtpCodecKind::Audio,
        vec![RTCRtpEncodingParameters {
            rtp_coding_parameters: RTCRtpCodingParameters { ssrc: Some(ssrc), ..Default::default() },
            codec: opus_codec(),
            ..Default::default()
        }],
    )
}

/// The microphone track (Opus, `ssrc`) added to `pc`.
pub async fn mic_track(pc: &Arc<dyn PeerConnection>, ssrc: u32) -> Result<Arc<TrackLocalStaticRTP>, PeerError> {
    let track = Arc::new(TrackLocalStaticRTP::new(mic_stream_track(ssrc)));
    pc.add_track(Arc::clone(&track) as Arc<dyn TrackLocal>).await?;
    Ok(track)
}

/// The payload type the answer gives Opus (`a=rtpmap:<pt> opus/48000`).
pub fn answered_opus_pt(answer: &str) -> Option<u8> {
    answer.lines().find_map(|l| {
        let rest = l.trim().strip_prefix("a=rtpmap:")?;
        let (pt, codec) = rest.split_once(' ')?;
        codec.to_ascii_lowercase().starts_with("opus/48000").then(|| pt.parse().ok()).flatten()
    })
}

/// Sends 20 ms Opus payloads as consecutive RTP packets on the microphone track (random initial
/// sequence number and timestamp, RFC 3550 §5.1).
pub struct MicSender {
    track: Arc<TrackLocalStaticRTP>,
    ssrc: u32,
    pt: u8,
    seq: u16,
    ts: u32,
}

impl MicSender {
    /// A sender on `track` with `ssrc`, payload type `pt`.
    pub fn new(track: Arc<TrackLocalStaticRTP>, ssrc: u32, pt: u8) -> Self {
        Self { track, ssrc, pt, seq: rand::random(), ts: rand::random() }
    }

    /// Advance the RTP timestamp by `ticks` (48 kHz) without sending: the gap a DTX sender or a
    /// paused sender leaves.
    pub fn skip(&mut self, ticks: u32) {
        self.ts = self.ts.wrapping_add(ticks);
    }

    /// Send `payload` as the next packet (one frame later); a closed track is ignored.
    pub async fn send(&mut self, payload: Bytes) {
        self.seq = self.seq.wrapping_add(1);
        self.ts = self.ts.wrapping_add(FRAME_TICKS);
        let header = rtp::header::Header {
            version: 2,
            payload_type: self.pt,
            sequence_number: self.seq,
            timestamp: self.ts,
            ssrc: self.ssrc,
            ..Default::default()
        };
        let _ = self.track.write_rtp(rtp::Packet { header, payload }).await;
    }
}
