//! The conversation core on virtual time: a recording fake provider session (what LiveKit's
//! `FakeRealtimeSession` does: it records every command the core sends and plays back the events a
//! test scripts), real libopus and libfvad on real speech, no sleeps and no sockets.

use std::time::Duration;

use media::{InterruptReason, OpusEncoder};
use signaling::events::{AgentState, ClientEvent, Role, ServerEvent};

use super::*;
use crate::providers::{Capabilities, HistoryItem, Pcm, ProviderCommand, ProviderEvent, Speaker};

const FRAME: Duration = Duration::from_millis(20);
const AGENT_RATE: u32 = 24_000;

/// The core with its outputs recorded: the provider's commands (the fake provider session), the
/// client's events, the stored turns, the frames sent.
struct Harness {
    conv: Conversation,
    now: Duration,
    /// Every command the provider session was sent, except audio (counted).
    sent: Vec<ProviderCommand>,
    audio_chunks: usize,
    events: Vec<ServerEvent>,
    states: Vec<AgentState>,
    turns: Vec<(Role, String, bool)>,
    flags: Vec<super::Flag>,
    frames: Vec<Duration>,
    ended: Option<EndReason>,
    /// The fake provider's queue is full: it refuses everything.
    refuse: bool,
    encoder: OpusEncoder,
    seq: u16,
    ts: u32,
}

fn caps() -> Capabilities {
    Capabilities::local_turns()
}

fn config(greeting: Option<&str>, idle: Option<Duration>) -> ConversationConfig {
    ConversationConfig {
        session_id: "sess_test".into(),
        character: "aiko".into(),
        provider: "fake".into(),
        caps: caps(),
        greeting: greeting.map(str::to_owned),
        idle_timeout: idle,
        moderator: None,
        budget: crate::session::budget::BudgetPlan::unlimited(),
        reply_timeout: None,
        start_timeout: None,
    }
}

/// The client's speech: the test recording, 48 kHz mono.
fn speech() -> Pcm {
    media::wav::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/user_question.wav")).expect("test speech")
}

/// `ms` of a 220 Hz tone at the agent's rate (the character's voice; its content does not matter).
fn agent_audio(ms: u64) -> Pcm {
    let n = (AGENT_RATE as u64 * ms / 1000) as usize;
    let samples =
        (0..n).map(|i| ((i as f64 * 220.0 * std::f64::consts::TAU / AGENT_RATE as f64).sin() * 8000.0) as i16);
    Pcm { rate_hz: AGENT_RATE, samples: samples.collect() }
}

impl Harness {
    fn new(cfg: ConversationConfig) -> Self {
        let media = MediaParts {
            uplink: media::Uplink::new(media::UplinkConfig { output_rate_hz: 24_000, ..Default::default() }).unwrap(),
            playout: media::Playout::new(media::PlayoutConfig::default()).unwrap(),
            barge_in: media::BargeIn::default(),
            speech: AgentSpeech::new(false),
        };
        Self {
            conv: Conversation::new(cfg, media),
            now: Duration::ZERO,
            sent: Vec::new(),
            audio_chunks: 0,
            events: Vec::new(),
            states: Vec::new(),
            turns: Vec::new(),
            flags: Vec::new(),
            frames: Vec::new(),
            ended: None,
            refuse: false,
            encoder: OpusEncoder::new(media::EncoderConfig::default()).unwrap(),
            seq: 0,
            ts: 0,
        }
    }

    /// Client connected and the provider ready: `session.ready`, listening.
    fn ready(cfg: ConversationConfig) -> Self {
        let mut h = Self::new(cfg);
        h.input(Input::ClientConnected);
        h.input(Input::Provider(ProviderEvent::Ready));
        h
    }

    fn input(&mut self, input: Input) {
        self.conv.handle_input(self.now, input);
        while let Some(out) = self.conv.poll_output() {
            match out {
                Output::Event(e) => self.events.push(e),
                Output::State(s) => {
                    self.states.push(s);
                    self.events.push(ServerEvent::State { state: s });
                }
                Output::Provider(ProviderCommand::AppendAudio(_)) => self.audio_chunks += 1,
                Output::Provider(cmd) if self.refuse => self.conv.handle_input(self.now, Input::Refused(cmd)),
                Output::Provider(cmd) => self.sent.push(cmd),
                Output::Turn { role, text, interrupted } => self.turns.push((role, text, interrupted)),
                Output::Flag(f) => self.flags.push(f),
                Output::Audio(f) => {
                    assert!(!f.payload.is_empty() && !f.item_id.is_empty(), "an encoded frame of an item");
                    self.frames.push(f.due);
                }
                Output::End(r) => self.ended = Some(r),
            }
        }
    }

    /// Let virtual time pass, firing every timeout the core asks for on the way.
    fn advance(&mut self, d: Duration) {
        let until = self.now + d;
        while let Some(t) = self.conv.poll_timeout().filter(|t| *t <= until) {
            self.now = self.now.max(t);
            self.input(Input::Timeout);
            if self.ended.is_some() {
                return;
            }
        }
        self.now = until;
    }

    /// The client speaks `pcm` (48 kHz), one 20 ms Opus packet every 20 ms of virtual time; the
    /// playout keeps its clock meanwhile when `pace` is set.
    fn speak(&mut self, pcm: &[i16], pace: bool) {
        let mut buf = [0u8; 1500];
        for chunk in pcm.chunks(960) {
            let mut frame = [0i16; 960];
            frame[..chunk.len()].copy_from_slice(chunk);
            let len = self.encoder.encode(&frame, &mut buf).unwrap();
            self.seq = self.seq.wrapping_add(1);
            let payload = bytes::Bytes::copy_from_slice(&buf[..len]);
            self.ts = self.ts.wrapping_add(960);
            self.input(Input::ClientOpus { seq: self.seq, timestamp: self.ts, payload_type: 111, ssrc: 1, payload });
            if pace {
                self.advance(FRAME);
            } else {
                self.now += FRAME;
            }
        }
    }

