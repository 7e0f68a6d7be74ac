//! ICE helpers for the NAT tests: the client's side of an ICE restart over WHIP-style PATCH
//! (RFC 9725 §4.3.2), and the UDP sockets this process holds (from `/proc`).

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use std::sync::Arc;

use webrtc::peer_connection::{PeerConnection, RTCSessionDescription};

use super::{TestClient, wav};

/// What the server answered to the restart PATCH.
#[derive(Debug)]
pub struct Restarted {
    pub status: u16,
    pub content_type: String,
    pub etag: String,
    pub links: Vec<String>,
    pub sdpfrag: String,
}

/// `sdp` with its ICE credentials and candidates replaced by the sdpfrag's.
fn apply_frag(sdp: &str, frag: &str) -> String {
    let get = |p: &str| frag.lines().find_map(|l| l.trim_end().strip_prefix(p)).map(str::to_owned);
    let (ufrag, pwd) = (get("a=ice-ufrag:").expect("ufrag in sdpfrag"), get("a=ice-pwd:").expect("pwd in sdpfrag"));
    let candidates: Vec<&str> = frag.lines().map(str::trim_end).filter(|l| l.starts_with("a=candidate:")).collect();
    let mut out = String::new();
    for line in sdp.lines().map(str::trim_end) {
        if line.starts_with("a=candidate:") || line == "a=end-of-candidates" {
            continue;
        }
        if line.starts_with("a=ice-ufrag:") {
            out.push_str(&format!("a=ice-ufrag:{ufrag}\r\n"));
        } else if line.starts_with("a=ice-pwd:") {
            out.push_str(&format!("a=ice-pwd:{pwd}\r\n"));
        } else {
            out.push_str(line);
            out.push_str("\r\n");
        }
        if line.starts_with("a=mid:") {
            for c in &candidates {
                out.push_str(c);
                out.push_str("\r\n");
            }
        }
    }
    out
}

/// Restart ICE from the client: new local credentials (and, with `rebind_on_restart`, new
/// sockets), PATCH `If-Match: "*"` with them, and apply the server's sdpfrag as the new answer.
pub async fn restart_ice(client: &TestClient, base: &str, http: &reqwest::Client, token: &str) -> Restarted {
    restart_pc(&client.pc, &client.location, base, http, token).await
}

/// [`restart_ice`] on a bare peer connection whose peer URL is `location`.
pub async fn restart_pc(
    pc: &Arc<dyn PeerConnection>,
    location: &str,
    base: &str,
    http: &reqwest::Client,
    token: &str,
) -> Restarted {
    let old_ufrag = local_ufrag(pc).await;
    pc.restart_ice().await.expect("restart_ice");
    let offer = pc.create_offer(None).await.expect("restart offer");
    pc.set_local_description(offer).await.expect("set restart offer");
    let deadline = Instant::now() + Duration::from_secs(5);
    let local = loop {
        let sdp = pc.local_description().await.unwrap().sdp;
        let ufrag = sdp.lines().find_map(|l| l.trim_end().strip_prefix("a=ice-ufrag:")).unwrap_or("").to_owned();
        if ufrag != old_ufrag && sdp.contains("a=candidate:") {
            break sdp;
        }
        assert!(Instant::now() < deadline, "the client gathered no candidates for its restart:\n{sdp}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let first = |p: &str| local.lines().map(str::trim_end).find(|l| l.starts_with(p)).unwrap().to_owned();
    let mut frag = format!("{}\r\n{}\r\n", first("a=ice-ufrag:"), first("a=ice-pwd:"));
    frag.push_str("m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\n");
    let mut seen = HashSet::new();
    for l in local.lines().map(str::trim_end).filter(|l| l.starts_with("a=candidate:")) {
        if seen.insert(l.to_owned()) {
            frag.push_str(&format!("{l}\r\n"));
        }
    }
    let res = http
        .patch(format!("{base}{location}"))
        .bearer_auth(token)
        .header("Content-Type", "application/trickle-ice-sdpfrag")
        .header("If-Match", "*")
        .body(frag)
        .send()
        .await
        .unwrap();
    let header = |n: &str| res.headers().get(n).map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    let (status, content_type, etag) = (res.status().as_u16(), header("content-type"), header("etag"));
    let links = res.headers().get_all("link").iter().map(|v| v.to_str().unwrap().to_owned()).collect();
    let sdpfrag = res.text().await.unwrap();
    if status == 200 {
        let remote = pc.remote_description().await.unwrap().sdp;
        let answer = apply_frag(&remote, &sdpfrag);
        pc.set_remote_description(RTCSessionDescription::answer(answer).unwrap())
            .await
            .expect("the server's restart sdpfrag makes a valid answer");
    }
    Restarted { status, content_type, etag, links, sdpfrag }
}

async fn local_ufrag(pc: &Arc<dyn PeerConnection>) -> String {
    let sdp = pc.local_description().await.unwrap().sdp;
    sdp.lines().find_map(|l| l.trim_end().strip_prefix("a=ice-ufrag:")).unwrap_or("").to_owned()
}

/// The local addresses of every UDP socket this process holds (`/proc/self/net/udp{,6}` rows
/// whose inode is one of `/proc/self/fd`).
pub fn own_udp_sockets() -> Vec<SocketAddr> {
    let inodes: HashSet<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|t| t.to_str()?.strip_prefix("socket:[")?.strip_suffix(']').map(str::to_owned))
        .collect();
    let mut out = Vec::new();
    for (file, v6) in [("/proc/self/net/udp", false), ("/proc/self/net/udp6", true)] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        for row in text.lines().skip(1) {
            let cols: Vec<&str> = row.split_whitespace().collect();
            if cols.len() < 10 || !inodes.contains(cols[9]) {
                continue;
            }
            let (ip_hex, port_hex) = cols[1].split_once(':').unwrap();
            let port = u16::from_str_radix(port_hex, 16).unwrap();
            let ip = if v6 {
                let mut b = [0u8; 16];
                for (i, chunk) in b.chunks_mut(4).enumerate() {
                    let word = u32::from_str_radix(&ip_hex[i * 8..i * 8 + 8], 16).unwrap();
                    chunk.copy_from_slice(&word.to_le_bytes());
                }
                IpAddr::V6(Ipv6Addr::from(b))
            } else {
                IpAddr::V4(Ipv4Addr::from(u32::from_str_radix(ip_hex, 16).unwrap().to_le_bytes()))
            };
            out.push(SocketAddr::new(ip, port));
        }
    }
    out
}

/// Speak the test question and wait until the agent has answered in full (its final transcript
/// number `finals_before + 1`) and listens again.
pub async fn one_turn(client: &mut TestClient, finals_before: usize) {
    let (_, question) = wav("user_question.wav");
    client.silence(Duration::from_millis(200)).await;
    client.speak(&question).await;
    client
        .silence_until("the agent's final transcript", Duration::from_secs(30), |evs| {
            evs.iter().filter(|e| e["type"] == "transcript" && e["role"] == "agent" && e["final"] == true).count()
                > finals_before
        })
        .await;
    client
        .silence_until("back to listening", Duration::from_secs(15), |evs| {
            evs.iter().rfind(|e| e["type"] == "state").is_some_and(|e| e["state"] == "listening")
        })
        .await;
}
