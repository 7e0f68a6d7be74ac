//! WHIP ingest and WHEP egress (RFC 9725) over HTTP against the in-process server: the surface
//! real WHIP clients depend on (exact statuses and headers, CRLF answers, ETag / If-Match / the
//! `ETag:` request header Eyevinn's client sends, 412/428, DELETE 200, problem+json for bad
//! input) and a conversation: a real webrtc-rs publisher (send-only, no data channel) speaks the
//! test question, a real webrtc-rs WHEP player (receive-only, with an `events` channel) hears the
//! scripted character answer.

mod common;

use std::time::{Duration, Instant};

use common::whip::*;
use common::*;
use serde_json::Value;

const CHARACTER: &str = "aiko";

fn problem_code(body: &str) -> String {
    serde_json::from_str::<Value>(body).map(|v| v["code"].as_str().unwrap_or_default().to_owned()).unwrap_or_default()
}

async fn patch(
    ts: &TestServer,
    path: &str,
    headers: &[(&str, &str)],
    content_type: &str,
    body: &str,
) -> (reqwest::StatusCode, reqwest::header::HeaderMap, String) {
    let mut req =
        ts.http.patch(format!("{}{path}", ts.base)).header("Content-Type", content_type).body(body.to_owned());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = req.send().await.unwrap();
    let (status, h) = (res.status(), res.headers().clone());
    (status, h, res.text().await.unwrap())
}

