//! The character's speech as the user hears it: transcript words, visemes and emotions timed to
//! the agent's audio.
//!
//! Providers send text, emotions and (some) phoneme timings ahead of the audio they belong to.
//! [`AgentSpeech`] gives each a position in the current item's audio and hands it back when the
//! playout sends the frame that reaches that position, so a client that renders on arrival stays in
//! step with the voice and one that schedules by `start_ms` can be exact. Words without timings are
//! placed by a speaking-rate clock (characters per second), rescaled to the item's real length once
//! its audio is complete. Visemes come from the provider when it has them, otherwise from the audio
//! itself ([`media::VisemeEstimator`]). On barge-in everything not yet reached is dropped, and the
//! text the user heard is what was released.
//!
//! Sans-IO: positions are item audio offsets; the caller passes what the playout sent.

use std::time::Duration;

use media::{PcmRef, Timeline, VisemeEstimator};
use signaling::events::{Emotion, Role, ServerEvent, Viseme};

/// Speaking rate used to place words when the provider gives no timings (about 160 words/min).
pub const CHARS_PER_SECOND: f64 = 14.0;
/// The last word should end a little before the audio does (trailing silence).
const TAIL: f64 = 0.95;

/// One agent item (reply) in progress.
#[derive(Debug)]
struct Item {
    id: String,
    /// Audio received so far.
    audio: Duration,
    /// Whether the audio is complete (its length is known).
    audio_done: bool,
    /// Words known so far and where each starts in the audio.
    words: Vec<String>,
    at: Vec<Duration>,
    /// Words already released (heard).
    released: usize,
    /// Tokens of the cumulative text already placed (words and stage directions).
    tokens: usize,
    final_text: Option<String>,
    emotion: Option<Emotion>,
    provider_visemes: bool,
}

/// The current reply's timed events.
#[derive(Debug)]
pub struct AgentSpeech {
    marks: Timeline<ServerEvent>,
    words: Timeline<usize>,
    estimator: Option<VisemeEstimator>,
    estimate_visemes: bool,
    item: Option<Item>,
}

/// A stage direction rather than a spoken word: `[laughs]`, `(sighs)`, `*smiles*`, `<happy>`.
fn is_tag(token: &str) -> bool {
    let pairs = [('[', ']'), ('(', ')'), ('*', '*'), ('<', '>')];
    token.chars().count() >= 3
        && pairs.iter().any(|&(a, b)| {
            let t = token.trim_end_matches(['.', ',', '!', '?']);
            t.starts_with(a) && t.ends_with(b)
        })
}

fn viseme_named(name: &str) -> Viseme {
    name.parse().unwrap_or(Viseme::Sil)
}

impl AgentSpeech {
    /// `estimate_visemes`: derive visemes from the audio (providers without phoneme timings).
    pub fn new(estimate_visemes: bool) -> Self {
        Self {
            marks: Timeline::new(Duration::ZERO),
            words: Timeline::new(Duration::ZERO),
            estimator: None,
            estimate_visemes,
            item: None,
        }
    }

    /// The item being played or prepared, if any.
    pub fn item_id(&self) -> Option<&str> {
        self.item.as_ref().map(|i| i.id.as_str())
    }

    /// Make `item_id` current (a new reply starts). Leftovers of a previous item are released to
    /// `out` first, in order.
    fn item(&mut self, item_id: &str, out: &mut Vec<ServerEvent>) -> &mut Item {
        if self.item.as_ref().is_some_and(|i| i.id != item_id) {
            self.finish(out);
        }
        if self.item.is_none() {
            if let Some(e) = self.estimator.as_mut() {
                e.reset();
            }
            self.item = Some(Item {
                id: item_id.to_owned(),
                audio: Duration::ZERO,
                audio_done: false,
                words: Vec::new(),
                at: Vec::new(),
                released: 0,
                tokens: 0,
                final_text: None,
                emotion: None,
                provider_visemes: false,
            });
        }
        // Just ensured above.
        self.item.as_mut().expect("item set")
    }

    /// Audio of `item_id` was queued for playout.
    pub fn on_audio(&mut self, item_id: &str, pcm: PcmRef<'_>, out: &mut Vec<ServerEvent>) {
        let estimate = self.estimate_visemes;
        let item = self.item(item_id, out);
        item.audio += pcm.duration();
        if !estimate || item.provider_visemes {
            return;
        }
        let est = match self.estimator.as_mut() {
            Some(e) if e.rate_hz() == pcm.rate_hz => e,
            _ => self.estimator.insert(VisemeEstimator::new(pcm.rate_hz)),
        };
        let mut runs = Vec::new();
        est.push(pcm.samples, &mut runs);
        self.push_runs(item_id, &runs);
    }

