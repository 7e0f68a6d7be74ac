//! The prompt: persona + memory summary + a sliding window of recent turns, within a budget.
//!
//! The system message holds the character's persona, the output format (the JSON object read by
//! [`super::structured`]) and a memory summary of turns that slid out of the window. Recent turns
//! follow, newest kept first, as many as fit in the per-session token budget (tokens estimated
//! at 4 characters each, plus 4 per message). A turn that leaves the window is folded into the
//! summary (its first words), and the summary itself is capped at a quarter of the budget, oldest
//! lines dropped first. A barge-in truncates the last agent turn to what the user heard, so the
//! model's context never claims words the user did not hear.

use std::collections::VecDeque;

use super::llm::{ChatMessage, ChatRole};

/// Default budget of one prompt, in estimated tokens.
pub const DEFAULT_TOKEN_BUDGET: usize = 2000;
/// Turns kept in the window at most, whatever the budget.
const MAX_WINDOW_TURNS: usize = 40;
/// Words of a turn kept in the summary.
const SUMMARY_WORDS: usize = 12;

/// Estimated tokens of a text.
pub fn estimate_tokens(s: &str) -> usize {
    s.len().div_ceil(4)
}

/// One session's conversation memory.
#[derive(Debug, Clone)]
pub struct PromptManager {
    persona: String,
    character_name: String,
    budget: usize,
    summary: VecDeque<String>,
    window: VecDeque<ChatMessage>,
}

impl PromptManager {
    /// A prompt for `character_name` with `persona`, within `budget` tokens.
    pub fn new(character_name: &str, persona: &str, budget: usize) -> Self {
        Self {
            persona: persona.trim().to_owned(),
            character_name: character_name.to_owned(),
            budget: budget.max(200),
            summary: VecDeque::new(),
            window: VecDeque::new(),
        }
    }

    /// The system message.
    pub fn system(&self) -> String {
        let mut s = String::new();
        if self.persona.is_empty() {
            s.push_str(&format!("You are {}, a friendly character.", self.character_name));
        } else {
            s.push_str(&self.persona);
        }
        s.push_str(
            "\nYou are speaking aloud: answer in one to three short sentences, no lists or markup.\n\
             Reply with one JSON object and nothing else: {\"emotion\": \"<one of: ",
        );
        s.push_str(&signaling::events::Emotion::known_names().join(", "));
        s.push_str(
            ">\", \"text\": \"<what you say>\", \"gesture\": \"<optional: nod, wave, shrug, ...>\", \
             \"actions\": [<optional>]}",
        );
        if !self.summary.is_empty() {
            s.push_str("\nEarlier in this conversation:\n");
            for line in &self.summary {
                s.push_str("- ");
                s.push_str(line);
                s.push('\n');
            }
        }
        s
    }

    /// Remember a turn.
    pub fn record(&mut self, role: ChatRole, text: &str) {
        let text = text.trim();
        if text.is_empty() {
            return;
        }
        self.window.push_back(ChatMessage { role, content: text.to_owned() });
        while self.window.len() > MAX_WINDOW_TURNS {
            self.slide_out();
        }
    }

    /// The last agent turn was cut: keep only `heard`.
    pub fn truncate_last_agent(&mut self, heard: &str) {
        if let Some(m) = self.window.iter_mut().rev().find(|m| m.role == ChatRole::Assistant) {
            m.content = if heard.trim().is_empty() {
                "(interrupted before speaking)".into()
            } else {
                heard.trim().to_owned() + " (interrupted)"
            };
        }
    }

    /// The messages for the next reply: system, then the window, fitted to the budget.
    pub fn build(&mut self) -> Vec<ChatMessage> {
        loop {
            let system = self.system();
            let total: usize = estimate_tokens(&system)
                + self.window.iter().map(|m| estimate_tokens(&m.content) + 4).sum::<usize>()
                + 4;
            if total <= self.budget || self.window.len() <= 1 {
                let mut out = Vec::with_capacity(self.window.len() + 1);
                out.push(ChatMessage { role: ChatRole::System, content: system });
                out.extend(self.window.iter().cloned());
                return out;
            }
            self.slide_out();
        }
    }

    /// Recent turns (oldest first), for offline responders and tests.
    pub fn window(&self) -> impl Iterator<Item = &ChatMessage> {
        self.window.iter()
    }

    fn slide_out(&mut self) {
        let Some(m) = self.window.pop_front() else { return };
        let who = if m.role == ChatRole::User { "The user said" } else { "You said" };
        let words: Vec<&str> = m.content.split_whitespace().take(SUMMARY_WORDS).collect();
        let more = if m.content.split_whitespace().count() > SUMMARY_WORDS { "..." } else { "" };
        self.summary.push_back(format!("{who}: {}{more}", words.join(" ")));
        let cap = self.budget / 4;
        while self.summary.iter().map(|l| estimate_tokens(l) + 2).sum::<usize>() > cap && self.summary.len() > 1 {
            self.summary.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_prompt_has_persona_and_format() {
        let p = PromptManager::new("Aiko", "You are Aiko, cheerful.", 1000);
        let s = p.system();
        assert!(s.starts_with("You are Aiko, cheerful."));
        assert!(s.contains("\"emotion\"") && s.contains("\"text\""));
    }

    #[test]
    fn window_slides_into_the_summary_within_the_budget() {
        let mut p = PromptManager::new("Aiko", "Persona.", 300);
        for i in 0..30 {
            p.record(ChatRole::User, &format!("message number {i} about the weather and some more words here"));
            p.record(ChatRole::Assistant, &format!("reply {i}"));
        }
        let msgs = p.build();
        let total: usize = msgs.iter().map(|m| estimate_tokens(&m.content) + 4).sum();
        assert!(total <= 300 + 4, "prompt of {total} tokens exceeds the budget");
        assert_eq!(msgs[0].role, ChatRole::System);
        assert_eq!(msgs.last().unwrap().content, "reply 29", "the newest turn is kept");
        assert!(msgs[0].content.contains("Earlier in this conversation"), "older turns summarised");
        assert!(!msgs[0].content.contains("message number 0 "), "the oldest summary lines are dropped");
    }

    #[test]
    fn truncation_keeps_what_was_heard() {
        let mut p = PromptManager::new("Aiko", "", 1000);
        p.record(ChatRole::User, "tell me a story");
        p.record(ChatRole::Assistant, "Once upon a time. There was a dragon.");
        p.truncate_last_agent("Once upon a time.");
        let msgs = p.build();
        assert_eq!(msgs.last().unwrap().content, "Once upon a time. (interrupted)");
    }
}