const FRAG: &str = "a=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\nm=audio 9 RTP/AVP 0\r\na=mid:0\r\n\
                    a=candidate:1 1 udp 2130706431 127.0.0.1 9 typ host\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whip_endpoint_speaks_rfc_9725_exactly() {
    let ts = TestServer::start().await;
    let endpoint = format!("{}/v1/characters/{CHARACTER}/whip", ts.base);

    // OPTIONS: CORS naming PATCH (Eyevinn trickles only then) and Authorization, Accept-Post.
    let res = ts.http.request(reqwest::Method::OPTIONS, &endpoint).send().await.unwrap();
    assert_eq!(res.status(), 204);
    let h = res.headers();
    assert_eq!(header(h, "accept-post"), "application/sdp");
    assert_eq!(header(h, "access-control-allow-origin"), "*");
    assert!(header(h, "access-control-allow-methods").split(", ").any(|m| m == "PATCH"), "{h:?}");
    assert!(header(h, "access-control-allow-headers").contains("Authorization"), "{h:?}");
    assert!(header(h, "access-control-expose-headers").contains("Location"), "{h:?}");

    // Bad input: each its own status and problem code.
    let ((_, _, _, _, _, _), offer) = publisher_offer().await;
    let res = ts.http.post(&endpoint).header("Content-Type", "text/plain").body(offer.clone()).send().await.unwrap();
    assert_eq!(res.status(), 415);
    assert_eq!(header(res.headers(), "content-type"), "application/problem+json");
    let (status, _, body) = post_sdp(&ts.http, &endpoint, None, "hello".into()).await;
    assert_eq!((status.as_u16(), problem_code(&body).as_str()), (400, "not_sdp"), "{body}");
    let recvonly = offer.replace("a=sendonly", "a=recvonly");
    let (status, _, body) = post_sdp(&ts.http, &endpoint, None, recvonly).await;
    assert_eq!((status.as_u16(), problem_code(&body).as_str()), (422, "whip_direction"), "{body}");
    let (status, _, body) =
        post_sdp(&ts.http, &format!("{}/v1/characters/nobody/whip", ts.base), None, offer.clone()).await;
    assert_eq!(status, 404, "{body}");
    let big = format!("{offer}{}", "a=x-pad:0123456789abcdef\r\n".repeat(4000));
    let (status, _, _) = post_sdp(&ts.http, &endpoint, None, big).await;
    assert_eq!(status, 413);

    // The publish: exactly 201, application/sdp, CRLF answer, Location = the session, ETag.
    let (status, h, answer) = post_sdp(&ts.http, &endpoint, None, offer).await;
    assert_eq!(status, 201, "{answer}");
    assert_eq!(header(&h, "content-type"), "application/sdp");
    assert!(answer.starts_with("v=0\r\n"), "{answer:?}");
    assert!(answer.split_inclusive('\n').all(|l| l.ends_with("\r\n")), "CRLF line ends: {answer:?}");
    assert!(answer.contains("a=recvonly"), "the server receives: {answer}");
    assert!(!answer.contains("m=application"), "no data channel: {answer}");
    let location = header(&h, "location");
    let id = location.strip_prefix("/v1/sessions/").expect("Location is the session's URL");
    assert!(id.starts_with("sess_"), "{location}");
    let etag = header(&h, "etag");
    assert!(etag.len() > 2 && etag.starts_with('"') && etag.ends_with('"'), "strong ETag: {etag}");

    // PATCH trickle: 428 without a tag, 412 on a stale one, 204 with If-Match or Eyevinn's `ETag:`.
    let sdpfrag = "application/trickle-ice-sdpfrag";
    let (status, h, body) = patch(&ts, &location, &[], sdpfrag, FRAG).await;
    assert_eq!((status.as_u16(), problem_code(&body).as_str()), (428, "if_match_required"), "{body}");
    assert_eq!(header(&h, "access-control-allow-origin"), "*", "errors carry CORS too");
    let (status, _, _) = patch(&ts, &location, &[("If-Match", "\"stale\"")], sdpfrag, FRAG).await;
    assert_eq!(status, 412);
    let (status, _, _) = patch(&ts, &location, &[("If-Match", &etag)], "text/plain", FRAG).await;
    assert_eq!(status, 415);
    let (status, _, body) = patch(&ts, &location, &[("If-Match", &etag)], sdpfrag, FRAG).await;
    assert_eq!(status, 204, "{body}");
    let (status, _, body) = patch(&ts, &location, &[("ETag", &etag)], sdpfrag, FRAG).await;
    assert_eq!(status, 204, "Eyevinn's ETag request header: {body}");
    let (status, _, body) = patch(&ts, &location, &[("If-Match", &etag)], sdpfrag, "garbage line").await;
    assert_eq!(status, 400, "{body}");

    // OPTIONS on the resource, then the WHEP endpoint: a send-only offer is the wrong direction.
    let res = ts.http.request(reqwest::Method::OPTIONS, format!("{}{location}", ts.base)).send().await.unwrap();
    assert_eq!(res.status(), 204);
    assert!(header(res.headers(), "access-control-allow-methods").contains("DELETE"));
    let ((_, _, _, _, _, _), wrong) = publisher_offer().await;
    let (status, _, body) = post_sdp(&ts.http, &format!("{}{location}/whep", ts.base), None, wrong).await;
    assert_eq!((status.as_u16(), problem_code(&body).as_str()), (422, "whip_direction"), "{body}");

    // DELETE: 200 and the session has ended; again: 404.
    let res = ts.http.delete(format!("{}{location}", ts.base)).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["state"], "ended");
    assert_eq!(ts.server.manager().get(id).unwrap().phase(), kotodama::session::SessionState::Ended);
    let res = ts.http.delete(format!("{}{location}", ts.base)).send().await.unwrap();
    assert_eq!(res.status(), 404);
    let (status, _, _) = patch(&ts, &location, &[("If-Match", &etag)], sdpfrag, FRAG).await;
    assert_eq!(status, 404);
    let (_, _, _, _, _, player) = player_offer(false).await;
    let (status, _, body) = post_sdp(&ts.http, &format!("{}{location}/whep", ts.base), None, player).await;
    assert_eq!(status, 404, "WHEP on an ended session: {body}");

    // A session that is not a WHIP session keeps API v1's rules (its DELETE needs its token).
    let (other, _, _) = ts.create_session().await;
    let res = ts.http.delete(format!("{}/v1/sessions/{other}", ts.base)).send().await.unwrap();
    assert_eq!(res.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_api_keys_the_publisher_s_bearer_guards_the_resource_and_the_player() {
    const KEY: &str = "whip-test-key-0123456789";
    let ts = TestServer::start_with(|c| c.api_keys = vec![KEY.into()]).await;
    let endpoint = format!("{}/v1/characters/{CHARACTER}/whip", ts.base);
    let ((_, _, _, _, _, _), offer) = publisher_offer().await;
    let (status, _, body) = post_sdp(&ts.http, &endpoint, None, offer.clone()).await;
    assert_eq!((status.as_u16(), problem_code(&body).as_str()), (401, "api_key_missing"), "{body}");
    let (status, _, body) = post_sdp(&ts.http, &endpoint, Some("wrong-key-0123456789abc"), offer.clone()).await;
    assert_eq!(status, 401, "{body}");
    let (status, h, body) = post_sdp(&ts.http, &endpoint, Some(KEY), offer).await;
    assert_eq!(status, 201, "{body}");
    let (location, etag) = (header(&h, "location"), header(&h, "etag"));
    let sdpfrag = "application/trickle-ice-sdpfrag";
    let (status, _, _) = patch(&ts, &location, &[("ETag", &etag)], sdpfrag, FRAG).await;
    assert_eq!(status, 401, "no Bearer");
    let bearer = format!("Bearer {KEY}");
    let (status, _, _) = patch(&ts, &location, &[("ETag", &etag), ("Authorization", &bearer)], sdpfrag, FRAG).await;
    assert_eq!(status, 204);
    let (_, _, _, _, _, player) = player_offer(false).await;
    let (status, _, _) = post_sdp(&ts.http, &format!("{}{location}/whep", ts.base), None, player.clone()).await;
    assert_eq!(status, 401, "a player needs the credentials too");
    let (status, h, body) = post_sdp(&ts.http, &format!("{}{location}/whep", ts.base), Some(KEY), player).await;
    assert_eq!(status, 201, "{body}");
    let player_location = header(&h, "location");
    assert!(player_location.starts_with(&format!("{location}/whep/")), "{player_location}");
    let res = ts.http.delete(format!("{}{player_location}", ts.base)).bearer_auth(KEY).send().await.unwrap();
    assert_eq!(res.status(), 200, "the player leaves");
    let res = ts.http.delete(format!("{}{location}", ts.base)).send().await.unwrap();
    assert_eq!(res.status(), 401);
    let res = ts.http.delete(format!("{}{location}", ts.base)).bearer_auth(KEY).send().await.unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whep_player_hears_the_character_answer_a_whip_publisher() {
    let ts = TestServer::start().await;
    let mut publisher = publish(&ts.base, &ts.http, CHARACTER, None).await;
    let player = play_on(&ClientNet::default(), &ts.base, &ts.http, &publisher.location, None, true).await;
    assert!(player.answer.contains("a=sendonly"), "the server sends to the player: {}", player.answer);
    let (status, _, body) =
        patch(&ts, &player.location, &[("If-Match", "\"stale\"")], "application/trickle-ice-sdpfrag", FRAG).await;
    assert_eq!(status, 412, "{body}");

    // The player joins with its channel already open or opening: it gets session.ready either way.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !player.events().iter().any(|e| e["type"] == "session.ready") {
        assert!(Instant::now() < deadline, "session.ready reached the player: {:?}", player.events());
        publisher.silence(Duration::from_millis(100)).await;
    }
    let (_, question) = wav("user_question.wav");
    publisher.speak(&question).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let done = |evs: &[Value]| {
        evs.iter().any(|e| e["type"] == "transcript" && e["role"] == "agent" && e["final"] == true)
            && back_to_listening(1)(evs)
    };
    while !done(&player.events()) {
        assert!(Instant::now() < deadline, "the reply reached the player: {:#?}", player.events());
        publisher.silence(Duration::from_millis(100)).await;
    }
    let evs = player.events();
    assert!(evs.iter().any(|e| e["type"] == "user.speech_started"), "the publisher's speech was heard: {evs:?}");
    assert!(ts.recorder.turns().len() == 1, "one user turn reached the provider");

    // What the player heard: the reply's voice, seconds of it, well above silence.
    let heard = player.heard();
    let (reply_rate, reply) = wav("agent_reply.wav");
    let span = speech_span(&heard, 48_000, 500.0).expect("the player heard speech");
    let reply_span = speech_span(&reply, reply_rate, 500.0).unwrap();
    let expected = reply_span.1 - reply_span.0;
    let got = span.1 - span.0;
    eprintln!(
        "measured: WHEP player heard {:.2} s of voice (reply {:.2} s), peak RMS {:.0}",
        got.as_secs_f64(),
        expected.as_secs_f64(),
        peak_rms(&heard, 48_000)
    );
    assert!(got.as_secs_f64() > expected.as_secs_f64() * 0.5, "heard {got:?} of a {expected:?} reply");
    assert!(peak_rms(&heard, 48_000) > 1000.0);

    // The publisher leaves: the session ends, the player's channel is told.
    let res = ts.http.delete(format!("{}{}", ts.base, publisher.location)).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !player.events().iter().any(|e| e["type"] == "session.ended") {
        assert!(Instant::now() < deadline, "session.ended reached the player");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    publisher.close().await;
    let _ = player.pc.close().await;
}

const EVENTS_KEY: &str = "whip-events-key-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_reads_the_whip_sessions_events_as_server_sent_events() {
    let ts = TestServer::start_with(|c| c.api_keys = vec![EVENTS_KEY.into()]).await;
    let mut publisher = publish(&ts.base, &ts.http, CHARACTER, Some(EVENTS_KEY)).await;
    let url = format!("{}{}/events", ts.base, publisher.location);
    assert_eq!(ts.http.get(&url).send().await.unwrap().status(), 401, "the publisher's credentials are needed");
    let mut res = ts.http.get(&url).bearer_auth(EVENTS_KEY).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Value>::new()));
    let seen = std::sync::Arc::clone(&lines);
    tokio::spawn(async move {
        let mut buf = String::new();
        while let Ok(Some(chunk)) = res.chunk().await {
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find('\n') {
                let line: String = buf.drain(..=end).collect();
                if let Some(data) = line.trim_end().strip_prefix("data:") {
                    seen.lock().unwrap().push(serde_json::from_str(data.trim()).expect("one JSON event per data line"));
                }
            }
        }
    });
    let events = || lines.lock().unwrap().clone();
    let (_, question) = wav("user_question.wav");
    publisher.silence(Duration::from_millis(300)).await;
    publisher.speak(&question).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !events().iter().any(|e| e["type"] == "transcript" && e["role"] == "agent" && e["final"] == true) {
        assert!(Instant::now() < deadline, "the reply's events reached the stream: {:#?}", events());
        publisher.silence(Duration::from_millis(100)).await;
    }
    let evs = events();
    assert_eq!(evs[0]["type"], "session.ready", "a late watcher starts with session.ready: {evs:?}");
    assert!(evs.iter().any(|e| e["type"] == "user.speech_started"), "{evs:?}");
    let res =
        ts.http.delete(format!("{}{}", ts.base, publisher.location)).bearer_auth(EVENTS_KEY).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !events().iter().any(|e| e["type"] == "session.ended") {
        assert!(Instant::now() < deadline, "session.ended reached the stream");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    publisher.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whep_player_that_went_away_frees_its_slot() {
    let ts = TestServer::start_with(|c| c.session.peer_timeout_secs = 6).await;
    let publisher = publish(&ts.base, &ts.http, CHARACTER, None).await;
    let mut players = Vec::new();
    for _ in 0..kotodama::session::whip_link::MAX_PLAYERS {
        players.push(play_on(&ClientNet::default(), &ts.base, &ts.http, &publisher.location, None, false).await);
    }
    let whep = format!("{}{}/whep", ts.base, publisher.location);
    let (_p, _d, _t, _s, _i, offer) = player_offer(false).await;
    let (status, headers, body) = post_sdp(&ts.http, &whep, None, offer).await;
    assert_eq!(status, 503, "all slots taken: {body}");
    assert!(headers.get("retry-after").is_some());

    // One player's connection goes away without a DELETE: once the server sees it failed or
    // closed, a new player gets its slot.
    let gone = players.remove(0);
    gone.pc.close().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_p, _d, _t, _s, _i, offer) = player_offer(false).await;
        let (status, _, body) = post_sdp(&ts.http, &whep, None, offer).await;
        if status == 201 {
            break;
        }
        assert_eq!(status, 503, "{body}");
        assert!(Instant::now() < deadline, "the slot was freed");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for p in players {
        let _ = p.pc.close().await;
    }
    publisher.close().await;
}
