-- Long-term memory per user and character (src/memory/), SQLite: the memories, and an FTS5
-- index of their text for lexical recall (bm25), kept in step by triggers. Embeddings, when an
-- embeddings server is configured, are little-endian f32 blobs ranked by cosine in the server.
-- The Postgres twin is 0004_memory.postgres.sql (same columns; tsvector + pgvector).

CREATE TABLE IF NOT EXISTS memories (
    id            TEXT PRIMARY KEY,
    user_id       TEXT NOT NULL,
    character_id  TEXT NOT NULL,
    kind          TEXT NOT NULL,      -- fact | preference | thread
    text          TEXT NOT NULL,
    session_id    TEXT,               -- the session it was learnt in
    api_key_id    TEXT,               -- short id of the key that created that session (privacy scope)
    created_at    BIGINT NOT NULL,
    embedding     BLOB
);

CREATE INDEX IF NOT EXISTS memories_owner ON memories (user_id, character_id, created_at);

CREATE VIRTUAL TABLE IF NOT EXISTS memories_fts USING fts5(id UNINDEXED, text, tokenize = 'porter unicode61');

CREATE TRIGGER IF NOT EXISTS memories_fts_insert AFTER INSERT ON memories BEGIN
    INSERT INTO memories_fts (id, text) VALUES (new.id, new.text);
END;

CREATE TRIGGER IF NOT EXISTS memories_fts_delete AFTER DELETE ON memories BEGIN
    DELETE FROM memories_fts WHERE id = old.id;
END;
