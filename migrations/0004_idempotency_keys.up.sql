-- Idempotency keys of appends.
--
-- A keyed append inserts its key here in the same statement that inserts its events, so the key
-- and the batch commit together or not at all. A later append with the same key stores nothing and
-- returns the outcome recorded here: the stream, the version before the batch, the batch's global
-- positions (in batch order) and its event ids (to tell a repeat from a different batch).
-- Keys stay until an operator's retention call removes them (`expire_idempotency_keys`).

CREATE TABLE idempotency_keys (
    key           text        PRIMARY KEY,
    stream_id     text        NOT NULL,
    first_version bigint      NOT NULL CHECK (first_version >= 0),
    positions     bigint[]    NOT NULL,
    event_ids     uuid[]      NOT NULL,
    stored_at     timestamptz NOT NULL DEFAULT now()
);

-- Retention deletes by age. Keys arrive in time order, so a BRIN index finds old ones at almost
-- no cost per insert (a btree here cost a second index insert on every keyed append).
CREATE INDEX idempotency_keys_stored_at ON idempotency_keys USING brin (stored_at);
