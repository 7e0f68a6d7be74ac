//! The webrtc-rs peer of one session.
//!
//! [`Peer::answer`] takes the client's offer and returns the answer with all of the server's ICE
//! candidates in it (the server does not trickle). The peer's callbacks do no work: they forward
//! RTP packets, data-channel messages and state changes into the session task's bounded channel
//! as [`PeerEvent`]s, and count what they had to drop when it is full. The session task writes
//! the character's voice with [`Peer::write_opus`], one packet per 20 ms frame, with RTP
//! timestamps from the playout clock (so pauses between replies are pauses on the wire too).
//!
//! Ports: by default webrtc-rs 0.21 binds one UDP socket per peer connection, on the advertised
//! interface and an ephemeral port (or one of `media.udp_ports`), so a node holds one socket per
//! live session; `session.max_sessions` caps them. With `media.udp_port` every peer runs on a view
//! of one shared socket instead ([`crate::udp_mux`]): the answer's candidates name that port.
//!
//! NAT traversal: no mDNS (no multicast socket; `.local` candidates of clients are ignored, the
//! client is learnt peer-reflexively from its checks); [`Peer::restart_ice`] answers an ICE restart
//! (a new network) without touching DTLS, SCTP or the tracks.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rtc::ice::mdns::MulticastDnsMode;
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::configuration::setting_engine::SctpMaxMessageSize;
use rtc::peer_connection::transport::RTCDtlsRole;
use rtc::rtp;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use tokio::sync::{mpsc, oneshot};
use webrtc::data_channel::{DataChannel, DataChannelEvent};
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCConfigurationBuilder,
    RTCIceCandidateInit, RTCIceCandidateType, RTCIceGatheringState, RTCPeerConnectionState, RTCSessionDescription,
    Registry, SettingEngineBuilder, configure_rtcp_reports,
};
use webrtc::rtp_transceiver::RtpSender;

/// The data channel the client opens for events.
pub const EVENTS_LABEL: &str = "events";
/// Opus RTP clock.
const OPUS_CLOCK_HZ: u32 = 48_000;
/// Largest data-channel message the server accepts from a client (events are small).
const MAX_DC_MESSAGE: u32 = 64 * 1024;
/// How long the answer waits for local candidate gathering.
const GATHER_TIMEOUT: Duration = Duration::from_secs(3);

/// What the peer forwards to its session task.
pub enum PeerEvent {
    /// An RTP packet of the client's audio.
    Rtp {
        /// When it arrived (for uplink latency accounting).
        arrival: Instant,
        /// RTP payload type (the uplink decodes only the negotiated Opus one).
        payload_type: u8,
        /// RTP SSRC.
        ssrc: u32,
        /// RTP sequence number.
        seq: u16,
        /// RTP timestamp.
        timestamp: u32,
        /// Opus payload.
        payload: Bytes,
    },
    /// The `events` data channel opened.
    ChannelOpen(EventChannel),
    /// A message on the `events` channel.
    Message(BytesMut),
    /// The `events` channel closed.
    ChannelClosed,
    /// The connection state changed.
    State(RTCPeerConnectionState),
}

/// Why a peer could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    /// The offer was rejected by the WebRTC stack.
    #[error("offer rejected: {0}")]
    Offer(String),
    /// The stack's answer does not work for the offer (checked by `signaling::answer`).
    #[error(transparent)]
    Answer(#[from] signaling::answer::AnswerError),
    /// Every port of `media.udp_ports` is held (by other sessions or other processes).
    #[error("no free UDP port in media.udp_ports")]
    NoMediaPort,
    /// Local setup failed (sockets, codecs).
    #[error("peer setup failed: {0}")]
    Setup(String),
}

/// Counters the forwarding callbacks keep (they never block; when the session's channel is full
/// they drop and count).
#[derive(Debug, Default)]
pub struct PeerCounters {
    /// RTP packets forwarded.
    pub rtp_in: AtomicU64,
    /// RTP packets dropped because the session task was behind.
    pub rtp_dropped: AtomicU64,
    /// Data-channel messages dropped (session behind or message too large).
    pub messages_dropped: AtomicU64,
    /// RTP packets of the character's voice dropped because the peer loop's queue was full
    /// (`media.peer_driver = "loop"` only).
    pub rtp_out_dropped: AtomicU64,
}

/// The session's data channel (`events`, `chat` or `oai-events`), on either driver.
#[derive(Clone)]
pub enum EventChannel {
    /// A channel of webrtc-rs' per-peer driver.
    Task(Arc<dyn DataChannel>),
    /// A channel of the node's peer loop.
    Loop(crate::peer_loop::LoopChannel),
}

impl EventChannel {
    /// Queue a text message without waiting. Errors (the message is dropped): the channel is
    /// closed, or its send buffer (1 MB) is full because the client does not acknowledge.
    pub async fn try_send_text(&self, text: &str) -> Result<(), String> {
        match self {
            EventChannel::Task(dc) => dc.try_send_text(text).await.map_err(|e| e.to_string()),
            EventChannel::Loop(dc) => dc.try_send_text(text).map_err(|e| e.to_string()),
        }
    }

