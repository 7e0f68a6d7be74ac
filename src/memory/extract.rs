//! From a finished session's heard transcript to memories: facts about the user, preferences
//! and open threads.
//!
//! [`rules`] is the offline default: it reads only the user's own sentences and keeps those that
//! state something about the user ("my dog is called Miso", "I love jazz", "I have to call my
//! sister tomorrow"), rewritten in the third person ("The user's dog is called Miso.").
//! [`llm`] asks an OpenAI-compatible chat model for the same three kinds as JSON; the caller
//! falls back to the rules when it fails.

use futures::StreamExt as _;
use serde::Deserialize;
use signaling::events::Role;

use super::Kind;
use crate::providers::cascade::llm::{ChatMessage, ChatRequest, ChatRole, LanguageModel};
use crate::store::StoredTurn;

/// Memories one session yields at most.
pub const MAX_PER_SESSION: usize = 20;
/// Longest memory text kept, characters.
pub const MAX_TEXT_CHARS: usize = 300;
/// The tail of the transcript an LLM is given, characters.
const MAX_TRANSCRIPT_CHARS: usize = 12_000;

/// Phrases that mark a preference.
const PREFERENCE: &[&str] = &[
    "i like ",
    "i love ",
    "i enjoy ",
    "i prefer ",
    "i hate ",
    "i dislike ",
    "i don't like ",
    "i do not like ",
    "my favorite ",
    "my favourite ",
];
/// Phrases that mark something the user still means to do (an open thread).
const THREAD: &[&str] = &[
    "i have to ",
    "i need to ",
    "i'm going to ",
    "i am going to ",
    "i will ",
    "i'll ",
    "i plan to ",
    "i'm planning ",
    "i want to ",
    "remind me ",
];
/// Phrases that mark a fact about the user.
const FACT: &[&str] = &[
    "my name is ",
    "call me ",
    "i'm called ",
    "i am called ",
    "i am a ",
    "i'm a ",
    "i am an ",
    "i'm an ",
    "i live ",
    "i work ",
    "i study ",
    "i have a ",
    "i have two ",
    "i have three ",
    "i've got ",
    "i was born ",
    "i'm from ",
    "i am from ",
];
/// After "my <noun>", these verbs make a fact ("my dog is called Miso", "my sister lives ...").
const MY_VERBS: &[&str] = &[" is ", " are ", " was ", " called ", " named ", " lives ", " works "];

fn contains_any(haystack: &str, needles: &[&str]) -> bool {
    needles.iter().any(|n| haystack.starts_with(n.trim_start()) || haystack.contains(&format!(" {}", n.trim_start())))
}

/// The kind of memory `sentence` states about the user, if any.
pub fn classify(sentence: &str) -> Option<Kind> {
    let l = sentence.to_lowercase().replace('’', "'");
    if l.ends_with('?') {
        return None;
    }
    let words = l.split_whitespace().count();
    if !(3..=40).contains(&words) {
        return None;
    }
    if contains_any(&l, PREFERENCE) {
        return Some(Kind::Preference);
    }
    if contains_any(&l, THREAD) {
        return Some(Kind::Thread);
    }
    let my_fact = l.split("my ").skip(usize::from(!l.starts_with("my "))).any(|rest| {
        let rest = format!(" {rest}");
        MY_VERBS.iter().any(|v| rest.find(v).is_some_and(|at| at < 30))
    }) && (l.starts_with("my ") || l.contains(" my "));
    if contains_any(&l, FACT) || my_fact {
        return Some(Kind::Fact);
    }
    None
}

