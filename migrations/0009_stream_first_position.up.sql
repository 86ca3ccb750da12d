-- Stream reads that prune partitions. `events` is partitioned by global position, so a read by
-- stream id alone probes the (stream_id, stream_version) index of every partition. Each stream's
-- row now carries `first_position`, a lower bound of its events' global positions, and stream
-- reads add `global_position >= first_position` (from the row, in the same statement): the
-- partitions wholly below it are never scanned (run-time partition pruning).
--
-- A new row's bound is the position after the last one handed out when the row is inserted:
-- the stream's first event takes that value of the sequence or a later one. This holds because the
-- sequence hands out values in order (CACHE 1, the default: a session-level cache would hand out
-- values below the last one another session saw). Existing rows get their first event's
-- position, or 0 (no pruning) when their first event is not in the log (detached or deleted).

ALTER TABLE streams ADD COLUMN first_position bigint;

UPDATE streams st SET first_position = COALESCE(
    (SELECT e.global_position FROM events e
     WHERE e.stream_id = st.stream_id AND e.stream_version = 1), 0);

ALTER TABLE streams ALTER COLUMN first_position
    SET DEFAULT COALESCE(pg_sequence_last_value('events_global_position_seq'::regclass) + 1, 0);
ALTER TABLE streams ALTER COLUMN first_position SET NOT NULL;
