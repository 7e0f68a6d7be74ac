-- Moderation policies and their allow/deny lists, versioned (src/moderation/policies.rs,
-- /v1/admin/policies): one row per version, never updated; the newest row of an id is in force
-- (spec NULL: deleted). Flags name whose text they hold (agent reply or user input).

CREATE TABLE IF NOT EXISTS moderation_policies (
    id          TEXT NOT NULL,
    version     BIGINT NOT NULL,   -- 1 on the first store, +1 on each later change
    spec        TEXT,              -- the policy as JSON (ModerationSettings); NULL: deleted
    created_at  BIGINT NOT NULL,
    created_by  TEXT NOT NULL,     -- `key:<short id>` or `user:<id>`, never a credential
    PRIMARY KEY (id, version)
);

ALTER TABLE moderation_flags ADD COLUMN source TEXT NOT NULL DEFAULT 'agent';