    /// The provider streams a reply: transcript, then audio in 100 ms chunks as playout has room.
    fn agent_reply(&mut self, item: &str, text: &str, ms: u64, finish: bool) {
        let transcript = ProviderEvent::Transcript {
            speaker: Speaker::Agent,
            item_id: item.into(),
            text: text.into(),
            is_final: true,
        };
        self.input(Input::Provider(transcript));
        let audio = agent_audio(ms);
        for chunk in audio.samples.chunks(AGENT_RATE as usize / 10) {
            while !self.conv.wants_provider_events() {
                self.advance(FRAME);
            }
            let pcm = Pcm { rate_hz: AGENT_RATE, samples: chunk.to_vec() };
            self.input(Input::Provider(ProviderEvent::AudioDelta { item_id: item.into(), pcm }));
        }
        if finish {
            self.input(Input::Provider(ProviderEvent::AudioDone { item_id: item.into() }));
            self.input(Input::Provider(ProviderEvent::ResponseDone { item_id: item.into() }));
        }
    }

    fn interrupted(&self) -> Vec<(String, u64)> {
        let it = self.events.iter();
        it.filter_map(|e| match e {
            ServerEvent::AgentInterrupted { item_id, played_ms } => Some((item_id.clone(), *played_ms)),
            _ => None,
        })
        .collect()
    }

    fn truncations(&self) -> Vec<(String, Duration, String)> {
        let it = self.sent.iter();
        it.filter_map(|c| match c {
            ProviderCommand::Truncate { item_id, audio_end, heard } => {
                Some((item_id.clone(), *audio_end, heard.clone()))
            }
            _ => None,
        })
        .collect()
    }

    /// The agent words the client was shown last for `item` (partial transcripts as spoken).
    fn last_agent_words(&self, item: &str) -> String {
        let mut it = self.events.iter().rev();
        it.find_map(|e| match e {
            ServerEvent::Transcript { role: Role::Agent, item_id, text, is_final: false } if item_id == item => {
                Some(text.clone())
            }
            _ => None,
        })
        .unwrap_or_default()
    }
}

const REPLY: &str = "Once upon a time there was a little fox who lived at the edge of a quiet forest and \
                     loved to listen to the rain on the leaves every single evening";

#[test]
fn session_ready_waits_for_the_client_and_the_model_then_listens() {
    let mut h = Harness::new(config(None, None));
    h.input(Input::Provider(ProviderEvent::Ready));
    assert!(h.events.is_empty(), "nothing goes out before the client's channel is open: {:?}", h.events);
    h.input(Input::ClientConnected);
    assert!(matches!(h.events[0], ServerEvent::SessionReady { .. }), "{:?}", h.events);
    assert_eq!(h.states, vec![AgentState::Listening]);
}

#[test]
fn barge_in_while_speaking_cuts_playout_and_truncates_to_exactly_the_heard_words() {
    let mut h = Harness::ready(config(None, None));
    h.agent_reply("item_1", REPLY, 8_000, false);
    h.advance(Duration::from_millis(2_000));
    let frames_before = h.frames.len();
    assert!(frames_before >= 90, "the agent has been speaking ~2 s: {frames_before} frames");
    let shown = h.last_agent_words("item_1");
    assert!(!shown.is_empty() && shown.len() < REPLY.len(), "part of the reply was shown as spoken: {shown:?}");

    // The user talks over it (speech at 0.5-0.85 s of the recording).
    let speech = speech();
    h.speak(&speech.samples[24_000..48_000], true);

    let cut = h.interrupted();
    assert_eq!(cut.len(), 1, "one interruption: {cut:?}");
    let (item, played_ms) = &cut[0];
    assert_eq!(item, "item_1");
    let truncations = h.truncations();
    assert_eq!(truncations.len(), 1, "{truncations:?}");
    let (t_item, audio_end, heard) = &truncations[0];
    assert_eq!((t_item.as_str(), audio_end.as_millis() as u64), ("item_1", *played_ms));
    assert_eq!(*heard, h.last_agent_words("item_1"), "truncate carries exactly the words shown as spoken");
    assert!(REPLY.starts_with(heard.as_str()) && heard.len() < REPLY.len(), "{heard:?}");
    assert!(h.sent.iter().any(|c| matches!(c, ProviderCommand::Cancel)), "the reply is cancelled");
    assert_eq!(h.turns, vec![(Role::Agent, heard.clone(), true)], "the agent turn is what was heard");
    assert!(matches!(h.conv.last_interruption(), Some(InterruptReason::UserSpeech { .. })), "recorded as user speech");

    // Late audio of the cut item is dropped; the agent listens, then the user's turn is committed.
    let frames_at_cut = h.frames.len();
    h.input(Input::Provider(ProviderEvent::AudioDelta { item_id: "item_1".into(), pcm: agent_audio(500) }));
    assert_eq!(h.conv.agent_state(), AgentState::Listening);
    h.speak(&[0i16; 48_000], true);
    assert_eq!(h.frames.len(), frames_at_cut, "no audio of the cut item after the cut");
    assert_eq!(h.conv.agent_state(), AgentState::Thinking, "the user's turn was committed after the cut");
    assert!(matches!(h.sent.last(), Some(ProviderCommand::CommitTurn)), "{:?}", h.sent.last());
}

