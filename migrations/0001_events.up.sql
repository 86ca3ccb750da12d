-- Streams and events.
--
-- The `streams` row is the version authority: an append bumps it only where the version matches,
-- in the same statement that inserts the batch. `events` is partitioned by RANGE of
-- global_position (not by time) so that the per-partition unique indexes can include the
-- partition key yet still enforce (stream_id, stream_version) and event_id uniqueness.

CREATE TABLE streams (
    stream_id   text    PRIMARY KEY,
    category    text    NOT NULL,
    version     bigint  NOT NULL CHECK (version >= 0),
    archived    boolean NOT NULL DEFAULT false
);

CREATE SEQUENCE events_global_position_seq AS bigint MINVALUE 1 START WITH 1;

CREATE TABLE events (
    global_position bigint      NOT NULL DEFAULT nextval('events_global_position_seq'),
    -- The writing transaction: readers of the global log order by (transaction_id,
    -- global_position) and only read below the oldest in-flight transaction (gap-safe).
    transaction_id  xid8        NOT NULL DEFAULT pg_current_xact_id(),
    stream_id       text        NOT NULL,
    stream_version  bigint      NOT NULL CHECK (stream_version >= 1),
    event_id        uuid        NOT NULL,
    event_type      text        NOT NULL,
    schema_version  integer     NOT NULL,
    payload         jsonb       NOT NULL,
    metadata        jsonb       NOT NULL DEFAULT '{}',
    correlation_id  uuid,
    causation_id    uuid,
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (global_position)
) PARTITION BY RANGE (global_position);

ALTER SEQUENCE events_global_position_seq OWNED BY events.global_position;

-- The global log's read order; created on the parent, so every partition gets one.
CREATE INDEX events_log_order ON events (transaction_id, global_position);

-- The first partition holds the first billion events; later ones are created ahead of need by a
-- maintenance task. The default partition catches anything beyond the last range so appends
-- never fail for lack of a partition.
CREATE TABLE events_p0 PARTITION OF events FOR VALUES FROM (MINVALUE) TO (1000000000);
CREATE UNIQUE INDEX events_p0_stream_version_uq ON events_p0 (stream_id, stream_version);
CREATE UNIQUE INDEX events_p0_event_id_uq ON events_p0 (event_id);

CREATE TABLE events_default PARTITION OF events DEFAULT;
CREATE UNIQUE INDEX events_default_stream_version_uq ON events_default (stream_id, stream_version);
CREATE UNIQUE INDEX events_default_event_id_uq ON events_default (event_id);