    fn push_runs(&mut self, item_id: &str, runs: &[media::ShapeRun]) {
        for r in runs {
            let ev = ServerEvent::Viseme {
                item_id: item_id.to_owned(),
                viseme: viseme_named(r.shape.viseme_name()),
                start_ms: r.start.as_millis() as u64,
                duration_ms: r.duration.as_millis() as u64,
            };
            self.marks.push(item_id, r.start, ev);
        }
    }

    /// The item's audio is complete: place the remaining words within its real length.
    pub fn on_audio_done(&mut self, item_id: &str) {
        let Some(item) = self.item.as_mut().filter(|i| i.id == item_id) else { return };
        item.audio_done = true;
        if let Some(est) = self.estimator.as_mut()
            && !item.provider_visemes
            && self.estimate_visemes
        {
            let mut runs = Vec::new();
            est.finish(&mut runs);
            let id = item.id.clone();
            self.push_runs(&id, &runs);
        }
        self.retime_words();
    }

    /// Cumulative agent text of `item_id` (a partial, or the final). Stage directions in the text
    /// (`[laughs]`, `(sighs)`, `*smiles*`, `<happy>`) are not spoken: they are removed, and those
    /// that name an emotion change the face at that point of the speech.
    pub fn on_text(&mut self, item_id: &str, text: &str, is_final: bool, out: &mut Vec<ServerEvent>) {
        let item = self.item(item_id, out);
        let tokens: Vec<&str> = text.split_whitespace().collect();
        if is_final {
            let spoken: Vec<&str> = tokens.iter().copied().filter(|t| !is_tag(t)).collect();
            item.final_text = Some(spoken.join(" "));
        }
        // Only ever extend: a provider correcting earlier words is rare and the user heard them.
        if tokens.len() <= item.tokens {
            return;
        }
        let mut t = match (item.at.last(), item.words.last()) {
            (Some(&at), Some(w)) => at + Duration::from_secs_f64((w.chars().count() + 1) as f64 / CHARS_PER_SECOND),
            _ => Duration::ZERO,
        };
        let mut placed = Vec::with_capacity(tokens.len() - item.tokens);
        let mut moods = Vec::new();
        for tok in &tokens[item.tokens..] {
            if is_tag(tok) {
                if let Some(e) = Emotion::normalize(tok) {
                    moods.push((t, e));
                }
                continue;
            }
            item.words.push((*tok).to_owned());
            item.at.push(t);
            placed.push((t, item.words.len()));
            t += Duration::from_secs_f64((tok.chars().count() + 1) as f64 / CHARS_PER_SECOND);
        }
        item.tokens = tokens.len();
        let (id, audio_done) = (item.id.clone(), item.audio_done);
        for (t, n) in placed {
            self.words.push(&id, t, n);
        }
        for (t, e) in moods {
            self.marks.push(&id, t, ServerEvent::Emotion { emotion: e, item_id: Some(id.clone()) });
        }
        if audio_done {
            self.retime_words();
        }
    }

    /// Rescale word positions not yet released so the last word starts within the audio.
    fn retime_words(&mut self) {
        let Some(item) = self.item.as_mut() else { return };
        if !item.audio_done || item.words.is_empty() {
            return;
        }
        let limit = item.audio.mul_f64(TAIL);
        let last = *item.at.last().unwrap_or(&Duration::ZERO);
        if last <= limit || last.is_zero() {
            return;
        }
        let scale = limit.as_secs_f64() / last.as_secs_f64();
        self.words.drop_item(&item.id);
        for i in item.released..item.words.len() {
            item.at[i] = item.at[i].mul_f64(scale);
            self.words.push(&item.id, item.at[i], i + 1);
        }
    }

    /// The character's emotion changed, at the current end of the item's audio.
    pub fn on_emotion(&mut self, item_id: &str, emotion: Emotion, out: &mut Vec<ServerEvent>) {
        let item = self.item(item_id, out);
        let at = item.audio;
        item.emotion = Some(emotion.clone());
        let id = item.id.clone();
        self.marks.push(&id, at, ServerEvent::Emotion { emotion, item_id: Some(id.clone()) });
    }

    /// A gesture, at the current end of the item's audio (it goes out with the speech it
    /// accompanies).
    pub fn on_gesture(&mut self, item_id: &str, gesture: String, out: &mut Vec<ServerEvent>) {
        let item = self.item(item_id, out);
        let at = item.audio;
        let id = item.id.clone();
        self.marks.push(&id, at, ServerEvent::Gesture { gesture, item_id: Some(id.clone()) });
    }