    /// Bytes sent and not yet acknowledged by the client (0 when unknown).
    pub async fn outstanding_bytes(&self) -> usize {
        match self {
            EventChannel::Task(dc) => dc.outstanding_bytes().await.unwrap_or(0),
            EventChannel::Loop(dc) => dc.outstanding_bytes().await,
        }
    }

    /// Close the channel (idempotent).
    pub async fn close(&self) {
        match self {
            EventChannel::Task(dc) => {
                let _ = dc.close().await;
            }
            EventChannel::Loop(dc) => dc.close().await,
        }
    }
}

/// Whether a data channel with this label is the session's: `events` (api-v1), Pipecat's `chat`
/// (RTVI) or `oai-events` (OpenAI Realtime calls); the session's codec speaks the dialect.
pub(crate) fn is_session_channel(label: &str) -> bool {
    label == EVENTS_LABEL
        || label == crate::session::rtvi::DATA_CHANNEL_LABEL
        || label == crate::session::oai_events::OAI_EVENTS_LABEL
}

/// Settings shared by every peer of a node.
#[derive(Debug, Clone)]
pub struct PeerSettings {
    /// The interface to bind UDP on.
    pub bind_ip: IpAddr,
    /// The address to advertise in candidates (NAT 1:1) when different from `bind_ip`.
    pub public_ip: IpAddr,
    /// No ICE traffic for this long fails the connection (5 s to `disconnected`, the rest to `failed`).
    pub peer_timeout: Duration,
    /// UDP ports for media; `None`: ephemeral ports.
    pub ports: Option<Arc<PortRange>>,
    /// One UDP socket for every peer (`KOTODAMA_UDP_PORT`); takes precedence over `ports`.
    pub mux: Option<Arc<crate::udp_mux::UdpMux>>,
    /// One loop driving every peer (`media.peer_driver = "loop"`); takes precedence over both.
    pub peer_loop: Option<Arc<crate::peer_loop::PeerLoop>>,
}

/// A range of UDP ports handed out round-robin to new peers (for firewalls and TURN allow-lists).
#[derive(Debug)]
pub struct PortRange {
    min: u16,
    max: u16,
    next: std::sync::atomic::AtomicU32,
}

impl PortRange {
    /// Ports `min..=max`.
    pub fn new(min: u16, max: u16) -> Self {
        Self { min, max, next: std::sync::atomic::AtomicU32::new(0) }
    }

    /// A port of the range that is free on `ip` right now (probed by binding it), or `None` when
    /// every port is taken.
    pub fn pick(&self, ip: IpAddr) -> Option<u16> {
        let size = u32::from(self.max - self.min) + 1;
        for _ in 0..size {
            let offset = self.next.fetch_add(1, Ordering::Relaxed) % size;
            let port = self.min + offset as u16;
            if std::net::UdpSocket::bind((ip, port)).is_ok() {
                return Some(port);
            }
        }
        None
    }
}

/// One live peer connection.
pub struct Peer {
    driver: Driver,
    ssrc: u32,
    payload_type: u8,
    seq: u16,
    counters: Arc<PeerCounters>,
}

/// What drives the peer's WebRTC stack.
enum Driver {
    /// webrtc-rs' driver task of its own (`media.peer_driver = "task"`).
    Task {
        pc: Arc<dyn PeerConnection>,
        track: Arc<TrackLocalStaticRTP>,
        sender: Arc<dyn RtpSender>,
        handler: Arc<Forwarder>,
        /// This peer's routes on the shared socket, when there is one (dropped with the peer).
        lease: Option<Arc<crate::udp_mux::MuxLease>>,
    },
    /// The node's peer loop (`media.peer_driver = "loop"`).
    Loop(Arc<crate::peer_loop::LoopPeer>),
}

/// The client's side of an ICE restart (RFC 9725 §4.3.2: a PATCH with `If-Match: *` and a new
/// `a=ice-ufrag`/`a=ice-pwd`).
#[derive(Debug, Clone)]
pub struct IceRestart {
    /// The client's new ICE username fragment.
    pub ufrag: String,
    /// The client's new ICE password.
    pub pwd: String,
    /// Candidates of the new generation (may be empty: learnt from its checks).
    pub candidates: Vec<RTCIceCandidateInit>,
}

