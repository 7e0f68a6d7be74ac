-- Budgets (src/session/budget.rs): what each session used, written when it ends; a user's daily
-- budget sums their rows since 00:00 UTC. Same portable types as 0001 (TEXT, BIGINT, unix ms).

CREATE TABLE IF NOT EXISTS session_usage (
    session_id       TEXT PRIMARY KEY,
    user_id          TEXT,              -- the session's user id, if it had one
    character        TEXT NOT NULL,
    tokens           BIGINT NOT NULL,   -- model tokens: the provider's report, or the text estimate
    tokens_reported  BIGINT NOT NULL,   -- 1: `tokens` is the provider's report; 0: the estimate
    duration_ms      BIGINT NOT NULL,   -- session time (media time since the session started)
    tool_calls       BIGINT NOT NULL,
    exceeded         TEXT,              -- the budget reached (`tokens`, `minutes`, `tool_calls`), if any
    ended_at         BIGINT NOT NULL
);

CREATE INDEX IF NOT EXISTS session_usage_user_day ON session_usage (user_id, ended_at);
