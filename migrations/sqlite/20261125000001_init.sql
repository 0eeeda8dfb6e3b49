-- shindensen schema, version 1.
-- Timestamps are Unix epoch milliseconds (UTC); the API renders them as RFC 3339.
-- Constraints that the API promises live here, not only in code.

CREATE TABLE users (
    id            INTEGER PRIMARY KEY,
    -- Unique case-insensitively ("Alice" and "alice" are one account); the
    -- row keeps the spelling it was created with. Usernames are ASCII only,
    -- so SQLite's ASCII NOCASE collation is exact.
    username      TEXT    NOT NULL UNIQUE COLLATE NOCASE
                          CHECK (length(username) BETWEEN 1 AND 32),
    -- argon2id PHC string; NULL for accounts created in `open` auth mode
    -- without a password (they cannot log in in `password` mode).
    password_hash TEXT,
    created_at    INTEGER NOT NULL
) STRICT;

-- A direct chat between two users. The pair is stored ordered
-- (user_a < user_b) and unique, so concurrent initiates by either side can
-- never create two chats for one pair.
CREATE TABLE chats (
    id         INTEGER PRIMARY KEY,
    user_a     INTEGER NOT NULL REFERENCES users (id),
    user_b     INTEGER NOT NULL REFERENCES users (id),
    created_at INTEGER NOT NULL,
    CHECK (user_a < user_b),
    UNIQUE (user_a, user_b)
) STRICT;

CREATE INDEX chats_by_user_b ON chats (user_b);

-- Messages are never deleted, so rowid allocation (max(id) + 1 under the
-- single writer) makes ids grow in commit order.
CREATE TABLE messages (
    id            INTEGER PRIMARY KEY,
    chat_id       INTEGER NOT NULL REFERENCES chats (id),
    sender_id     INTEGER NOT NULL REFERENCES users (id),
    content       TEXT    NOT NULL,
    client_msg_id TEXT,
    created_at    INTEGER NOT NULL
) STRICT;

-- History pages and resume scans walk this index.
CREATE INDEX messages_by_chat ON messages (chat_id, id);

-- Idempotent sends: one message per (sender, client_msg_id).
CREATE UNIQUE INDEX messages_idempotency
    ON messages (sender_id, client_msg_id)
    WHERE client_msg_id IS NOT NULL;