impl Peer {
    /// Answer `offer_sdp`: returns the peer and the SDP answer (with all candidates).
    pub async fn answer(
        settings: &PeerSettings,
        offer: &signaling::sdp::ValidOffer,
        events: mpsc::Sender<PeerEvent>,
    ) -> Result<(Peer, String), PeerError> {
        let (media_engine, registry, se, opus) = stack_parts(settings, offer)?;
        if let Some(peer_loop) = &settings.peer_loop {
            return answer_in_loop(peer_loop, (media_engine, registry, se, opus), offer, events).await;
        }
        let setup = |e: webrtc::error::Error| PeerError::Setup(e.to_string());

        let (gathered_tx, gathered_rx) = oneshot::channel();
        let counters = Arc::new(PeerCounters::default());
        let handler = Arc::new(Forwarder {
            events: events.clone(),
            gathered: std::sync::Mutex::new(Some(gathered_tx)),
            counters: Arc::clone(&counters),
        });
        let lease = settings.mux.as_ref().map(|m| Arc::new(m.lease()));
        let port = match &settings.ports {
            _ if lease.is_some() => 0,
            Some(range) => range.pick(settings.bind_ip).ok_or(PeerError::NoMediaPort)?,
            None => 0,
        };
        let explicit_port = port != 0;
        // A socket of its own is plain UDP: no GRO buffers (2 x 96 KB per session, see
        // crate::plain_udp); the shared socket's runtime is the mux's.
        let runtime: Arc<dyn webrtc::runtime::Runtime> = match &lease {
            Some(lease) => lease.runtime(),
            None => Arc::new(crate::plain_udp::PlainUdpRuntime),
        };
        let builder = PeerConnectionBuilder::new().with_runtime(runtime);
        let pc = builder
            .with_configuration(RTCConfigurationBuilder::new().build())
            .with_media_engine(media_engine)
            .with_setting_engine(se.build())
            .with_interceptor_registry(registry)
            .with_handler(Arc::clone(&handler) as Arc<dyn PeerConnectionEventHandler>)
            .with_udp_addrs(vec![std::net::SocketAddr::new(settings.bind_ip, port)])
            // ICE-TCP passive (RFC 6544) only on the shared port: per-peer listeners would need a
            // port range of their own.
            .with_tcp_addrs(match lease.as_ref().and_then(|l| l.tcp_addr()) {
                Some(_) => vec![std::net::SocketAddr::new(settings.bind_ip, 0)],
                None => vec![],
            })
            .with_data_channel_send_buffer_limit(1024 * 1024)
            .build()
            .await
            // The port was free when picked; another process may have taken it since.
            .map_err(|e| if explicit_port && is_addr_in_use(&e) { PeerError::NoMediaPort } else { setup(e) })?;
        let pc: Arc<dyn PeerConnection> = Arc::new(pc);

        let ssrc: u32 = rand::random();
        let track = Arc::new(TrackLocalStaticRTP::new(voice_track(ssrc, opus)));

        let result = async {
            // Past the validator, whatever the stack refuses is caused by the offer's shape.
            let refused = |e: webrtc::error::Error| PeerError::Offer(e.to_string());
            let remote = RTCSessionDescription::offer(offer.sdp().to_owned()).map_err(refused)?;
            pc.set_remote_description(remote).await.map_err(refused)?;
            let sender = pc.add_track(Arc::clone(&track) as Arc<dyn TrackLocal>).await.map_err(refused)?;
            let answer = pc.create_answer(None).await.map_err(refused)?;
            pc.set_local_description(answer).await.map_err(refused)?;
            // The answer must carry every candidate: wait for gathering (host candidates only,
            // so this is quick), bounded.
            let _ = tokio::time::timeout(GATHER_TIMEOUT, gathered_rx).await;
            let local = pc.local_description().await.ok_or_else(|| PeerError::Setup("no local description".into()))?;
            signaling::answer::check_answer(offer, &local.sdp)?;
            Ok::<(String, Arc<dyn RtpSender>), PeerError>((local.sdp, sender))
        }
        .await;
        let (answer, sender) = match result {
            Ok(a) => a,
            Err(e) => {
                let _ = pc.close().await;
                return Err(e);
            }
        };
        let answer = match &lease {
            Some(lease) => {
                lease.set_ufrag(&ice_ufrag(&answer).unwrap_or_default());
                lease.rewrite_ports(&answer)
            }
            None => answer,
        };
        let payload_type = opus_payload_type(&answer).unwrap_or(111);
        let driver = Driver::Task { pc, track, sender, handler, lease };
        Ok((Peer { driver, ssrc, payload_type, seq: rand::random(), counters }, answer))
    }

