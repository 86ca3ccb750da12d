-- Idempotency keys of appends.
--
-- A keyed append inserts its key here in the same statement that inserts its events, so the key
-- and the batch commit together or not at all. A later append with the same key stores nothing and
-- returns the original outcome: the batch is the key's stream after `first_version`, its
-- `event_count` events (their positions and ids are read from `events` when a repeat needs them,
-- which keeps the row, and so every keyed append, small).
-- Keys stay until an operator's retention call removes them (`expire_idempotency_keys`).

CREATE TABLE idempotency_keys (
    key           text        PRIMARY KEY,
    stream_id     text        NOT NULL,
    first_version bigint      NOT NULL CHECK (first_version >= 0),
    event_count   integer     NOT NULL CHECK (event_count > 0),
    stored_at     timestamptz NOT NULL DEFAULT now()
);

-- Retention deletes by age. Keys arrive in time order, so a BRIN index finds old ones at almost
-- no cost per insert (a btree here cost a second index insert on every keyed append).
CREATE INDEX idempotency_keys_stored_at ON idempotency_keys USING brin (stored_at);