/// `sentence` in the third person: "my dog is called Miso" -> "The user's dog is called Miso."
pub fn third_person(sentence: &str) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut after_i = false;
    for w in sentence.split_whitespace() {
        let core = w.trim_end_matches([',', '.', '!', ';', ':']);
        let tail = &w[core.len()..];
        let lower = core.to_lowercase().replace('’', "'");
        let replaced = match lower.as_str() {
            "i" => Some("the user"),
            "i'm" | "im" => Some("the user is"),
            "i've" => Some("the user has"),
            "i'll" => Some("the user will"),
            "i'd" => Some("the user would"),
            "my" => Some("the user's"),
            "me" => Some("the user"),
            "mine" => Some("the user's"),
            "myself" => Some("themselves"),
            "am" if after_i => Some("is"),
            "was" if after_i => Some("was"),
            "have" if after_i => Some("has"),
            "don't" if after_i => Some("doesn't"),
            "do" if after_i => Some("does"),
            _ => None,
        };
        after_i = lower == "i";
        match replaced {
            Some(r) => out.push(format!("{r}{tail}")),
            None => out.push(w.to_owned()),
        }
    }
    let mut s = out.join(" ");
    // "the user like" -> "the user likes": the verb right after "the user" agrees.
    for verb in ["like", "love", "enjoy", "prefer", "hate", "dislike", "live", "work", "study", "need", "want", "plan"]
    {
        s = s.replace(&format!("the user {verb} "), &format!("the user {verb}s "));
    }
    let s = s.trim().trim_end_matches(['.', '!', ',', ';']).to_owned();
    let mut chars = s.chars();
    let mut text = match chars.next() {
        Some(c) => c.to_uppercase().chain(chars).collect::<String>(),
        None => return String::new(),
    };
    text.push('.');
    text.chars().take(MAX_TEXT_CHARS).collect()
}

/// Sentences of `text`: split at `.`, `!`, `?` and `;` (a `?` stays on its sentence).
fn sentences(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, c) in text.char_indices() {
        if matches!(c, '.' | '!' | '?' | ';') {
            let end = if c == '?' { i + 1 } else { i };
            out.push(text[start..end].trim());
            start = i + c.len_utf8();
        }
    }
    out.push(text[start..].trim());
    out.retain(|s| !s.is_empty());
    out
}

/// The offline extractor: what the user's own sentences state about them.
pub fn rules(turns: &[StoredTurn]) -> Vec<(Kind, String)> {
    let mut out: Vec<(Kind, String)> = Vec::new();
    for t in turns.iter().filter(|t| t.role == Role::User) {
        for s in sentences(&t.text) {
            let Some(kind) = classify(s) else { continue };
            let text = third_person(s);
            if !text.is_empty() && !out.iter().any(|(_, o)| o.eq_ignore_ascii_case(&text)) {
                out.push((kind, text));
            }
            if out.len() == MAX_PER_SESSION {
                return out;
            }
        }
    }
    out
}

/// The instructions of the LLM extractor.
const LLM_INSTRUCTIONS: &str = "You keep a character's long-term memory of a user. From the conversation \
transcript below, write down what is worth remembering about the USER for later conversations: facts about \
them (names, family, pets, work, places), their preferences, and open threads (things they plan or still \
have to do). Write each in the third person about \"the user\", one short sentence each, only what the \
user said or confirmed. Answer with one JSON object and nothing else: \
{\"memories\": [{\"kind\": \"fact\" | \"preference\" | \"thread\", \"text\": \"...\"}]}. \
Answer {\"memories\": []} when there is nothing to remember.";

#[derive(Deserialize)]
struct LlmAnswer {
    memories: Vec<LlmMemory>,
}

#[derive(Deserialize)]
struct LlmMemory {
    kind: String,
    text: String,
}

/// The transcript as the LLM reads it: `user: ...` / `character: ...` lines, the last
/// [`MAX_TRANSCRIPT_CHARS`] characters.
fn transcript_text(turns: &[StoredTurn], character_name: &str) -> String {
    let mut s = String::new();
    for t in turns {
        let who = if t.role == Role::User { "user" } else { character_name };
        s.push_str(&format!("{who}: {}\n", t.text));
    }
    let skip = s.chars().count().saturating_sub(MAX_TRANSCRIPT_CHARS);
    s.chars().skip(skip).collect()
}

/// Parse the model's answer: the outermost JSON object (code fences and prose around it are
/// ignored); unknown kinds and empty texts are dropped.
pub fn parse_llm_answer(answer: &str) -> Result<Vec<(Kind, String)>, String> {
    let (Some(start), Some(end)) = (answer.find('{'), answer.rfind('}')) else {
        return Err("the answer holds no JSON object".into());
    };
    if end < start {
        return Err("the answer holds no JSON object".into());
    }
    let parsed: LlmAnswer = serde_json::from_str(&answer[start..=end]).map_err(|e| format!("bad JSON: {e}"))?;
    let mut out: Vec<(Kind, String)> = Vec::new();
    for m in parsed.memories {
        let Ok(kind) = m.kind.trim().to_lowercase().parse::<Kind>() else { continue };
        let text: String = m.text.trim().chars().take(MAX_TEXT_CHARS).collect();
        if !text.is_empty() && !out.iter().any(|(_, o)| o.eq_ignore_ascii_case(&text)) {
            out.push((kind, text));
        }
        if out.len() == MAX_PER_SESSION {
            break;
        }
    }
    Ok(out)
}

