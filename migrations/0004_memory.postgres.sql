-- Long-term memory per user and character (src/memory/), Postgres: the columns of the SQLite
-- twin (0004_memory.sqlite.sql) plus a generated tsvector (English stemming and stop words) with
-- a GIN index for lexical recall (ts_rank). The pgvector column `embedding` is added at start by
-- src/memory/store.rs when an embeddings server is configured (CREATE EXTENSION vector), so a
-- server without pgvector still runs the offline default.

CREATE TABLE IF NOT EXISTS memories (
    id            TEXT PRIMARY KEY,
    user_id       TEXT NOT NULL,
    character_id  TEXT NOT NULL,
    kind          TEXT NOT NULL,
    text          TEXT NOT NULL,
    session_id    TEXT,
    api_key_id    TEXT,
    created_at    BIGINT NOT NULL,
    tsv           tsvector GENERATED ALWAYS AS (to_tsvector('english', text)) STORED
);

CREATE INDEX IF NOT EXISTS memories_owner ON memories (user_id, character_id, created_at);
CREATE INDEX IF NOT EXISTS memories_tsv ON memories USING gin (tsv);
