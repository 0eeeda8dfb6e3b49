-- shindensen schema, version 2: group chats, members with roles and read
-- markers, timeline events.
--
-- `chats` is rebuilt (SQLite cannot drop NOT NULL), which SQLite allows
-- only with foreign-key enforcement off: shindensen runs its migrations on
-- a connection opened that way (`shindensen migrate`, or at start-up) and
-- checks every foreign key afterwards. Everything here runs in one
-- transaction, so a v1 database is upgraded completely or not at all.

CREATE TABLE chats_v2 (
    id         INTEGER PRIMARY KEY,
    kind       TEXT    NOT NULL CHECK (kind IN ('direct', 'group')),
    -- Groups only: 1-100 characters (checked by the server).
    title      TEXT,
    -- Direct chats only: the ordered pair, unique, so concurrent initiates
    -- by either side can never create two chats for one pair.
    user_a     INTEGER REFERENCES users (id),
    user_b     INTEGER REFERENCES users (id),
    created_at INTEGER NOT NULL,
    CHECK ((kind = 'direct') = (user_a IS NOT NULL AND user_b IS NOT NULL)),
    CHECK ((kind = 'group') = (title IS NOT NULL)),
    CHECK (user_a < user_b),
    UNIQUE (user_a, user_b)
) STRICT;

INSERT INTO chats_v2 (id, kind, title, user_a, user_b, created_at)
    SELECT id, 'direct', NULL, user_a, user_b, created_at FROM chats;
DROP TABLE chats;
ALTER TABLE chats_v2 RENAME TO chats;

-- Who is in each chat now. The row id is the join order: the
-- longest-standing member has the smallest id. A member who leaves is
-- deleted (a later return is a new row).
CREATE TABLE chat_members (
    id           INTEGER PRIMARY KEY,
    chat_id      INTEGER NOT NULL REFERENCES chats (id),
    user_id      INTEGER NOT NULL REFERENCES users (id),
    role         TEXT    NOT NULL CHECK (role IN ('admin', 'member')),
    -- Read marker: the highest message id the member has read; only grows.
    last_read_id INTEGER NOT NULL DEFAULT 0,
    UNIQUE (chat_id, user_id)
) STRICT;

CREATE INDEX chat_members_by_user ON chat_members (user_id, chat_id);

INSERT INTO chat_members (chat_id, user_id, role)
    SELECT id, user_a, 'member' FROM chats
    UNION ALL
    SELECT id, user_b, 'member' FROM chats
    ORDER BY 1, 2;

-- Timeline events are messages too (same id sequence): `kind` says which,
-- `event` holds the details as JSON, `subject_id` is the user a member
-- event is about (so resume can find the removals of a user).
ALTER TABLE messages ADD COLUMN kind TEXT NOT NULL DEFAULT 'text'
    CHECK (kind IN ('text', 'chat_created', 'member_added', 'member_removed',
                    'role_changed', 'title_changed'));
ALTER TABLE messages ADD COLUMN event TEXT;
ALTER TABLE messages ADD COLUMN subject_id INTEGER REFERENCES users (id);

CREATE INDEX messages_removals ON messages (subject_id, id)
    WHERE kind = 'member_removed';