    /// Restart ICE as the answerer: the current offer with the client's new credentials is set
    /// again (JSEP §5.7: a changed ufrag/pwd in a remote offer restarts ICE), a new answer with
    /// new server credentials is made, and the client's new candidates are added. DTLS, SCTP,
    /// the tracks and everything above them continue. Returns the server's
    /// `application/trickle-ice-sdpfrag` (RFC 8840): its new ufrag/pwd, the first m-line with its
    /// mid, every server candidate and `a=end-of-candidates`.
    /// Errors: [`PeerError::Offer`] when the stack refuses the restarted offer.
    ///
    /// The returned future owns what it needs, so the session task can run it on a task of its
    /// own and keep pacing audio meanwhile (it waits for gathering, up to 3 s).
    pub fn restart_ice(
        &self,
        restart: IceRestart,
    ) -> impl std::future::Future<Output = Result<String, PeerError>> + Send + 'static {
        let driver = match &self.driver {
            Driver::Task { pc, handler, lease, .. } => Ok((Arc::clone(pc), Arc::clone(handler), lease.clone())),
            Driver::Loop(lp) => Err(Arc::clone(lp)),
        };
        async move {
            let (pc, handler, lease) = match driver {
                Ok(task) => task,
                Err(lp) => return restart_in_loop(&lp, restart).await,
            };
            let offer_err = |e: webrtc::error::Error| PeerError::Offer(e.to_string());
            let current = pc.remote_description().await.ok_or_else(|| PeerError::Offer("no remote offer".into()))?;
            let offer = restarted_offer(&current.sdp, &restart.ufrag, &restart.pwd);
            let (gathered_tx, gathered_rx) = oneshot::channel();
            *handler.gathered.lock().unwrap_or_else(|p| p.into_inner()) = Some(gathered_tx);
            pc.set_remote_description(RTCSessionDescription::offer(offer).map_err(offer_err)?)
                .await
                .map_err(offer_err)?;
            let answer = pc.create_answer(None).await.map_err(offer_err)?;
            pc.set_local_description(answer).await.map_err(|e| PeerError::Setup(e.to_string()))?;
            for c in restart.candidates {
                if let Err(e) = add_remote_candidate(pc.as_ref(), c).await {
                    tracing::debug!(error = %e, "restart candidate rejected");
                }
            }
            let _ = tokio::time::timeout(GATHER_TIMEOUT, gathered_rx).await;
            let local = pc.local_description().await.ok_or_else(|| PeerError::Setup("no local description".into()))?;
            let frag = answer_sdpfrag(&local.sdp)?;
            Ok(match &lease {
                Some(lease) => {
                    lease.set_ufrag(&ice_ufrag(&local.sdp).unwrap_or_default());
                    lease.rewrite_ports(&frag)
                }
                None => frag,
            })
        }
    }

    /// Send one Opus frame of the character's voice. `timestamp` is in 48 kHz units of the
    /// playout clock; `marker` starts a talk spurt. With the peer loop the packet is queued (a
    /// full queue drops it and counts it in [`PeerCounters::rtp_out_dropped`]).
    pub async fn write_opus(&mut self, payload: &[u8], timestamp: u32, marker: bool) -> Result<(), PeerError> {
        self.seq = self.seq.wrapping_add(1);
        let packet = rtp::Packet {
            header: rtp::header::Header {
                version: 2,
                marker,
                payload_type: self.payload_type,
                sequence_number: self.seq,
                timestamp,
                ssrc: self.ssrc,
                ..Default::default()
            },
            payload: Bytes::copy_from_slice(payload),
        };
        match &self.driver {
            Driver::Task { track, .. } => track.write_rtp(packet).await.map_err(|e| PeerError::Setup(e.to_string())),
            Driver::Loop(lp) => match lp.write_rtp(packet) {
                Err(crate::peer_loop::LoopError::Closed) => Err(PeerError::Setup("the peer is closed".into())),
                Err(crate::peer_loop::LoopError::Full) => {
                    self.counters.rtp_out_dropped.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
                Ok(()) => Ok(()),
            },
        }
    }

    /// The share of our packets the client reports lost (RTCP receiver reports), 0.0..=1.0.
    pub async fn remote_fraction_lost(&self) -> Option<f64> {
        let fraction = |report: &webrtc::peer_connection::RTCStatsReport| {
            report.iter().find_map(|e| match e {
                webrtc::peer_connection::RTCStatsReportEntry::RemoteInboundRtp(r) => Some(r.fraction_lost),
                _ => None,
            })
        };
        match &self.driver {
            Driver::Task { sender, .. } => fraction(&sender.get_stats(Instant::now()).await.ok()?),
            Driver::Loop(lp) => {
                let sender = lp.sender();
                let selector = rtc::statistics::StatsSelector::Sender(sender);
                lp.run(move |pc, now| fraction(&pc.get_stats(now, selector))).await.ok()?
            }
        }
    }

    /// Add a remote candidate trickled by the client. TCP candidates are ignored: the server is
    /// ICE-TCP passive only (clients dial it), and webrtc-rs would otherwise open a TCP connection
    /// to whatever address a client names (a `tcptype passive` candidate for 127.0.0.1:6379...).
    pub async fn add_candidate(&self, candidate: RTCIceCandidateInit) -> Result<(), PeerError> {
        match &self.driver {
            Driver::Task { pc, .. } => add_remote_candidate(pc.as_ref(), candidate).await,
            Driver::Loop(_) if is_tcp_candidate(&candidate.candidate) => Ok(()),
            Driver::Loop(lp) => lp
                .run(move |pc, _| pc.add_remote_candidate(candidate).map_err(|e| PeerError::Offer(e.to_string())))
                .await
                .map_err(|e| PeerError::Setup(e.to_string()))?,
        }
    }

    /// The ICE ufrag of the client's current offer (for trickle validation).
    pub async fn remote_ufrag(&self) -> Option<String> {
        match &self.driver {
            Driver::Task { pc, .. } => ice_ufrag(&pc.remote_description().await?.sdp),
            Driver::Loop(lp) => {
                lp.run(|pc, _| pc.remote_description().and_then(|d| ice_ufrag(&d.sdp))).await.ok().flatten()
            }
        }
    }

    /// The forwarding counters.
    pub fn counters(&self) -> &Arc<PeerCounters> {
        &self.counters
    }

    /// Close the connection (idempotent).
    pub async fn close(&self) {
        match &self.driver {
            Driver::Task { pc, .. } => {
                let _ = pc.close().await;
            }
            Driver::Loop(lp) => lp.close().await,
        }
    }
}