#[test]
fn barge_in_while_only_queued_cuts_with_nothing_heard() {
    let mut h = Harness::ready(config(None, None));
    let speech = speech();
    // The user starts talking; before the onset is confirmed the model's reply arrives (queued,
    // not a frame played yet); the onset then cuts it.
    h.speak(&speech.samples[24_000..26_880], false);
    h.input(Input::Provider(ProviderEvent::AudioDelta { item_id: "item_q".into(), pcm: agent_audio(300) }));
    h.speak(&speech.samples[26_880..40_000], false);
    assert!(h.frames.is_empty(), "nothing was played");
    assert_eq!(h.interrupted(), vec![("item_q".to_owned(), 0)]);
    assert_eq!(h.truncations(), vec![("item_q".to_owned(), Duration::ZERO, String::new())]);
    assert!(h.turns.is_empty(), "an unheard reply is not a turn: {:?}", h.turns);
    h.advance(Duration::from_secs(1));
    assert!(h.frames.is_empty(), "the queued audio never plays");
}

#[test]
fn backchannel_shorter_than_the_minimum_speech_does_not_interrupt() {
    let mut h = Harness::ready(config(None, None));
    h.agent_reply("item_b", REPLY, 3_000, true);
    h.advance(Duration::from_millis(1_000));
    // "mm-hm": 60 ms of loud speech (1.70-1.76 s of the recording) in silence.
    let speech = speech();
    let mut burst = vec![0i16; 9_600];
    burst.extend_from_slice(&speech.samples[81_600..84_480]);
    burst.extend(std::iter::repeat_n(0i16, 9_600));
    h.speak(&burst, true);
    assert!(h.interrupted().is_empty(), "a backchannel does not interrupt");
    assert!(!h.events.iter().any(|e| matches!(e, ServerEvent::UserSpeechStarted { .. })), "nor is it speech");
    h.advance(Duration::from_secs(3));
    assert!(h.frames.len() >= 148, "the whole 3 s reply was played: {} frames", h.frames.len());
    assert_eq!(h.turns, vec![(Role::Agent, REPLY.to_owned(), false)]);
    assert_eq!(h.conv.agent_state(), AgentState::Listening);
}

#[test]
fn a_typed_message_is_recorded_once_not_again_as_its_echo() {
    let mut h = Harness::ready(config(None, None));
    h.input(Input::Client(Some(ClientEvent::Text { text: " what is your name? ".into() })));
    assert!(matches!(h.sent.as_slice(), [ProviderCommand::Text(t)] if t == " what is your name? "));
    assert_eq!(h.conv.agent_state(), AgentState::Thinking);
    let echo = |text: &str| ProviderEvent::Transcript {
        speaker: Speaker::User,
        item_id: "u1".into(),
        text: text.into(),
        is_final: true,
    };
    h.input(Input::Provider(echo("what is your name?")));
    h.input(Input::Provider(echo("and where do you live?")));
    let users: Vec<&str> = h.turns.iter().filter(|t| t.0 == Role::User).map(|t| t.1.as_str()).collect();
    assert_eq!(users, ["what is your name?", "and where do you live?"], "the echo is not recorded twice");
    assert_eq!(h.conv.history().len(), 2);
}

#[test]
fn a_refused_text_says_busy_and_never_shows_thinking() {
    let mut h = Harness::ready(config(None, None));
    h.refuse = true;
    h.states.clear();
    h.input(Input::UserText("hello".into()));
    assert!(h.states.is_empty(), "no thinking for a reply that will not come: {:?}", h.states);
    assert!(h.events.iter().any(|e| matches!(e, ServerEvent::Error { code, .. } if code == "busy")));
    assert_eq!(h.conv.agent_state(), AgentState::Listening);
}

#[test]
fn idle_timeout_ends_a_silent_session_but_not_while_the_agent_speaks() {
    let idle = Duration::from_secs(5);
    let mut h = Harness::ready(config(None, Some(idle)));
    h.advance(Duration::from_millis(4_990));
    assert_eq!(h.ended, None);
    h.input(Input::Client(Some(ClientEvent::Ping)));
    assert!(h.events.iter().any(|e| matches!(e, ServerEvent::Pong)));
    h.advance(Duration::from_millis(4_990));
    assert_eq!(h.ended, None, "a client message is activity");
    // The agent speaks for 8 s: longer than the timeout, still not idle.
    h.agent_reply("item_i", REPLY, 8_000, true);
    h.advance(Duration::from_secs(8));
    assert_eq!(h.ended, None, "agent audio is activity");
    h.advance(Duration::from_secs(6));
    assert_eq!(h.ended, Some(EndReason::IdleTimeout));
}

#[test]
fn greeting_is_asked_for_once_when_client_and_model_are_up() {
    let mut h = Harness::new(config(Some("Greet the user warmly."), None));
    h.input(Input::ClientConnected);
    assert!(h.sent.is_empty(), "no greeting before the model is ready");
    h.input(Input::Provider(ProviderEvent::Ready));
    assert!(matches!(
        h.sent.as_slice(),
        [ProviderCommand::GenerateReply { instructions: Some(i) }] if i == "Greet the user warmly."
    ));
    assert_eq!(h.states, vec![AgentState::Listening, AgentState::Thinking]);
    // A reconnected provider is ready again: no second greeting.
    h.input(Input::Provider(ProviderEvent::Ready));
    assert_eq!(h.sent.len(), 1);
}

#[test]
fn history_holds_only_what_was_heard_for_a_replacement_provider() {
    let mut h = Harness::ready(config(None, None));
    let q = ProviderEvent::Transcript {
        speaker: Speaker::User,
        item_id: "u".into(),
        text: "tell me a story".into(),
        is_final: true,
    };
    h.input(Input::Provider(q));
    h.agent_reply("item_h", REPLY, 8_000, false);
    h.advance(Duration::from_millis(1_500));
    h.input(Input::Client(Some(ClientEvent::Interrupt)));
    let heard = h.truncations()[0].2.clone();
    assert!(!heard.is_empty() && heard.len() < REPLY.len());
    assert_eq!(h.conv.history(), vec![HistoryItem::User("tell me a story".into()), HistoryItem::Agent(heard)]);
    assert_eq!(h.conv.last_interruption(), Some(InterruptReason::ClientRequest), "recorded as the client's request");
}