    /// A viseme timed by the provider (TTS phonemes): audio estimation stops for this item.
    pub fn on_viseme(
        &mut self,
        item_id: &str,
        viseme: Viseme,
        start: Duration,
        duration: Duration,
        out: &mut Vec<ServerEvent>,
    ) {
        let item = self.item(item_id, out);
        if !item.provider_visemes {
            item.provider_visemes = true;
            let id = item.id.clone();
            // Drop estimated visemes not yet sent; the provider's are exact.
            let mut kept = Vec::new();
            self.marks.flush_item(&id, &mut kept);
            for ev in kept {
                if let ServerEvent::Emotion { .. } = &ev {
                    self.marks.push(&id, Duration::ZERO, ev);
                }
            }
        }
        let ev = ServerEvent::Viseme {
            item_id: item_id.to_owned(),
            viseme,
            start_ms: start.as_millis() as u64,
            duration_ms: duration.as_millis() as u64,
        };
        self.marks.push(item_id, start, ev);
    }

    /// The playout sent the frame of `item_id` at `offset`: the events it reached, in order.
    pub fn on_frame(&mut self, item_id: &str, offset: Duration, frame: Duration, out: &mut Vec<ServerEvent>) {
        self.marks.release(item_id, offset, frame, out);
        let mut reached = Vec::new();
        self.words.release(item_id, offset, frame, &mut reached);
        if let Some(item) = self.item.as_mut().filter(|i| i.id == item_id)
            && let Some(&n) = reached.iter().max()
            && n > item.released
        {
            item.released = n;
            out.push(ServerEvent::Transcript {
                role: Role::Agent,
                item_id: item.id.clone(),
                text: item.words[..n].join(" "),
                is_final: false,
            });
        }
    }

    /// The item's playout is over: release what is left and return (item id, final text, whether
    /// the reply was complete). A reply whose audio never completed (the provider went away
    /// mid-reply) ends with the words that were heard, like a barge-in.
    pub fn finish(&mut self, out: &mut Vec<ServerEvent>) -> Option<(String, String, bool)> {
        let item = self.item.take()?;
        self.marks.flush_item(&item.id, out);
        self.words.drop_item(&item.id);
        let complete = item.audio_done || item.audio.is_zero();
        let text = if complete {
            item.final_text.unwrap_or_else(|| item.words.join(" "))
        } else {
            item.words[..item.released].join(" ")
        };
        out.push(ServerEvent::Transcript {
            role: Role::Agent,
            item_id: item.id.clone(),
            text: text.clone(),
            is_final: true,
        });
        Some((item.id, text, complete))
    }

    /// Barge-in: drop everything not yet reached; returns (item id, the text the user heard).
    pub fn cut(&mut self) -> Option<(String, String)> {
        let item = self.item.take()?;
        self.marks.drop_item(&item.id);
        self.words.drop_item(&item.id);
        Some((item.id.clone(), item.words[..item.released].join(" ")))
    }