/// The stack's parts every driver shares: Opus (`usedtx=1`), RTCP reports and the SSRC demux,
/// ICE timeouts from `peer_timeout`, no mDNS, the answering DTLS role for the offer's `a=setup`.
fn stack_parts(
    settings: &PeerSettings,
    offer: &signaling::sdp::ValidOffer,
) -> Result<(MediaEngine, Registry, SettingEngineBuilder, RTCRtpCodec), PeerError> {
    let mut media_engine = MediaEngine::default();
    let opus = RTCRtpCodec {
        mime_type: "audio/opus".to_owned(),
        clock_rate: OPUS_CLOCK_HZ,
        channels: 2,
        // `usedtx=1` (RFC 7587 §6.1): the client may stop sending during silence; the uplink
        // takes its DTX packets as silence and fills the pause on the clock while an
        // utterance is open, so turns still end on time (media::uplink, "DTX").
        sdp_fmtp_line: "minptime=10;useinbandfec=1;usedtx=1".to_owned(),
        rtcp_feedback: vec![],
    };
    media_engine
        .register_codec(RTCRtpCodecParameters { rtp_codec: opus.clone(), payload_type: 111 }, RtpCodecKind::Audio)
        .map_err(|e| PeerError::Setup(e.to_string()))?;
    // Voice only needs RTCP sender/receiver reports (A/V sync, loss stats). NACK retransmission
    // is not used for Opus (FEC/PLC cover loss) and TWCC feeds bandwidth estimation we do not
    // do at a fixed 32 kbit/s: both cost per-packet work and timers on every session.
    // Audio of any SSRC on the one audio m-line is the microphone (issue 12 kind 2).
    let registry = configure_rtcp_reports(Registry::new())
        .with(crate::ssrc_demux::SLOT.into(), crate::ssrc_demux::SsrcDemux::default());

    let disconnected = Duration::from_secs(5);
    let mut se = SettingEngineBuilder::new()
        .with_ice_timeouts(
            Some(disconnected),
            Some(settings.peer_timeout.saturating_sub(disconnected).max(Duration::from_secs(1))),
            Some(Duration::from_secs(2)),
        )
        .with_sctp_max_message_size(SctpMaxMessageSize::Bounded(MAX_DC_MESSAGE))
        // No mDNS: no multicast socket per peer (binding one fails where the network has no
        // multicast route, as in many containers), host candidates carry IPs, and a client's
        // `.local` candidates are ignored: it connects through its other candidates or
        // through peer-reflexive learning from its connectivity checks (RFC 8445 §7.3.1.3).
        .with_multicast_dns_mode(MulticastDnsMode::Disabled)
        .with_include_loopback_candidate(settings.bind_ip.is_loopback())
        .with_answering_dtls_role(answering_dtls_role(offer.setup()));
    if settings.public_ip != settings.bind_ip {
        se = se.with_nat_1to1_ips(vec![settings.public_ip.to_string()], RTCIceCandidateType::Host);
    }

    Ok((media_engine, registry, se, opus))
}