/// Ask `model` for the memories of `turns`. Errors say what failed (for the log).
pub async fn llm(
    model: &dyn LanguageModel,
    turns: &[StoredTurn],
    character_name: &str,
    timeout: std::time::Duration,
) -> Result<Vec<(Kind, String)>, String> {
    let req = ChatRequest {
        messages: vec![
            ChatMessage { role: ChatRole::System, content: LLM_INSTRUCTIONS.to_owned() },
            ChatMessage { role: ChatRole::User, content: transcript_text(turns, character_name) },
        ],
        character_name: character_name.to_owned(),
        max_tokens: 800,
    };
    let collect = async {
        let mut stream = model.stream(req);
        let mut answer = String::new();
        while let Some(delta) = stream.next().await {
            answer.push_str(&delta.map_err(|e| e.to_string())?);
            if answer.len() > 64 * 1024 {
                return Err("the answer exceeds 64 KiB".to_owned());
            }
        }
        Ok(answer)
    };
    let answer =
        tokio::time::timeout(timeout, collect).await.map_err(|_| format!("no answer within {timeout:?}"))??;
    parse_llm_answer(&answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(role: Role, text: &str) -> StoredTurn {
        StoredTurn {
            session_id: "s".into(),
            seq: 1,
            role,
            text: text.into(),
            interrupted: false,
            started_at: None,
            ended_at: std::time::SystemTime::UNIX_EPOCH,
            tool_calls: None,
        }
    }

    #[test]
    fn rules_keep_facts_preferences_and_threads_in_the_third_person() {
        let turns = [
            turn(Role::User, "Hello there! My dog is called Miso. What's the weather like?"),
            turn(Role::Agent, "My name is Aiko and I love tea."),
            turn(Role::User, "I love jazz; I have to call my sister tomorrow."),
            turn(Role::User, "I'm a nurse and I live in Osaka"),
        ];
        let got = rules(&turns);
        assert_eq!(
            got,
            vec![
                (Kind::Fact, "The user's dog is called Miso.".to_owned()),
                (Kind::Preference, "The user loves jazz.".to_owned()),
                (Kind::Thread, "The user has to call the user's sister tomorrow.".to_owned()),
                (Kind::Fact, "The user is a nurse and the user lives in Osaka.".to_owned()),
            ],
            "the agent's own sentences and questions are not memories"
        );
    }

    #[test]
    fn small_talk_and_questions_are_not_memories() {
        for s in ["ok", "what is my dog called?", "tell me about the weather", "that is nice", "my my my"] {
            assert_eq!(classify(s), None, "{s}");
        }
        assert_eq!(classify("my favourite colour is green"), Some(Kind::Preference));
        assert_eq!(classify("My sister lives in Kyoto"), Some(Kind::Fact));
    }

    #[test]
    fn llm_answers_parse_with_fences_and_unknown_kinds_dropped() {
        let a = "```json\n{\"memories\": [{\"kind\": \"Fact\", \"text\": \"The user's dog is called Miso.\"}, \
                 {\"kind\": \"mood\", \"text\": \"x\"}, {\"kind\": \"thread\", \"text\": \"  \"}]}\n```";
        assert_eq!(parse_llm_answer(a).unwrap(), vec![(Kind::Fact, "The user's dog is called Miso.".to_owned())]);
        assert!(parse_llm_answer("I cannot help").is_err());
        assert!(parse_llm_answer("{\"memories\": 3}").is_err());
    }

    #[test]
    fn the_llm_sees_the_tail_of_a_long_transcript() {
        let long = "word ".repeat(4000);
        let turns = [turn(Role::User, &long), turn(Role::User, "my dog is called Miso")];
        let t = transcript_text(&turns, "Aiko");
        assert!(t.chars().count() <= MAX_TRANSCRIPT_CHARS && t.ends_with("user: my dog is called Miso\n"));
    }
}
