//! The language model: the middle stage of the cascade.
//!
//! It gets the whole prompt (built by [`super::prompt::PromptManager`]) and streams text deltas;
//! the cascade splits them into sentences and speaks each as soon as it is complete.

use futures::stream::BoxStream;

use super::error::StageError;

/// Who wrote a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatRole {
    /// Instructions.
    System,
    /// The human.
    User,
    /// The character.
    Assistant,
}

impl ChatRole {
    /// The OpenAI chat `role` string.
    pub fn as_str(self) -> &'static str {
        match self {
            ChatRole::System => "system",
            ChatRole::User => "user",
            ChatRole::Assistant => "assistant",
        }
    }
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// Who.
    pub role: ChatRole,
    /// What.
    pub content: String,
}

/// A request for one reply.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    /// System prompt, then the conversation, ending with the user's turn.
    pub messages: Vec<ChatMessage>,
    /// The character's display name (offline responders use it directly).
    pub character_name: String,
    /// Upper bound on the reply's tokens.
    pub max_tokens: u32,
}

/// One language model engine or server.
pub trait LanguageModel: Send + Sync {
    /// For logs and error messages.
    fn name(&self) -> &str;
    /// Stream the reply as text deltas. Dropping the stream cancels the request.
    fn stream(&self, req: ChatRequest) -> BoxStream<'static, Result<String, StageError>>;
}
