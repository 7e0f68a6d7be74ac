-- One schema for SQLite and Postgres: portable types only (TEXT, BIGINT), times as unix
-- milliseconds, booleans as 0/1, JSON as TEXT. Applied by src/store/sql.rs at start.

CREATE TABLE IF NOT EXISTS characters (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    language    TEXT NOT NULL,
    voice       TEXT NOT NULL,
    persona     TEXT NOT NULL,
    avatar      TEXT,
    provider    TEXT,
    updated_at  BIGINT NOT NULL
);

CREATE TABLE IF NOT EXISTS sessions (
    id            TEXT PRIMARY KEY,
    character_id  TEXT NOT NULL,
    provider      TEXT NOT NULL,
    user_id       TEXT,
    api_key_id    TEXT,
    node_id       TEXT NOT NULL,
    state         TEXT NOT NULL,
    end_reason    TEXT,
    created_at    BIGINT NOT NULL,
    connected_at  BIGINT,
    ended_at      BIGINT
);

CREATE INDEX IF NOT EXISTS sessions_node_state ON sessions (node_id, state);
CREATE INDEX IF NOT EXISTS sessions_user ON sessions (user_id);

CREATE TABLE IF NOT EXISTS turns (
    session_id   TEXT NOT NULL,
    seq          BIGINT NOT NULL,
    role         TEXT NOT NULL,
    text         TEXT NOT NULL,
    interrupted  BIGINT NOT NULL DEFAULT 0,
    started_at   BIGINT,
    ended_at     BIGINT NOT NULL,
    tool_calls   TEXT,
    PRIMARY KEY (session_id, seq)
);