#[test]
fn a_client_end_of_turn_commits_once_before_our_vad_would() {
    use crate::session::link::ClientVoice;
    let mut h = Harness::ready(config(None, None));
    let pcm = speech();
    // Only the first 2 s of the question: the user is still mid-sentence for our VAD.
    h.speak(&pcm.samples[..96_000], false);
    let commits = |h: &Harness| h.sent.iter().filter(|c| matches!(c, ProviderCommand::CommitTurn)).count();
    assert_eq!(commits(&h), 0, "our VAD has not heard the end yet");
    h.input(Input::ClientVoice(ClientVoice::EndTurn));
    assert_eq!(commits(&h), 1, "push-to-talk released: committed now");
    assert_eq!(h.conv.agent_state(), AgentState::Thinking);
    // The rest, then silence: our VAD's own end of the same utterance commits nothing more.
    h.speak(&pcm.samples[96_000..], false);
    h.speak(&vec![0; 48_000], false);
    h.input(Input::ClientVoice(ClientVoice::SpeechStopped));
    assert_eq!(commits(&h), 1, "one turn, one commit: {:?}", h.sent);
}

#[test]
fn an_agent_result_is_told_to_the_client_and_put_in_context_or_spoken_now() {
    let mut h = Harness::ready(config(None, None));
    let result = |speak_now| AgentResult {
        text: "The train leaves at 9:40.".into(),
        source: "travel".into(),
        status: "completed".into(),
        speak_now,
    };
    h.input(Input::AgentResult(result(false)));
    assert!(h.events.iter().any(|e| matches!(e, ServerEvent::AgentNotification { source, .. } if source == "travel")));
    let context = |h: &Harness| {
        h.sent.iter().filter(|c| matches!(c, ProviderCommand::AppendHistory(items) if items.iter().any(|i| i.text().contains("9:40")))).count()
    };
    assert_eq!(context(&h), 1, "in the model's context: {:?}", h.sent);
    let note = HistoryItem::User("[result from travel (completed)] The train leaves at 9:40.".into());
    assert_eq!(h.conv.history(), vec![note], "in the session's history (replayed on reconnect), once");
    assert!(h.turns.is_empty(), "context, not a spoken turn of the transcript: {:?}", h.turns);
    assert!(!h.sent.iter().any(|c| matches!(c, ProviderCommand::GenerateReply { .. })), "not spoken by itself");
    assert_eq!(h.conv.agent_state(), AgentState::Listening);
    h.input(Input::AgentResult(result(true)));
    assert!(
        h.sent
            .iter()
            .any(|c| matches!(c, ProviderCommand::GenerateReply { instructions: Some(i) } if i.contains("9:40")))
    );
    assert_eq!(h.conv.agent_state(), AgentState::Thinking);
}

#[test]
fn a_flagged_sentence_is_cut_before_it_is_spoken_and_the_fallback_line_follows() {
    let settings = crate::config::ModerationSettings { deny: vec!["purple monkey".into()], ..Default::default() };
    let moderator = std::sync::Arc::new(crate::moderation::Moderator::new(&settings).unwrap());
    let fallback = moderator.fallback().to_owned();
    let mut cfg = config(None, None);
    cfg.moderator = Some(moderator);
    let mut h = Harness::ready(cfg);
    let first = "Once upon a time there was a little fox.";
    let partial = |text: String| ProviderEvent::Transcript {
        speaker: Speaker::Agent,
        item_id: "item_1".into(),
        text,
        is_final: false,
    };
    h.input(Input::Provider(partial(first.into())));
    for chunk in agent_audio(4_000).samples.chunks(AGENT_RATE as usize / 10) {
        while !h.conv.wants_provider_events() {
            h.advance(FRAME);
        }
        let pcm = Pcm { rate_hz: AGENT_RATE, samples: chunk.to_vec() };
        h.input(Input::Provider(ProviderEvent::AudioDelta { item_id: "item_1".into(), pcm }));
    }
    h.advance(Duration::from_millis(1_500));
    // The denied phrase streams in over two deltas; neither reaches the client.
    h.input(Input::Provider(partial(format!("{first} It said purple mon"))));
    assert!(h.interrupted().is_empty(), "an unfinished sentence is held back, not judged");
    h.input(Input::Provider(partial(format!("{first} It said purple monkey dishwasher. And"))));

    assert!(!format!("{:?}", h.events).to_lowercase().contains("purple"), "no event carries the denied text");
    let moderation: Vec<_> = h.events.iter().filter(|e| matches!(e, ServerEvent::Moderation { .. })).collect();
    assert_eq!(
        moderation,
        [&ServerEvent::Moderation { category: "deny".into(), item_id: "item_1".into(), source: "agent".into() }],
        "one moderation event naming the category"
    );
    assert_eq!(h.interrupted().len(), 1, "the audio was cut like a barge-in");
    assert_eq!(h.conv.last_interruption(), Some(InterruptReason::Moderation));
    let (_, _, heard) = h.truncations().pop().expect("the provider keeps only what was heard");
    assert!(first.starts_with(heard.as_str()) && !heard.is_empty(), "heard: {heard:?}");
    assert_eq!(h.turns, vec![(Role::Agent, heard.clone(), true)], "the cut turn holds what was heard");
    assert_eq!(h.flags.len(), 1, "{:?}", h.flags);
    assert_eq!((h.flags[0].category.as_str(), h.flags[0].text.as_str()), ("deny", "It said purple monkey dishwasher."));
    let asked = h
        .sent
        .iter()
        .any(|c| matches!(c, ProviderCommand::GenerateReply { instructions: Some(i) } if i.contains(&fallback)));
    assert!(asked, "the fallback line is asked for: {:?}", h.sent);

    // Late audio of the flagged item is dropped; the fallback reply is spoken and recorded whole.
    let frames_at_cut = h.frames.len();
    h.input(Input::Provider(ProviderEvent::AudioDelta { item_id: "item_1".into(), pcm: agent_audio(500) }));
    h.advance(Duration::from_millis(200));
    assert_eq!(h.frames.len(), frames_at_cut, "nothing of the flagged item after the cut");
    h.agent_reply("item_2", &fallback, 2_000, true);
    h.advance(Duration::from_millis(3_000));
    assert_eq!(h.turns.last(), Some(&(Role::Agent, fallback.clone(), false)), "{:?}", h.turns);
}

