-- Deleted streams: when a stream's events were deleted (`PostgresStore::delete_stream`). A
-- deleted stream is also archived, so it accepts no appends; its row stays, so its id and
-- versions are never reused, and its events are replaced in the log by one tombstone event
-- (`factum.stream_deleted`) at the next version.
ALTER TABLE streams ADD COLUMN deleted_at timestamptz;
