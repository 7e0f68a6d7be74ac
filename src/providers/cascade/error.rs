//! Errors of the cascade's stages (speech-to-text, LLM, text-to-speech).

/// Why one stage adapter failed. `retryable()` decides failover: a retryable failure trips the
/// adapter's circuit breaker and the next adapter of the stage is tried.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StageError {
    /// Misconfigured (bad URL, missing model files): not retryable.
    #[error("configuration: {0}")]
    Config(String),
    /// The request itself is unacceptable (too long, unknown voice): not retryable.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// Unreachable, 5xx, connection reset, engine thread gone: retryable.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Over capacity (429, full queue): retryable.
    #[error("busy: {0}")]
    Busy(String),
    /// No answer in time: retryable.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The server answered something we cannot read: retryable (another server may do better).
    #[error("bad response: {0}")]
    BadResponse(String),
    /// The credentials were refused (401/403): not retryable.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
}

impl StageError {
    /// Whether another attempt (or another adapter) may succeed.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            StageError::Unavailable(_) | StageError::Busy(_) | StageError::Timeout(_) | StageError::BadResponse(_)
        )
    }

    /// The `error` event code for this failure in `stage` (`stt`, `llm`, `tts`).
    pub fn code(&self, stage: &str) -> String {
        let kind = match self {
            StageError::Config(_) => "config",
            StageError::BadRequest(_) => "bad_request",
            StageError::Unavailable(_) => "unavailable",
            StageError::Busy(_) => "busy",
            StageError::Timeout(_) => "timeout",
            StageError::BadResponse(_) => "bad_response",
            StageError::Unauthorized(_) => "unauthorized",
        };
        format!("{stage}_{kind}")
    }
}