#[test]
fn user_text_the_policy_flags_never_reaches_the_model_and_the_fallback_follows() {
    let settings = crate::config::ModerationSettings {
        deny: vec!["purple monkey".into()],
        check_user_input: true,
        ..Default::default()
    };
    let moderator = std::sync::Arc::new(crate::moderation::Moderator::new(&settings).unwrap());
    let fallback = moderator.fallback().to_owned();
    let mut cfg = config(None, None);
    cfg.moderator = Some(moderator);
    let mut h = Harness::ready(cfg);
    h.input(Input::Client(Some(ClientEvent::Text { text: "Tell me about the Purple Monkey.".into() })));
    assert!(!h.sent.iter().any(|c| matches!(c, ProviderCommand::Text(_))), "not sent to the model: {:?}", h.sent);
    assert!(h.turns.is_empty(), "not recorded: {:?}", h.turns);
    let moderation: Vec<_> = h.events.iter().filter(|e| matches!(e, ServerEvent::Moderation { .. })).collect();
    assert_eq!(
        moderation,
        [&ServerEvent::Moderation { category: "deny".into(), item_id: String::new(), source: "user".into() }]
    );
    assert_eq!((h.flags.len(), h.flags[0].source), (1, crate::moderation::Source::User));
    let asked = h
        .sent
        .iter()
        .any(|c| matches!(c, ProviderCommand::GenerateReply { instructions: Some(i) } if i.contains(&fallback)));
    assert!(asked, "the fallback line is asked for: {:?}", h.sent);

    // A provider's transcript of the user's speech: dropped from the events, the reply cancelled.
    let user = |text: &str, is_final: bool| ProviderEvent::Transcript {
        speaker: Speaker::User,
        item_id: "user_2".into(),
        text: text.into(),
        is_final,
    };
    h.input(Input::Provider(user("Tell me about the", false)));
    h.input(Input::Provider(user("Tell me about the purple monkey", false)));
    h.input(Input::Provider(user("Tell me about the purple monkey now.", true)));
    assert!(!format!("{:?}", h.events).to_lowercase().contains("purple"), "no event carries it");
    assert_eq!(h.flags.len(), 2, "flagged once per item: {:?}", h.flags);
    assert!(h.sent.iter().any(|c| matches!(c, ProviderCommand::Cancel)), "the reply to it is cancelled");
    assert!(h.turns.is_empty(), "not recorded: {:?}", h.turns);
}

// --- budgets (`super::super::budget`) ---

fn budgeted(limits: crate::config::budget::BudgetLimits) -> ConversationConfig {
    ConversationConfig { budget: crate::session::budget::BudgetPlan::new(&limits, None), ..config(None, None) }
}

fn budget_events(h: &Harness) -> Vec<ServerEvent> {
    h.events.iter().filter(|e| matches!(e, ServerEvent::BudgetExceeded { .. })).cloned().collect()
}

#[test]
fn reaching_the_token_budget_cuts_the_reply_where_it_was_heard_and_ends_the_session() {
    let limits = crate::config::budget::BudgetLimits { tokens: Some(500), ..Default::default() };
    let mut h = Harness::ready(budgeted(limits));
    h.input(Input::Client(Some(ClientEvent::Text { text: "Tell me a story.".into() })));
    h.input(Input::Provider(ProviderEvent::Usage { tokens: 300 }));
    assert!(budget_events(&h).is_empty() && h.ended.is_none(), "300 of 500 tokens");
    // The reply streams (the transcript and its audio, as OpenAI sends them); `response.done`
    // reports its usage while the audio is still playing.
    h.agent_reply("item_1", REPLY, 6_000, false);
    h.advance(Duration::from_millis(1_000));
    let heard = h.last_agent_words("item_1");
    assert!(!heard.is_empty() && heard.len() < REPLY.len(), "part of the reply was heard: {heard:?}");
    h.input(Input::Provider(ProviderEvent::Usage { tokens: 240 }));

    assert_eq!(
        budget_events(&h),
        vec![ServerEvent::BudgetExceeded {
            kind: "tokens".into(),
            scope: "session".into(),
            limit: 500,
            used: 540,
            unit: "tokens".into(),
            action: "end".into(),
        }]
    );
    assert_eq!(h.ended, Some(EndReason::BudgetExceeded));
    assert_eq!(h.conv.last_interruption(), Some(InterruptReason::Budget));
    assert_eq!(h.interrupted().len(), 1, "the reply is cut");
    assert_eq!(
        h.turns,
        vec![(Role::User, "Tell me a story.".into(), false), (Role::Agent, heard, true)],
        "the transcript holds what was said and heard"
    );
    let usage = h.conv.usage();
    assert_eq!((usage.totals.tokens, usage.tokens_reported), (540, true));
    assert_eq!(usage.exceeded, Some(crate::session::budget::Kind::Tokens));
}