/// [`Peer::answer`] on the node's peer loop: the offer/answer runs here on the caller's task
/// (the core is sans-IO), with one host candidate for the loop's socket; the loop then takes the
/// peer over.
async fn answer_in_loop(
    peer_loop: &Arc<crate::peer_loop::PeerLoop>,
    (media_engine, registry, se, opus): (MediaEngine, Registry, SettingEngineBuilder, RTCRtpCodec),
    offer: &signaling::sdp::ValidOffer,
    events: mpsc::Sender<PeerEvent>,
) -> Result<(Peer, String), PeerError> {
    let setup = |e: rtc::shared::error::Error| PeerError::Setup(e.to_string());
    let refused = |e: rtc::shared::error::Error| PeerError::Offer(e.to_string());
    let now = Instant::now();
    let mut pc = rtc::peer_connection::RTCPeerConnectionBuilder::new()
        .with_configuration(RTCConfigurationBuilder::new().build())
        .with_media_engine(media_engine)
        .with_setting_engine(se.build())
        .with_interceptor_registry(registry)
        .build(now)
        .map_err(setup)?;
    pc.set_remote_description(now, RTCSessionDescription::offer(offer.sdp().to_owned()).map_err(refused)?)
        .map_err(refused)?;
    let ssrc: u32 = rand::random();
    let sender = pc.add_track(voice_track(ssrc, opus)).map_err(refused)?;
    let host = crate::peer_loop::host_candidate(peer_loop.candidate_addr()).map_err(PeerError::Setup)?;
    pc.add_local_candidate(host).map_err(setup)?;
    let answer = pc.create_answer(None).map_err(refused)?;
    pc.set_local_description(now, answer).map_err(refused)?;
    let local = pc.local_description().ok_or_else(|| PeerError::Setup("no local description".into()))?.sdp.clone();
    signaling::answer::check_answer(offer, &local)?;
    let ufrag = ice_ufrag(&local).ok_or_else(|| PeerError::Setup("own answer has no ICE ufrag".into()))?;
    let payload_type = opus_payload_type(&local).unwrap_or(111);
    let counters = Arc::new(PeerCounters::default());
    let lp = peer_loop
        .adopt(pc, ufrag, sender, events, Arc::clone(&counters))
        .await
        .map_err(|()| PeerError::Setup("the peer loop has stopped".into()))?;
    let driver = Driver::Loop(Arc::new(lp));
    Ok((Peer { driver, ssrc, payload_type, seq: rand::random(), counters }, local))
}

/// [`Peer::restart_ice`] on the peer loop: the same steps on the core, run inside the loop; the
/// loop's host candidate is added to the new generation.
async fn restart_in_loop(lp: &crate::peer_loop::LoopPeer, restart: IceRestart) -> Result<String, PeerError> {
    lp.run(move |pc, now| {
        let offer_err = |e: rtc::shared::error::Error| PeerError::Offer(e.to_string());
        let host = pc.local_description().and_then(|d| {
            d.sdp
                .lines()
                .find_map(|l| l.trim().strip_prefix("a=").filter(|l| l.starts_with("candidate:")).map(str::to_owned))
        });
        let current = pc.remote_description().ok_or_else(|| PeerError::Offer("no remote offer".into()))?.sdp.clone();
        let offer = restarted_offer(&current, &restart.ufrag, &restart.pwd);
        pc.set_remote_description(now, RTCSessionDescription::offer(offer).map_err(offer_err)?).map_err(offer_err)?;
        let answer = pc.create_answer(None).map_err(offer_err)?;
        pc.set_local_description(now, answer).map_err(|e| PeerError::Setup(e.to_string()))?;
        if let Some(candidate) = host {
            let init = RTCIceCandidateInit { candidate, ..Default::default() };
            if let Err(e) = pc.add_local_candidate(init) {
                tracing::debug!(error = %e, "host candidate not re-added after the restart");
            }
        }
        for c in restart.candidates.into_iter().filter(|c| !is_tcp_candidate(&c.candidate)) {
            if let Err(e) = pc.add_remote_candidate(c) {
                tracing::debug!(error = %e, "restart candidate rejected");
            }
        }
        let local = pc.local_description().ok_or_else(|| PeerError::Setup("no local description".into()))?;
        answer_sdpfrag(&local.sdp)
    })
    .await
    .map_err(|e| PeerError::Setup(e.to_string()))?
}

/// The character's voice: one Opus track with its SSRC.
fn voice_track(ssrc: u32, opus: RTCRtpCodec) -> MediaStreamTrack {
    MediaStreamTrack::new(
        "kotodama".to_owned(),
        "agent-voice".to_owned(),
        "agent-voice".to_owned(),
        RtpCodecKind::Audio,
        vec![RTCRtpEncodingParameters {
            rtp_coding_parameters: RTCRtpCodingParameters { ssrc: Some(ssrc), ..Default::default() },
            codec: opus,
            ..Default::default()
        }],
    )
}

/// The DTLS role that complements the offer's `a=setup` (RFC 8842 §5.2): webrtc-rs answers
/// `active` whatever the offer says unless told otherwise.
fn answering_dtls_role(offer: signaling::sdp::SetupRole) -> RTCDtlsRole {
    match offer {
        signaling::sdp::SetupRole::Active => RTCDtlsRole::Server,
        signaling::sdp::SetupRole::Passive | signaling::sdp::SetupRole::ActPass => RTCDtlsRole::Client,
    }
}

/// A bind failure because the address is taken (the stack reports it as text).
fn is_addr_in_use(e: &webrtc::error::Error) -> bool {
    let text = e.to_string().to_ascii_lowercase();
    text.contains("address already in use") || text.contains("addrinuse") || text.contains("os error 98")
}

