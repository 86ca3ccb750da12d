-- Personal data that can be forgotten (crypto-shredding, `factum_postgres::PgKeyStore`).
--
-- One row per data subject: its 256-bit key while it has one; `forgotten_at` once it was
-- forgotten, when the key is set to NULL for good. Forgetting and creating a key meet on the
-- primary key, so a key is never created again for a forgotten subject, however they interleave.
CREATE TABLE personal_keys (
    subject      text        PRIMARY KEY,
    key          bytea       CHECK (key IS NULL OR octet_length(key) = 32),
    created_at   timestamptz NOT NULL DEFAULT now(),
    forgotten_at timestamptz,
    CHECK ((key IS NULL) = (forgotten_at IS NOT NULL))
);

-- Which streams hold a subject's encrypted fields: the snapshots to discard when it is forgotten.
CREATE TABLE personal_streams (
    subject   text NOT NULL,
    stream_id text NOT NULL,
    PRIMARY KEY (subject, stream_id)
);
