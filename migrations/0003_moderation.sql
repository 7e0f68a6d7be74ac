-- Moderation review queue (src/moderation.rs, GET /v1/admin/flags): every flagged agent text,
-- with the policy version that flagged it; `resolved_*` set by an admin.

CREATE TABLE IF NOT EXISTS moderation_flags (
    id              TEXT PRIMARY KEY,
    session_id      TEXT NOT NULL,
    turn            BIGINT NOT NULL,   -- turns recorded in the session before the flag
    item_id         TEXT NOT NULL,
    category        TEXT NOT NULL,
    text            TEXT NOT NULL,     -- the denied text: only here, never sent to the client
    policy_version  TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    resolved_at     BIGINT,
    resolved_by     TEXT,
    resolution      TEXT
);

CREATE INDEX IF NOT EXISTS moderation_flags_open ON moderation_flags (resolved_at, created_at);
CREATE INDEX IF NOT EXISTS moderation_flags_session ON moderation_flags (session_id);
