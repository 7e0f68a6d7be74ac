//! What one peer's WebRTC stack costs per 20 ms Opus frame when driven directly, without
//! webrtc-rs' per-peer driver task: the floor of `media.peer_driver = "loop"` (src/peer_loop.rs).
//!
//! Two `rtc` (sans-IO) peers are connected in memory on virtual time (ICE, DTLS, SCTP: the real
//! handshakes), set up as the server sets up its peers (Opus, RTCP reports). Then, per 20 ms, the
//! client sends one Opus packet and the server receives it (SRTP, RTCP, interceptors), forwards
//! its events and reads, sends one packet back (`talking`; none in `silent`) and handles its
//! deadlines. Only the server's calls are timed (the wall clock per tick).
//!
//! `cargo bench --bench peer_core` (both scenarios, 15,000 frames each). Results: BENCHMARKS.md,
//! "One loop for every peer".
use rtc::interceptor::Registry;
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::configuration::RTCConfigurationBuilder;
use rtc::peer_connection::configuration::interceptor_registry::configure_rtcp_reports;
use rtc::peer_connection::configuration::media_engine::MediaEngine;
use rtc::peer_connection::configuration::setting_engine::SettingEngineBuilder;
use rtc::peer_connection::event::{RTCDataChannelEvent, RTCPeerConnectionEvent, RTCTrackEvent};
use rtc::peer_connection::message::{RTCMessage, TaggedRTCMessage};
use rtc::peer_connection::state::RTCPeerConnectionState;
use rtc::peer_connection::transport::RTCDtlsRole;
use rtc::peer_connection::{RTCPeerConnection, RTCPeerConnectionBuilder};
use rtc::rtp_transceiver::RTCRtpSenderId;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use rtc::sansio::Protocol;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

fn opus() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: "audio/opus".into(),
        clock_rate: 48000,
        channels: 2,
        sdp_fmtp_line: "minptime=10;useinbandfec=1".into(),
        rtcp_feedback: vec![],
    }
}

fn peer(role: RTCDtlsRole, now: Instant) -> RTCPeerConnection {
    let mut me = MediaEngine::default();
    me.register_codec(RTCRtpCodecParameters { rtp_codec: opus(), payload_type: 111 }, RtpCodecKind::Audio).unwrap();
    let reg = configure_rtcp_reports(Registry::new())
        .with(kotodama::ssrc_demux::SLOT.into(), kotodama::ssrc_demux::SsrcDemux::default());
    RTCPeerConnectionBuilder::new()
        .with_configuration(RTCConfigurationBuilder::new().build())
        .with_media_engine(me)
        .with_setting_engine(SettingEngineBuilder::new().with_answering_dtls_role(role).build())
        .with_interceptor_registry(reg)
        .build(now)
        .unwrap()
}

fn track(pc: &mut RTCPeerConnection, ssrc: u32) -> RTCRtpSenderId {
    pc.add_track(MediaStreamTrack::new(
        "s".into(),
        format!("t{ssrc}"),
        "l".into(),
        RtpCodecKind::Audio,
        vec![RTCRtpEncodingParameters {
            rtp_coding_parameters: RTCRtpCodingParameters { ssrc: Some(ssrc), ..Default::default() },
            codec: opus(),
            ..Default::default()
        }],
    ))
    .unwrap()
}

fn host(pc: &mut RTCPeerConnection, a: SocketAddr) {
    pc.add_local_candidate(kotodama::peer_loop::host_candidate(a).unwrap()).unwrap();
}

fn pump(from: &mut RTCPeerConnection, to: &mut RTCPeerConnection, now: Instant, to_addr: SocketAddr) -> usize {
    let mut n = 0;
    while let Some(m) = from.poll_write() {
        n += 1;
        to.handle_read(TaggedBytesMut {
            now,
            transport: TransportContext {
                local_addr: to_addr,
                peer_addr: m.transport.local_addr,
                ecn: None,
                transport_protocol: TransportProtocol::UDP,
            },
            message: m.message,
        })
        .unwrap();
    }
    n
}

struct Drained {
    rtp: usize,
    connected: bool,
    dc: bool,
}
fn drain(pc: &mut RTCPeerConnection, d: &mut Drained) {
    while let Some(e) = pc.poll_event() {
        match e {
            RTCPeerConnectionEvent::OnConnectionStateChangeEvent(RTCPeerConnectionState::Connected) => {
                d.connected = true
            }
            RTCPeerConnectionEvent::OnDataChannel(RTCDataChannelEvent::OnOpen(_)) => d.dc = true,
            RTCPeerConnectionEvent::OnTrack(RTCTrackEvent::OnOpen(_)) => {}
            _ => {}
        }
    }
    while let Some(TaggedRTCMessage { message, .. }) = pc.poll_read() {
        if let RTCMessage::RtpPacket(_, p) = message {
            d.rtp += 1;
            std::hint::black_box(p);
        }
    }
}

