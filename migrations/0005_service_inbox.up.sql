-- The service that owns this schema, and its inbox of messages from other services.
--
-- `service` holds one row: the name of the service whose store this is. A store opened for a
-- service checks it (and writes it on the first migration), so a service cannot write to another
-- service's tables by a wrong URL or schema.
--
-- `inbox` records, per inbound consumer, the event id of every message whose effect committed;
-- the row is inserted in the same transaction as the handler's effect, so a redelivered,
-- re-published or replayed message has no effect. Rows stay until a retention call removes them.
--
-- `inbox_dead_letters` keeps the messages an inbound consumer parked (undecodable, or failing
-- after its retries), as received, to be retried or discarded.

CREATE TABLE service (
    singleton  boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    name       text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE inbox (
    consumer   text        NOT NULL,
    event_id   uuid        NOT NULL,
    subject    text        NOT NULL,
    handled_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);

CREATE INDEX inbox_handled_at ON inbox USING brin (handled_at);

CREATE TABLE inbox_dead_letters (
    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    consumer   text        NOT NULL,
    subject    text        NOT NULL,
    message_id text,
    headers    jsonb       NOT NULL,
    body       bytea       NOT NULL,
    error      text        NOT NULL,
    attempts   integer     NOT NULL,
    parked_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX inbox_dead_letters_consumer ON inbox_dead_letters (consumer, id);

-- A message parked again (it arrived again and failed again) keeps one dead letter.
CREATE UNIQUE INDEX inbox_dead_letters_message ON inbox_dead_letters (consumer, message_id)
    WHERE message_id IS NOT NULL;