/// [`Peer::add_candidate`] on a bare connection.
async fn add_remote_candidate(pc: &dyn PeerConnection, candidate: RTCIceCandidateInit) -> Result<(), PeerError> {
    if is_tcp_candidate(&candidate.candidate) {
        tracing::debug!("ignoring a trickled TCP candidate (the server does not dial)");
        return Ok(());
    }
    pc.add_ice_candidate(candidate).await.map_err(|e| PeerError::Offer(e.to_string()))
}

/// Whether `candidate:<foundation> <component> <transport> ...` is a TCP candidate (RFC 6544).
fn is_tcp_candidate(candidate: &str) -> bool {
    let body = candidate.trim().trim_start_matches("a=").trim_start_matches("candidate:");
    body.split_whitespace().nth(2).is_some_and(|t| t.eq_ignore_ascii_case("tcp"))
}

/// The first `a=ice-ufrag` of an SDP.
pub(crate) fn ice_ufrag(sdp: &str) -> Option<String> {
    sdp.lines().find_map(|l| l.trim().strip_prefix("a=ice-ufrag:").map(|s| s.trim().to_owned()))
}

/// `offer` with the client's new ICE credentials in place of the old ones, its candidates of the
/// previous generation removed and its `o=` version bumped (RFC 8866 §5.2: a changed session).
fn restarted_offer(offer: &str, ufrag: &str, pwd: &str) -> String {
    let mut out = String::with_capacity(offer.len());
    for line in offer.lines() {
        let line = line.trim_end();
        if line.starts_with("a=candidate:") || line == "a=end-of-candidates" {
            continue;
        }
        if line.starts_with("a=ice-ufrag:") {
            out.push_str("a=ice-ufrag:");
            out.push_str(ufrag);
        } else if line.starts_with("a=ice-pwd:") {
            out.push_str("a=ice-pwd:");
            out.push_str(pwd);
        } else if let Some(origin) = line.strip_prefix("o=") {
            out.push_str("o=");
            out.push_str(&bump_origin_version(origin));
        } else {
            out.push_str(line);
        }
        out.push_str("\r\n");
    }
    out
}

/// `<user> <sess-id> <sess-version> ...` with `sess-version` + 1.
fn bump_origin_version(origin: &str) -> String {
    let mut fields: Vec<String> = origin.split(' ').map(str::to_owned).collect();
    if let Some(v) = fields.get_mut(2).and_then(|v| v.parse::<u64>().ok().map(|n| (v, n))) {
        *v.0 = v.1.wrapping_add(1).to_string();
    }
    fields.join(" ")
}

/// The sdpfrag of an answer (RFC 8840 §9, as in RFC 9725 §4.3.2's example): the first m-line's
/// mid, the ICE credentials, each candidate once (BUNDLE repeats them) and `a=end-of-candidates`.
fn answer_sdpfrag(answer: &str) -> Result<String, PeerError> {
    let mut frag = signaling::sdp::parse_trickle_sdpfrag(answer.as_bytes())
        .map_err(|e| PeerError::Setup(format!("own answer unreadable: {e}")))?;
    let mid = answer.lines().find_map(|l| l.trim_end().strip_prefix("a=mid:")).map(str::to_owned);
    let mut seen = std::collections::HashSet::new();
    frag.candidates.retain(|c| seen.insert(c.candidate.clone()));
    frag.end_of_candidates = true;
    Ok(frag.to_sdpfrag(mid.as_deref()))
}

/// The `a=rtpmap:<pt> opus/48000` payload type of an SDP.
fn opus_payload_type(sdp: &str) -> Option<u8> {
    sdp.lines().find_map(|l| {
        let rest = l.trim().strip_prefix("a=rtpmap:")?;
        let (pt, codec) = rest.split_once(' ')?;
        codec.to_ascii_lowercase().starts_with("opus/48000").then(|| pt.parse().ok()).flatten()
    })
}