#[test]
fn reaching_the_minute_budget_ends_the_session_on_time_with_its_transcript() {
    let limits = crate::config::budget::BudgetLimits { minutes: Some(0.05), ..Default::default() };
    let mut h = Harness::ready(budgeted(limits));
    h.input(Input::Client(Some(ClientEvent::Text { text: "Hello there".into() })));
    h.agent_reply("item_1", "Hi! Nice to meet you.", 1_000, true);
    h.advance(Duration::from_secs(10));
    assert_eq!(h.ended, Some(EndReason::BudgetExceeded));
    assert_eq!(h.now, Duration::from_secs(3), "ends when 0.05 minutes are up, not later");
    assert_eq!(
        budget_events(&h),
        vec![ServerEvent::BudgetExceeded {
            kind: "minutes".into(),
            scope: "session".into(),
            limit: 3,
            used: 3,
            unit: "seconds".into(),
            action: "end".into(),
        }]
    );
    assert_eq!(
        h.turns,
        vec![(Role::User, "Hello there".into(), false), (Role::Agent, "Hi! Nice to meet you.".into(), false)]
    );
    assert_eq!(h.conv.usage().totals.duration_ms, 3_000);
}

#[test]
fn a_degraded_session_stays_but_the_model_gets_no_more_input() {
    use crate::config::budget::{BudgetLimits, OnLimit};
    // No usage reports: the estimate (4 bytes a token) counts; 40 bytes are 10 tokens.
    let limits = BudgetLimits { tokens: Some(10), on_limit: Some(OnLimit::Degrade), ..Default::default() };
    let mut h = Harness::ready(budgeted(limits));
    let text = "Tell me all about the foxes in the wood.";
    assert_eq!(text.len(), 40);
    h.input(Input::Client(Some(ClientEvent::Text { text: text.into() })));
    assert!(matches!(&budget_events(&h)[..], [ServerEvent::BudgetExceeded { action, .. }] if action == "degrade"));
    assert!(h.ended.is_none(), "degrade keeps the session");
    let sent = h.sent.len();
    h.input(Input::Client(Some(ClientEvent::Text { text: "And more?".into() })));
    assert!(
        h.events.iter().any(|e| matches!(e, ServerEvent::Error { code, .. } if code == "budget_exceeded")),
        "typed text is refused with an error"
    );
    let chunks = h.audio_chunks;
    h.speak(&speech().samples, true);
    assert_eq!(h.audio_chunks, chunks, "no user audio reaches the model");
    assert_eq!(h.sent.len(), sent, "no command reaches the model: {:?}", &h.sent[sent..]);
    assert_eq!(budget_events(&h).len(), 1, "told once");
}

#[test]
fn a_refused_tool_call_reaches_the_tool_budget() {
    let limits = crate::config::budget::BudgetLimits { tool_calls: Some(1), ..Default::default() };
    let cfg = budgeted(limits);
    let counter = std::sync::Arc::clone(&cfg.budget.tool_calls);
    let mut h = Harness::ready(cfg);
    assert!(counter.try_call(), "the first call is within the budget");
    h.advance(Duration::from_secs(2));
    assert!(h.ended.is_none());
    assert!(!counter.try_call(), "the second is refused where tools run");
    h.input(Input::Timeout);
    assert!(
        matches!(&budget_events(&h)[..], [ServerEvent::BudgetExceeded { kind, used: 1, limit: 1, .. }] if kind == "tool_calls")
    );
    assert_eq!(h.ended, Some(EndReason::BudgetExceeded));
}

// --- provider deadlines (issue 12, kind 7) ---

const REPLY_TIMEOUT: Duration = Duration::from_secs(8);
const START_TIMEOUT: Duration = Duration::from_secs(10);

fn with_deadlines() -> ConversationConfig {
    ConversationConfig { reply_timeout: Some(REPLY_TIMEOUT), start_timeout: Some(START_TIMEOUT), ..config(None, None) }
}

impl Harness {
    /// The `error` events' codes and messages, in order.
    fn errors(&self) -> Vec<(String, String)> {
        let it = self.events.iter();
        it.filter_map(|e| match e {
            ServerEvent::Error { code, message } => Some((code.clone(), message.clone())),
            _ => None,
        })
        .collect()
    }

    fn restarts(&self) -> usize {
        self.sent.iter().filter(|c| matches!(c, ProviderCommand::Restart)).count()
    }

    /// The user asks the question aloud, then is silent until our VAD commits the turn (returns
    /// with `now` at the commit).
    fn ask_aloud(&mut self) {
        let pcm = speech();
        self.speak(&pcm.samples, true);
        for _ in 0..100 {
            if self.conv.agent_state() == AgentState::Thinking {
                return;
            }
            self.speak(&[0i16; 960], true);
        }
        panic!("the spoken turn was never committed: {:?}", self.states);
    }
}

#[test]
fn a_spoken_turn_a_silent_provider_never_answers_times_out_restarts_it_then_ends_the_session() {
    let mut h = Harness::ready(with_deadlines());
    h.ask_aloud();
    h.advance(REPLY_TIMEOUT - Duration::from_millis(100));
    assert!(h.errors().is_empty() && h.restarts() == 0, "not before the deadline: {:?}", h.errors());
    h.advance(Duration::from_millis(200));
    let errors = h.errors();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].0, "reply_timeout");
    assert!(errors[0].1.contains("did not answer within 8 s; reconnecting"), "{errors:?}");
    assert_eq!(h.restarts(), 1, "the silent provider session is replaced");
    let last_two: Vec<_> = h.sent.iter().rev().take(2).collect();
    assert!(matches!(last_two[..], [ProviderCommand::Restart, ProviderCommand::Cancel]), "{last_two:?}");
    assert_eq!(h.conv.agent_state(), AgentState::Listening, "the agent listens again");
    assert!(h.ended.is_none());

    // The replacement is silent too: the next turn's deadline ends the session.
    h.ask_aloud();
    h.advance(REPLY_TIMEOUT + Duration::from_millis(100));
    assert_eq!(h.ended, Some(EndReason::ProviderError), "{:?}", h.errors());
    let (code, message) = h.errors().pop().unwrap();
    assert_eq!(code, "reply_timeout");
    assert!(message.contains("ending the session"), "{message}");
    assert_eq!(h.restarts(), 1, "no third session");
}

