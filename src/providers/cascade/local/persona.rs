//! The offline persona responder: a rule-based "brain" that needs no model and no network.
//!
//! It reads the prompt a real model would get (the character's name, the conversation window)
//! and answers the last user turn: greets, answers its name, the time and what it is, thanks
//! and goodbyes, and otherwise reflects what it heard, recalling the user's previous turn (its
//! short-term context). It says plainly, once early and again every few turns, that it is the
//! offline brain and how to connect a real model. Replies use the same structured JSON a model
//! is asked for, streamed in small deltas, so the cascade's parser, emotions and sentence-level
//! streaming are exercised exactly as with a real LLM.

use futures::StreamExt;
use futures::stream::BoxStream;

use crate::providers::cascade::error::StageError;
use crate::providers::cascade::llm::{ChatRequest, ChatRole, LanguageModel};

/// How to connect a real model, in words that can be spoken.
pub const CONNECT_HINT: &str = "To give me a real mind, set an OpenAI key, or point the cascade at a language model \
                                server such as Ollama or llama dot cpp.";

/// The responder.
#[derive(Debug, Default, Clone)]
pub struct PersonaResponder;

impl PersonaResponder {
    /// The reply (emotion, text) to the request's last user turn.
    pub fn reply(req: &ChatRequest) -> (&'static str, String) {
        let name = if req.character_name.is_empty() { "your companion" } else { req.character_name.as_str() };
        let users: Vec<&str> =
            req.messages.iter().filter(|m| m.role == ChatRole::User).map(|m| m.content.as_str()).collect();
        let agent_turns = req.messages.iter().filter(|m| m.role == ChatRole::Assistant).count();
        let heard = users.last().copied().unwrap_or("").trim();
        let previous = users.len().checked_sub(2).and_then(|i| users.get(i)).copied();
        let lower = heard.to_lowercase();
        let words: Vec<String> = lower
            .split(|c: char| !c.is_alphanumeric() && c != '\'')
            .filter(|w| !w.is_empty())
            .map(str::to_owned)
            .collect();
        let has = |w: &str| words.iter().any(|x| x == w);
        let phrase = |p: &str| lower.contains(p);
        let offline_note = agent_turns % 4 == 0;

        if heard.is_empty() {
            return ("thinking", "Sorry, I did not catch that. Could you say it again?".into());
        }
        let (emotion, mut text) = if phrase("your name") || phrase("who are you") {
            ("happy", format!("My name is {name}. Nice to meet you!"))
        } else if has("time") || phrase("what time") {
            let now = time::OffsetDateTime::now_utc();
            ("neutral", format!("It is {:02}:{:02}, universal time.", now.hour(), now.minute()))
        } else if phrase("what are you")
            || has("robot")
            || has("offline")
            || has("model")
            || has("brain")
            || phrase("are you real")
        {
            return (
                "neutral",
                format!(
                    "I am {name}, running on kotodama's offline brain: a few simple rules, no language model. \
                     {CONNECT_HINT}"
                ),
            );
        } else if has("bye") || has("goodbye") {
            ("sad", "Goodbye! It was nice talking with you.".into())
        } else if has("thanks") || has("thank") {
            ("happy", "You are welcome!".into())
        } else if has("hello") || has("hi") || has("hey") || phrase("good morning") || phrase("good evening") {
            ("happy", format!("Hello! I am {name}. It is nice to hear you."))
        } else {
            let mut t = format!("You said: {}.", heard.trim_end_matches(['.', '!', '?']));
            if let Some(prev) = previous {
                let prev: Vec<&str> = prev.split_whitespace().take(8).collect();
                t.push_str(&format!(" Before that, you said {}.", prev.join(" ")));
            }
            ("thinking", t)
        };
        if offline_note {
            text.push_str(" I am the offline brain, so I only understand simple things. ");
            text.push_str(CONNECT_HINT);
        }
        (emotion, text)
    }
}

impl LanguageModel for PersonaResponder {
    fn name(&self) -> &str {
        "persona"
    }

    fn stream(&self, req: ChatRequest) -> BoxStream<'static, Result<String, StageError>> {
        let (emotion, text) = Self::reply(&req);
        let json = serde_json::json!({ "emotion": emotion, "text": text }).to_string();
        // Deltas of a few characters, as a model's tokens would arrive.
        let chars: Vec<char> = json.chars().collect();
        let deltas: Vec<Result<String, StageError>> = chars.chunks(6).map(|c| Ok(c.iter().collect())).collect();
        futures::stream::iter(deltas).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::cascade::llm::ChatMessage;

    fn req(turns: &[(ChatRole, &str)]) -> ChatRequest {
        let mut messages = vec![ChatMessage { role: ChatRole::System, content: "You are Aiko.".into() }];
        messages.extend(turns.iter().map(|(r, t)| ChatMessage { role: *r, content: (*t).into() }));
        ChatRequest { messages, character_name: "Aiko".into(), max_tokens: 200 }
    }

    #[test]
    fn answers_name_greeting_and_what_it_is() {
        let (_, t) = PersonaResponder::reply(&req(&[(ChatRole::User, "hello what is your name")]));
        assert!(t.contains("My name is Aiko"), "{t}");
        assert!(t.contains("offline brain"), "the first reply says what it is: {t}");
        let (e, t) = PersonaResponder::reply(&req(&[
            (ChatRole::User, "hi"),
            (ChatRole::Assistant, "Hello!"),
            (ChatRole::User, "hey there"),
        ]));
        assert_eq!(e, "happy");
        assert!(t.starts_with("Hello! I am Aiko."), "{t}");
        assert!(!t.contains("offline brain"), "not every turn: {t}");
        let (_, t) = PersonaResponder::reply(&req(&[(ChatRole::User, "are you a robot")]));
        assert!(t.contains("offline brain") && t.contains("Ollama"), "{t}");
    }

    #[test]
    fn reflects_with_short_term_context() {
        let (_, t) = PersonaResponder::reply(&req(&[
            (ChatRole::User, "I like green tea"),
            (ChatRole::Assistant, "You said: I like green tea."),
            (ChatRole::User, "and cats"),
        ]));
        assert!(t.starts_with("You said: and cats."), "{t}");
        assert!(t.contains("Before that, you said I like green tea."), "{t}");
    }

    #[test]
    fn streams_structured_json_with_the_whole_text() {
        let r = req(&[(ChatRole::User, "what time is it")]);
        let (_, expected) = PersonaResponder::reply(&r);
        let deltas: Vec<String> =
            futures::executor::block_on(PersonaResponder.stream(r).map(|d| d.unwrap()).collect::<Vec<_>>());
        assert!(deltas.len() > 3, "streamed in pieces");
        let v: serde_json::Value = serde_json::from_str(&deltas.concat()).unwrap();
        assert_eq!(v["text"], expected);
        assert_eq!(v["emotion"], "neutral");
    }
}