/// The peer's event handler: forwards, never computes, never blocks.
struct Forwarder {
    events: mpsc::Sender<PeerEvent>,
    gathered: std::sync::Mutex<Option<oneshot::Sender<()>>>,
    counters: Arc<PeerCounters>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Forwarder {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete
            && let Some(tx) = self.gathered.lock().unwrap_or_else(|p| p.into_inner()).take()
        {
            let _ = tx.send(());
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        // State changes are rare and must not be lost, but the driver must never wait on the
        // session task: hand the send to a task of its own.
        let events = self.events.clone();
        tokio::spawn(async move {
            let _ = events.send(PeerEvent::State(state)).await;
        });
    }

    async fn on_data_channel(&self, dc: Arc<dyn DataChannel>) {
        // Everything that talks to the driver happens in a task: awaiting it here would stall it.
        let events = self.events.clone();
        let counters = Arc::clone(&self.counters);
        tokio::spawn(async move {
            let label = dc.label().await.unwrap_or_default();
            if !is_session_channel(&label) {
                tracing::debug!(%label, "ignoring data channel with an unknown label");
                return;
            }
            while let Some(ev) = dc.poll().await {
                // Side effects in match guards would hide them; keep the sends in the arms.
                #[allow(clippy::collapsible_match)]
                match ev {
                    DataChannelEvent::OnOpen => {
                        if events.send(PeerEvent::ChannelOpen(EventChannel::Task(Arc::clone(&dc)))).await.is_err() {
                            break;
                        }
                    }
                    DataChannelEvent::OnMessage(msg) => {
                        if events.try_send(PeerEvent::Message(msg.data)).is_err() {
                            counters.messages_dropped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    DataChannelEvent::OnClose => {
                        let _ = events.send(PeerEvent::ChannelClosed).await;
                        break;
                    }
                    _ => {}
                }
            }
        });
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        let events = self.events.clone();
        let counters = Arc::clone(&self.counters);
        tokio::spawn(async move {
            if track.kind().await != RtpCodecKind::Audio {
                return;
            }
            while let Some(ev) = track.poll().await {
                match ev {
                    TrackRemoteEvent::OnRtpPacket(p) => {
                        let ev = PeerEvent::Rtp {
                            arrival: Instant::now(),
                            payload_type: p.header.payload_type,
                            ssrc: p.header.ssrc,
                            seq: p.header.sequence_number,
                            timestamp: p.header.timestamp,
                            payload: p.payload,
                        };
                        match events.try_send(ev) {
                            Ok(()) => {
                                counters.rtp_in.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(mpsc::error::TrySendError::Full(_)) => {
                                counters.rtp_dropped.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(mpsc::error::TrySendError::Closed(_)) => break,
                        }
                    }
                    TrackRemoteEvent::OnEnded => break,
                    _ => {}
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_range_hands_out_free_ports_round_robin_and_skips_taken_ones() {
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let base = probe.local_addr().unwrap().port();
        drop(probe);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let range = PortRange::new(base, base.saturating_add(2));
        let taken = std::net::UdpSocket::bind((ip, base + 1));
        let a = range.pick(ip).unwrap();
        let b = range.pick(ip).unwrap();
        assert!((base..=base + 2).contains(&a) && (base..=base + 2).contains(&b));
        if taken.is_ok() {
            assert_ne!(a, base + 1);
            assert_ne!(b, base + 1);
        }
        assert_ne!(a, b, "round robin");
    }

    #[test]
    fn a_restarted_offer_carries_the_new_credentials_and_no_old_candidates() {
        let offer = "v=0\r\no=- 42 7 IN IP4 0.0.0.0\r\ns=-\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n\
                     a=ice-ufrag:old\r\na=ice-pwd:oldpwd\r\na=candidate:1 1 udp 1 10.0.0.1 5000 typ host\r\n\
                     a=end-of-candidates\r\na=mid:0\r\n";
        let got = restarted_offer(offer, "newU", "newPwd");
        assert_eq!(
            got,
            "v=0\r\no=- 42 8 IN IP4 0.0.0.0\r\ns=-\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n\
             a=ice-ufrag:newU\r\na=ice-pwd:newPwd\r\na=mid:0\r\n"
        );
    }

    #[test]
    fn the_restart_answer_sdpfrag_has_mid_credentials_each_candidate_once_and_the_end() {
        let answer = "v=0\r\no=- 1 2 IN IP4 0.0.0.0\r\ns=-\r\na=group:BUNDLE 0 1\r\n\
                      m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=ice-ufrag:U\r\na=ice-pwd:P\r\na=mid:0\r\n\
                      a=candidate:1 1 udp 2130706431 127.0.0.1 40000 typ host\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n\
                      a=mid:1\r\na=candidate:1 1 udp 2130706431 127.0.0.1 40000 typ host\r\n";
        let frag = answer_sdpfrag(answer).unwrap();
        let parsed = signaling::sdp::parse_trickle_sdpfrag(frag.as_bytes()).unwrap();
        assert_eq!(parsed.ice_ufrag.as_deref(), Some("U"));
        assert_eq!(parsed.ice_pwd.as_deref(), Some("P"));
        assert_eq!(parsed.candidates.len(), 1, "{frag}");
        assert_eq!(parsed.candidates[0].mid.as_deref(), Some("0"));
        assert!(parsed.end_of_candidates);
    }

    #[test]
    fn trickled_tcp_candidates_are_recognised() {
        assert!(is_tcp_candidate("candidate:1 1 tcp 1518280447 127.0.0.1 6379 typ host tcptype passive"));
        assert!(is_tcp_candidate("a=candidate:1 1 TCP 1 10.0.0.1 9 typ host tcptype active"));
        assert!(!is_tcp_candidate("candidate:1 1 udp 2130706431 127.0.0.1 5000 typ host"));
        assert!(!is_tcp_candidate("garbage"));
    }

    #[test]
    fn finds_the_negotiated_opus_payload_type() {
        let sdp = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 109 0\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:109 opus/48000/2\r\n";
        assert_eq!(opus_payload_type(sdp), Some(109));
        assert_eq!(opus_payload_type("v=0\r\n"), None);
    }
}
