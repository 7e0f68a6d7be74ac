//! A new SSRC mid-utterance is still the user's microphone (issue 12, kind 2), proven with a
//! real peer: the client's webrtc-rs stack re-creates its sender identity after a number of
//! packets (an outbound interceptor at the wire end, so SRTP encrypts for the new SSRC), in the
//! middle of the spoken question. The provider must hear the whole utterance (its voiced span
//! as long as the one sent, one user turn), and the change is counted in
//! `kotodama_ssrc_changes_total`.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_ssrc_mid_utterance_is_heard_whole_and_counted() {
    let (rate, question) = wav("user_question.wav");
    assert_eq!(rate, SAMPLE_RATE);
    let (first, last) = speech_span(&question, SAMPLE_RATE, 300.0).expect("speech in the fixture");
    // 10 packets of silence first, then the switch 40 % into the spoken part.
    let lead = 10u64;
    let switch_at = first + (last - first) * 2 / 5;
    let after = lead + switch_at.as_millis() as u64 / 20;

    let ts = TestServer::start().await;
    let before = ts.metric("kotodama_ssrc_changes_total").await;
    let (_, token, offer_url) = ts.create_session().await;
    let net = ClientNet { interceptors: Some(ssrc_switch::after(after)), ..ClientNet::default() };
    let mut client = TestClient::connect_on(&net, &ts.base, &ts.http, &offer_url, &token).await;
    client.wait_event("session.ready", Duration::from_secs(10), |e| e["type"] == "session.ready").await;
    client.silence(Duration::from_millis(lead * 20)).await;
    client.speak(&question).await;
    let stopped = |evs: &[serde_json::Value]| evs.iter().any(|e| e["type"] == "user.speech_stopped");
    client.silence_until("user.speech_stopped", Duration::from_secs(10), stopped).await;
    client
        .silence_until("the reply", Duration::from_secs(15), |evs| {
            evs.iter().any(|e| e["type"] == "transcript" && e["role"] == "agent" && e["final"] == true)
        })
        .await;

    let evs = client.events();
    assert_eq!(evs.iter().filter(|e| e["type"] == "user.speech_started").count(), 1, "one utterance: {evs:#?}");
    let turns = ts.recorder.turns();
    assert_eq!(turns.len(), 1, "one user turn reached the provider");
    let heard = &turns[0];
    let heard_rate = *heard.rates_hz.last().expect("audio reached the provider");
    let (h_first, h_last) = speech_span(&heard.samples, heard_rate, 300.0).expect("speech heard");
    let (spoken, got) = (last - first, h_last - h_first);
    assert!(got + Duration::from_millis(100) >= spoken, "heard {got:?} of {spoken:?} of speech across the SSRC change");
    let changes = ts.metric("kotodama_ssrc_changes_total").await - before;
    assert!(changes >= 1.0, "the SSRC change is counted: {changes}");
    client.close().await;
}
