-- Admin API (src/admin/): character edits laid over the configured characters, and the audit
-- log of every admin action. Same portable types as 0001 (TEXT, BIGINT, unix milliseconds).

CREATE TABLE IF NOT EXISTS character_edits (
    id          TEXT PRIMARY KEY,
    spec        TEXT,              -- the character as JSON; NULL: deleted (hides a configured one)
    version     BIGINT NOT NULL,   -- 1 on the first edit, +1 on each later one
    updated_at  BIGINT NOT NULL,
    updated_by  TEXT NOT NULL      -- `key:<short id>` or `user:<id>`, never a credential
);

CREATE TABLE IF NOT EXISTS audit_log (
    id      TEXT PRIMARY KEY,
    at      BIGINT NOT NULL,
    actor   TEXT NOT NULL,
    action  TEXT NOT NULL,
    target  TEXT,
    detail  TEXT                   -- JSON
);

CREATE INDEX IF NOT EXISTS audit_log_at ON audit_log (at);