    /// The words released so far of the current item.
    pub fn heard(&self) -> String {
        self.item.as_ref().map(|i| i.words[..i.released].join(" ")).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const F: Duration = Duration::from_millis(20);

    fn play(s: &mut AgentSpeech, item: &str, until: Duration) -> Vec<ServerEvent> {
        let mut out = Vec::new();
        let mut at = Duration::ZERO;
        while at < until {
            s.on_frame(item, at, F, &mut out);
            at += F;
        }
        out
    }

    /// Speech of item `a`: its whole `text`, then `secs` of silent 24 kHz audio; nothing played.
    fn reply(text: &str, secs: usize) -> AgentSpeech {
        let mut s = AgentSpeech::new(false);
        let mut out = Vec::new();
        s.on_text("a", text, true, &mut out);
        s.on_audio("a", PcmRef::new(24_000, &vec![0i16; 24_000 * secs]), &mut out);
        s
    }

    fn texts(evs: &[ServerEvent]) -> Vec<String> {
        evs.iter()
            .filter_map(|e| match e {
                ServerEvent::Transcript { text, .. } => Some(text.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn words_are_released_word_by_word_with_the_audio() {
        let mut s = AgentSpeech::new(false);
        let mut out = Vec::new();
        s.on_text("a", "one two three four", false, &mut out);
        s.on_audio("a", PcmRef::new(24_000, &vec![1000i16; 24_000 * 2]), &mut out);
        assert!(out.is_empty(), "nothing is sent before its audio");
        let evs = play(&mut s, "a", Duration::from_millis(100));
        assert_eq!(texts(&evs), ["one"], "only the first word in the first 100 ms");
        let mut out = Vec::new();
        let mut at = Duration::from_millis(100);
        while at < Duration::from_secs(2) {
            s.on_frame("a", at, F, &mut out);
            at += F;
        }
        assert_eq!(texts(&out), ["one two", "one two three", "one two three four"]);
    }

    #[test]
    fn words_are_rescaled_into_a_short_item() {
        let mut s = AgentSpeech::new(false);
        let mut out = Vec::new();
        // ~60 words at 14 chars/s would need ~20 s; the audio is 2 s.
        let text = vec!["word"; 60].join(" ");
        s.on_text("a", &text, false, &mut out);
        s.on_audio("a", PcmRef::new(24_000, &vec![0i16; 48_000]), &mut out);
        s.on_audio_done("a");
        let evs = play(&mut s, "a", Duration::from_secs(2));
        let last = texts(&evs).pop().unwrap();
        assert_eq!(last.split_whitespace().count(), 60, "every word is released within the audio");
    }

    #[test]
    fn barge_in_keeps_only_what_was_heard() {
        let mut s = reply("alpha beta gamma delta epsilon", 3);
        let evs = play(&mut s, "a", Duration::from_millis(500));
        assert_eq!(texts(&evs).last().map(String::as_str), Some("alpha beta"));
        let (item, heard) = s.cut().unwrap();
        assert_eq!((item.as_str(), heard.as_str()), ("a", "alpha beta"));
        assert!(play(&mut s, "a", Duration::from_secs(3)).is_empty(), "nothing of the cut item is sent later");
    }

    #[test]
    fn stage_directions_are_not_spoken_and_emotion_tags_change_the_face_in_place() {
        let mut s = reply("[happy] Hello there! (laughs) That is *sighs* sad.", 4);
        let evs = play(&mut s, "a", Duration::from_secs(4));
        let moods: Vec<&Emotion> = evs
            .iter()
            .filter_map(|e| match e {
                ServerEvent::Emotion { emotion, .. } => Some(emotion),
                _ => None,
            })
            .collect();
        assert_eq!(moods, [&Emotion::Happy, &Emotion::Happy, &Emotion::Sad]);
        let said = texts(&evs).pop().unwrap();
        assert_eq!(said, "Hello there! That is sad.");
        let mut out = Vec::new();
        let (_, final_text, _) = s.finish(&mut out).unwrap();
        assert_eq!(final_text, "Hello there! That is sad.", "the stored text has no stage directions");
    }

    #[test]
    fn a_reply_whose_audio_never_completed_ends_with_what_was_heard() {
        let mut s = reply("one two three four five six", 1);
        play(&mut s, "a", Duration::from_millis(300));
        let mut out = Vec::new();
        let (_, text, complete) = s.finish(&mut out).unwrap();
        assert!(!complete);
        assert_eq!(text, "one two", "only the heard words");
    }

    #[test]
    fn finish_sends_the_final_and_leftover_marks() {
        let mut s = AgentSpeech::new(false);
        let mut out = Vec::new();
        s.on_emotion("a", Emotion::Happy, &mut out);
        s.on_text("a", "hi there", true, &mut out);
        let (_, text, complete) = s.finish(&mut out).unwrap();
        assert_eq!(text, "hi there");
        assert!(complete, "a text-only reply is complete");
        assert!(matches!(out[0], ServerEvent::Emotion { .. }));
        assert!(matches!(&out[1], ServerEvent::Transcript { is_final: true, .. }));
    }

    #[test]
    fn estimated_visemes_follow_real_speech_and_stop_when_the_provider_sends_its_own() {
        let pcm = media::wav::parse(include_bytes!("../providers/scripted_reply.wav")).unwrap();
        let mut s = AgentSpeech::new(true);
        let mut out = Vec::new();
        s.on_audio("a", pcm.as_ref(), &mut out);
        s.on_audio_done("a");
        let evs = play(&mut s, "a", pcm.duration());
        let starts: Vec<u64> = evs
            .iter()
            .filter_map(|e| match e {
                ServerEvent::Viseme { start_ms, .. } => Some(*start_ms),
                _ => None,
            })
            .collect();
        assert!(starts.len() > 50, "{} visemes for {:?} of speech", starts.len(), pcm.duration());
        assert!(starts.windows(2).all(|w| w[0] < w[1]), "increasing start_ms");
        assert!(*starts.last().unwrap() as f64 > pcm.duration().as_millis() as f64 * 0.9, "visemes cover the reply");

        let mut s = AgentSpeech::new(true);
        let mut out = Vec::new();
        s.on_viseme("b", Viseme::ALL[1], Duration::ZERO, Duration::from_millis(80), &mut out);
        s.on_audio("b", pcm.as_ref(), &mut out);
        let evs = play(&mut s, "b", Duration::from_secs(1));
        let n = evs.iter().filter(|e| matches!(e, ServerEvent::Viseme { .. })).count();
        assert_eq!(n, 1, "only the provider's viseme");
    }
}
