//! WHIP publishers and WHEP players as real webrtc-rs peers (RFC 9725 shapes): a publisher
//! offers its microphone send-only with no data channel, a player offers receive-only audio and
//! (optionally) an `events` data channel.

use reqwest::header::HeaderMap;

use super::*;

/// POST an SDP offer to `url` (`Authorization: Bearer` when given): (status, headers, body).
pub async fn post_sdp(
    http: &reqwest::Client,
    url: &str,
    bearer: Option<&str>,
    sdp: String,
) -> (reqwest::StatusCode, HeaderMap, String) {
    let mut req = http.post(url).header("Content-Type", "application/sdp").body(sdp);
    if let Some(b) = bearer {
        req = req.bearer_auth(b);
    }
    let res = req.send().await.unwrap();
    let (status, headers) = (res.status(), res.headers().clone());
    (status, headers, res.text().await.unwrap())
}

/// A header's value as text ("" when absent).
pub fn header(h: &HeaderMap, name: &str) -> String {
    h.get(name).map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default()
}

/// A publisher's offer: the client's own (audio, no data channel) made send-only, as WHIP
/// publishers send it. Returns the parts and the offer to post.
pub async fn publisher_offer() -> (ClientParts, String) {
    let parts = client_offer(true, false).await;
    let offer = parts.5.replace("a=sendrecv", "a=sendonly");
    (parts, offer)
}

/// Publish to `POST {base}/v1/characters/{character}/whip`; asserts 201 and returns a client
/// whose microphone (`speak`, `silence`) feeds the new session. Its `location` is the session's
/// URL path and its `etag` the resource's ETag. It has no events of its own (they go to players).
pub async fn publish(base: &str, http: &reqwest::Client, character: &str, bearer: Option<&str>) -> TestClient {
    let ((pc, _, track, ssrc, inbox, _), offer) = publisher_offer().await;
    let (status, headers, answer) =
        post_sdp(http, &format!("{base}/v1/characters/{character}/whip"), bearer, offer).await;
    assert_eq!(status, 201, "WHIP offer answered: {answer}");
    // No data channel: the client's events go to players.
    TestClient::answered((pc, None, track, ssrc, inbox), answer, &headers).await
}

/// A WHEP player: what it heard (`inbox.agent_pcm`) and the events of its data channel.
pub struct Player {
    pub pc: Arc<dyn PeerConnection>,
    pub inbox: Arc<Mutex<Inbox>>,
    pub location: String,
    pub etag: String,
    pub answer: String,
}

impl Player {
    /// Events received so far.
    pub fn events(&self) -> Vec<Value> {
        events_of(&self.inbox)
    }

    /// Decoded agent audio so far (48 kHz mono).
    pub fn heard(&self) -> Vec<i16> {
        self.inbox.lock().unwrap().agent_pcm.clone()
    }
}

/// A player's offer: receive-only audio and, with `with_dc`, the `events` data channel.
pub async fn player_offer(with_dc: bool) -> ClientParts {
    player_offer_on(&ClientNet::default(), with_dc).await
}

/// [`player_offer`] on the network `net` describes.
pub async fn player_offer_on(net: &ClientNet, with_dc: bool) -> ClientParts {
    let net = ClientNet { receive_only_audio: true, ..net.clone() };
    client_offer_on(&net, false, with_dc).await
}

/// Pull the voice of WHIP session `session_path` (`/v1/sessions/{id}`) with a WHEP offer, on
/// the network `net` describes; asserts 201.
pub async fn play_on(
    net: &ClientNet,
    base: &str,
    http: &reqwest::Client,
    session_path: &str,
    bearer: Option<&str>,
    with_dc: bool,
) -> Player {
    let (pc, dc, _, _, inbox, offer) = player_offer_on(net, with_dc).await;
    let (status, headers, answer) = post_sdp(http, &format!("{base}{session_path}/whep"), bearer, offer).await;
    assert_eq!(status, 201, "WHEP offer answered: {answer}");
    pc.set_remote_description(RTCSessionDescription::answer(answer.clone()).unwrap()).await.unwrap();
    if let Some(dc) = dc {
        read_events(dc, Arc::clone(&inbox));
    }
    Player { pc, inbox, location: header(&headers, "location"), etag: header(&headers, "etag"), answer }
}
