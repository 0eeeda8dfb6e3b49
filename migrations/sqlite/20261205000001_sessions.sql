-- Sessions (API "Sessions"): every account has a random token key, carried
-- by each token it is issued and compared on every request, so a token
-- never authenticates as an account created later with the same id (after
-- a restore), and a password change (a new key) revokes every earlier
-- token. Single tokens are revoked by id (`jti`) until they expire.
ALTER TABLE users ADD COLUMN token_key TEXT NOT NULL DEFAULT '';
UPDATE users SET token_key = lower(hex(randomblob(16)));

CREATE TABLE revoked_tokens (
    jti        TEXT    PRIMARY KEY,
    -- Unix seconds: the token's own expiry, after which the row can go.
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;