#[test]
fn a_typed_turn_the_provider_never_answers_times_out_the_same_way() {
    let mut h = Harness::ready(with_deadlines());
    h.input(Input::Client(Some(ClientEvent::Text { text: "Are you there?".into() })));
    assert_eq!(h.conv.agent_state(), AgentState::Thinking);
    h.advance(REPLY_TIMEOUT);
    assert_eq!(h.errors().iter().map(|e| e.0.as_str()).collect::<Vec<_>>(), ["reply_timeout"]);
    assert_eq!((h.restarts(), h.conv.agent_state()), (1, AgentState::Listening));
    // A provider that answers after all (the replacement) resets the count: no end.
    h.input(Input::Client(Some(ClientEvent::Text { text: "Hello?".into() })));
    h.agent_reply("item_2", "Yes, I am here.", 600, true);
    h.advance(Duration::from_secs(2));
    assert_eq!(h.conv.agent_state(), AgentState::Listening);
    h.input(Input::Client(Some(ClientEvent::Text { text: "And now?".into() })));
    h.advance(REPLY_TIMEOUT);
    assert!(h.ended.is_none(), "one silent miss after an answer only restarts: {:?}", h.errors());
    assert_eq!(h.restarts(), 2);
}

#[test]
fn a_reply_that_stops_mid_stream_is_given_up_keeping_what_was_heard_and_the_session_is_replaced() {
    let mut h = Harness::ready(with_deadlines());
    h.input(Input::Client(Some(ClientEvent::Text { text: "Tell me a story".into() })));
    // 1 s of audio, then nothing: no more audio, no `response.done`.
    h.agent_reply("item_1", REPLY, 1_000, false);
    h.advance(Duration::from_secs(2));
    assert_eq!(h.conv.agent_state(), AgentState::Speaking, "stuck: the reply never ended");
    h.advance(REPLY_TIMEOUT);
    let errors = h.errors();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].0, "reply_timeout");
    assert!(errors[0].1.contains("reconnecting"), "silent since its last audio: {errors:?}");
    assert_eq!(h.restarts(), 1);
    assert!(h.sent.iter().any(|c| matches!(c, ProviderCommand::Cancel)), "the stalled reply is cancelled");
    assert_eq!(h.conv.agent_state(), AgentState::Listening);
    let agent_turns: Vec<_> = h.turns.iter().filter(|t| t.0 == Role::Agent).collect();
    assert_eq!(agent_turns.len(), 1, "the agent's turn is recorded once: {:?}", h.turns);
    assert!(REPLY.starts_with(agent_turns[0].1.as_str()), "{agent_turns:?}");
    // Its late audio is dropped.
    let frames = h.frames.len();
    h.input(Input::Provider(ProviderEvent::AudioDelta { item_id: "item_1".into(), pcm: agent_audio(500) }));
    h.advance(Duration::from_secs(1));
    assert_eq!(h.frames.len(), frames, "no audio of the given-up item");
}

#[test]
fn a_long_reply_that_keeps_streaming_is_never_cut_by_the_deadline() {
    let mut h = Harness::ready(with_deadlines());
    h.input(Input::Client(Some(ClientEvent::Text { text: "Tell me a story".into() })));
    // 3x the deadline of audio, paced by playout room (the provider is held back meanwhile).
    h.agent_reply("item_1", REPLY, 3 * REPLY_TIMEOUT.as_millis() as u64, true);
    h.advance(3 * REPLY_TIMEOUT);
    assert_eq!(h.frames.len() as u128, 3 * REPLY_TIMEOUT.as_millis() / 20, "all of it was played");
    assert!(h.errors().is_empty(), "{:?}", h.errors());
    assert_eq!(h.conv.agent_state(), AgentState::Listening);
    assert_eq!(h.turns, vec![(Role::User, "Tell me a story".into(), false), (Role::Agent, REPLY.into(), false)]);
}

#[test]
fn a_provider_that_never_gets_ready_is_restarted_then_the_session_ends() {
    let mut h = Harness::new(with_deadlines());
    h.input(Input::ClientConnected);
    h.advance(START_TIMEOUT - Duration::from_millis(100));
    assert!(h.errors().is_empty());
    h.advance(Duration::from_millis(100));
    assert_eq!(h.errors().iter().map(|e| e.0.as_str()).collect::<Vec<_>>(), ["provider_timeout"]);
    assert_eq!(h.restarts(), 1);
    h.advance(START_TIMEOUT);
    assert_eq!(h.ended, Some(EndReason::ProviderError));
    assert!(h.errors().last().unwrap().1.contains("ending the session"), "{:?}", h.errors());
}

#[test]
fn a_provider_ready_after_its_restart_ends_the_start_deadline() {
    let mut h = Harness::new(ConversationConfig { greeting: Some("Greet the user".into()), ..with_deadlines() });
    h.input(Input::ClientConnected);
    h.advance(START_TIMEOUT);
    assert_eq!(h.restarts(), 1);
    h.advance(Duration::from_secs(2));
    h.input(Input::Provider(ProviderEvent::Ready));
    assert_eq!(h.conv.agent_state(), AgentState::Thinking, "greeting asked for");
    h.agent_reply("item_1", "Hello there!", 800, true);
    h.advance(Duration::from_secs(60));
    assert!(h.ended.is_none(), "{:?}", h.errors());
    assert_eq!(h.errors().len(), 1, "{:?}", h.errors());
    assert_eq!(h.conv.agent_state(), AgentState::Listening);
}

