-- The latest snapshot of each stream, with the aggregate's snapshot schema version so a changed
-- aggregate can ignore stale snapshots.
CREATE TABLE snapshots (
    stream_id      text        PRIMARY KEY,
    stream_version bigint      NOT NULL CHECK (stream_version >= 0),
    schema_version integer     NOT NULL,
    state          jsonb       NOT NULL,
    taken_at       timestamptz NOT NULL
);