fn main() {
    for silent in [false, true] {
        run(silent);
    }
}

fn run(silent: bool) {
    let t0 = Instant::now();
    let mut now = t0;
    let ca: SocketAddr = "10.0.0.1:5000".parse().unwrap();
    let sa: SocketAddr = "10.0.0.2:6000".parse().unwrap();
    let mut client = peer(RTCDtlsRole::Client, now);
    let csender = track(&mut client, 1111);
    client.create_data_channel("events", None).unwrap();
    host(&mut client, ca);
    let offer = client.create_offer(None).unwrap();
    client.set_local_description(now, offer.clone()).unwrap();
    let mut server = peer(RTCDtlsRole::Server, now);
    server.set_remote_description(now, offer).unwrap();
    let ssender = track(&mut server, 2222);
    host(&mut server, sa);
    let answer = server.create_answer(None).unwrap();
    server.set_local_description(now, answer.clone()).unwrap();
    client.set_remote_description(now, answer).unwrap();
    // remote candidates
    client
        .add_remote_candidate(rtc::peer_connection::transport::RTCIceCandidateInit {
            candidate: format!("candidate:1 1 udp 2130706431 {} {} typ host", sa.ip(), sa.port()),
            sdp_mid: Some("0".into()),
            sdp_mline_index: Some(0),
            ..Default::default()
        })
        .unwrap();
    let (mut cd, mut sd) =
        (Drained { rtp: 0, connected: false, dc: false }, Drained { rtp: 0, connected: false, dc: false });
    for _ in 0..20000 {
        pump(&mut client, &mut server, now, sa);
        pump(&mut server, &mut client, now, ca);
        drain(&mut client, &mut cd);
        drain(&mut server, &mut sd);
        if cd.connected && sd.connected && sd.dc {
            break;
        }
        now += Duration::from_millis(1);
        let _ = client.handle_timeout(now);
        let _ = server.handle_timeout(now);
    }
    eprintln!("connected c={} s={} dc={} after {:?} virtual", cd.connected, sd.connected, sd.dc, now - t0);
    assert!(cd.connected && sd.connected);
    let ticks = 15_000u32;
    let mut server_ns = 0u128;
    let mut seq = 0u16;
    let payload = vec![0x5au8; if silent { 34 } else { 80 }];
    let mut timeouts = 0;
    for i in 0..ticks {
        now += Duration::from_millis(20);
        // client sends one packet
        let pkt = rtc::rtp::Packet {
            header: rtc::rtp::Header {
                version: 2,
                payload_type: 111,
                sequence_number: seq,
                timestamp: i * 960,
                ssrc: 1111,
                ..Default::default()
            },
            payload: payload.clone().into(),
        };
        seq = seq.wrapping_add(1);
        client.rtp_sender(csender).unwrap().write_rtp(now, pkt.clone()).unwrap();
        let _ = client.handle_timeout(now);
        let mut dgrams = Vec::new();
        while let Some(m) = client.poll_write() {
            dgrams.push(m);
        }
        // ---- server work for this tick ----
        let t = Instant::now();
        for m in dgrams {
            server
                .handle_read(TaggedBytesMut {
                    now,
                    transport: TransportContext {
                        local_addr: sa,
                        peer_addr: ca,
                        ecn: None,
                        transport_protocol: TransportProtocol::UDP,
                    },
                    message: m.message,
                })
                .unwrap();
        }
        drain(&mut server, &mut sd);
        if !silent {
            let mut p = pkt;
            p.header.ssrc = 2222;
            server.rtp_sender(ssender).unwrap().write_rtp(now, p).unwrap();
        }
        if server.poll_timeout().is_some_and(|d| d <= now) {
            let _ = server.handle_timeout(now);
            timeouts += 1;
        }
        let mut out = Vec::new();
        while let Some(m) = server.poll_write() {
            out.push(m);
        }
        let _ = server.poll_timeout();
        server_ns += t.elapsed().as_nanos();
        // ---- end ----
        for m in out {
            client
                .handle_read(TaggedBytesMut {
                    now,
                    transport: TransportContext {
                        local_addr: ca,
                        peer_addr: sa,
                        ecn: None,
                        transport_protocol: TransportProtocol::UDP,
                    },
                    message: m.message,
                })
                .unwrap();
        }
        drain(&mut client, &mut cd);
    }
    let per_tick_us = server_ns as f64 / ticks as f64 / 1000.0;
    println!(
        "{} server rtp in {} client rtp in {} timeouts {}: server {:.2} us per 20 ms tick = {:.3} % of a core",
        if silent { "silent" } else { "talking" },
        sd.rtp,
        cd.rtp,
        timeouts,
        per_tick_us,
        per_tick_us / 20_000.0 * 100.0
    );
}