#[test]
fn a_provider_that_is_alive_but_does_not_answer_gives_up_the_turn_without_a_restart() {
    let mut h = Harness::ready(with_deadlines());
    h.input(Input::Client(Some(ClientEvent::Text { text: "Are you there?".into() })));
    h.advance(Duration::from_secs(2));
    // The provider is talking to us (it heard the user), just not answering.
    let heard =
        ProviderEvent::Transcript { speaker: Speaker::User, item_id: "u1".into(), text: "um".into(), is_final: true };
    h.input(Input::Provider(heard));
    h.advance(REPLY_TIMEOUT);
    let errors = h.errors();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].0, "reply_timeout");
    assert!(errors[0].1.contains("please try again"), "{errors:?}");
    assert_eq!(h.restarts(), 0, "a live session is kept");
    assert!(h.sent.iter().any(|c| matches!(c, ProviderCommand::Cancel)));
    assert_eq!(h.conv.agent_state(), AgentState::Listening);
    // Nothing at all for the next turns: replaced, then (still nothing) the session ends.
    h.input(Input::Client(Some(ClientEvent::Text { text: "Hello?".into() })));
    h.advance(REPLY_TIMEOUT);
    assert_eq!((h.restarts(), h.ended), (1, None));
    h.input(Input::Client(Some(ClientEvent::Text { text: "Anyone?".into() })));
    h.advance(REPLY_TIMEOUT);
    assert_eq!(h.ended, Some(EndReason::ProviderError));
}

fn image_url(bytes: usize) -> String {
    use base64::Engine as _;
    format!("data:image/jpeg;base64,{}", base64::engine::general_purpose::STANDARD.encode(vec![0xd8; bytes]))
}

fn error_count(h: &Harness, code: &str) -> usize {
    h.events.iter().filter(|e| matches!(e, ServerEvent::Error { code: c, .. } if c == code)).count()
}

fn images_sent(h: &Harness) -> usize {
    h.sent.iter().filter(|c| matches!(c, ProviderCommand::Image(_))).count()
}

#[test]
fn images_reach_a_provider_that_takes_them_checked_and_at_most_one_per_second() {
    let mut cfg = config(None, None);
    cfg.caps.images = true;
    let mut h = Harness::ready(cfg);
    let image = |h: &mut Harness, bytes| h.input(Input::Client(Some(ClientEvent::Image { data: image_url(bytes) })));
    image(&mut h, 20_000);
    assert_eq!(images_sent(&h), 1, "{:?}", h.sent.iter().map(std::mem::discriminant).collect::<Vec<_>>());
    // A flood within the second: dropped, the client told once.
    for _ in 0..20 {
        h.now += Duration::from_millis(10);
        image(&mut h, 1000);
    }
    assert_eq!(images_sent(&h), 1);
    assert_eq!(error_count(&h, "image_rate_limited"), 1);
    h.now += Duration::from_secs(1);
    image(&mut h, 1000);
    assert_eq!(images_sent(&h), 2, "the next second lets one through");
    // Oversized and malformed frames are refused every time, with their own codes.
    h.now += Duration::from_secs(1);
    image(&mut h, crate::image::MAX_IMAGE_BYTES + 1);
    h.input(Input::Client(Some(ClientEvent::Image { data: "data:image/gif;base64,R0lG".into() })));
    assert_eq!((error_count(&h, "image_too_large"), error_count(&h, "bad_image")), (1, 1));
    assert_eq!(images_sent(&h), 2);
}

#[test]
fn a_provider_without_images_gets_none_and_the_client_one_error() {
    let mut h = Harness::ready(config(None, None));
    for i in 0..5 {
        h.now += Duration::from_secs(2 * i);
        h.input(Input::Client(Some(ClientEvent::Image { data: image_url(1000) })));
    }
    assert_eq!(images_sent(&h), 0);
    assert_eq!(error_count(&h, "images_unsupported"), 1, "{:?}", h.events);
}

#[test]
fn client_playback_progress_cuts_played_ms_and_the_truncation_where_the_client_was() {
    let mut h = Harness::ready(config(None, None));
    h.agent_reply("item_1", REPLY, 8_000, false);
    h.advance(Duration::from_millis(2_000));
    // The client buffers ahead: it has played 1.2 s when the server has sent ~2 s.
    let played = Duration::from_millis(1_200);
    h.input(Input::ClientPlayback { item_id: "item_1".into(), played });
    h.advance(Duration::from_millis(100));
    h.input(Input::Client(Some(ClientEvent::Interrupt)));
    let cut = h.interrupted();
    assert_eq!(cut, vec![("item_1".to_owned(), 1_300)], "its report plus the 100 ms since");
    assert_eq!(h.truncations()[0].1, Duration::from_millis(1_300), "the model is cut there too");

    // A report of another item, or one beyond what was sent, does not move the cut past the frames.
    let mut h = Harness::ready(config(None, None));
    h.agent_reply("item_2", REPLY, 8_000, false);
    h.advance(Duration::from_millis(1_000));
    h.input(Input::ClientPlayback { item_id: "item_2".into(), played: Duration::from_secs(30) });
    h.input(Input::Client(Some(ClientEvent::Interrupt)));
    let (_, played_ms) = h.interrupted()[0].clone();
    assert!((900..=1_200).contains(&played_ms), "at most what was sent: {played_ms}");
}
