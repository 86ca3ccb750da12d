-- Sagas: their instances, the commands they decided and have not dispatched yet, and their
-- timeouts. An instance's state is not here: it is the stream of its changes in `events`
-- (`{saga}-{key}`), appended in the same transaction as the rows below.
--
-- `saga_instances` has one row per instance. Every unit of work on an instance (a reaction to an
-- event, a dispatch, a fired timeout) locks its row first, so reactions to one instance never
-- interleave, and always before a command or timeout row (one lock order: no deadlocks). An
-- instance whose command keeps failing is parked here; its queue waits until it is retried.
CREATE TABLE saga_instances (
    saga         text        NOT NULL,
    key          text        NOT NULL,
    parked_error text,
    parked_at    timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (saga, key)
);

CREATE INDEX saga_instances_parked ON saga_instances (saga, parked_at) WHERE parked_error IS NOT NULL;

-- The outbox: commands decided and stored with the decision, dispatched afterwards (each removed
-- in the same transaction as its effect), in each instance's order. Ids are derived from what
-- caused the command, so a decision made again queues nothing twice.
CREATE TABLE saga_commands (
    command_id     uuid        PRIMARY KEY,
    saga           text        NOT NULL,
    key            text        NOT NULL,
    sequence       bigint      GENERATED ALWAYS AS IDENTITY,
    target         text        NOT NULL,
    command_name   text        NOT NULL,
    aggregate_id   text        NOT NULL,
    payload        jsonb       NOT NULL,
    correlation_id uuid        NOT NULL,
    causation_id   uuid,
    attempts       integer     NOT NULL DEFAULT 0,
    due_at         timestamptz NOT NULL,
    last_error     text,
    queued_at      timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX saga_commands_queue ON saga_commands (saga, key, sequence);

-- Durable timeouts: one per instance and name (scheduling again replaces it), removed in the
-- transaction of the reaction to it, so each fires once. Due times come from the runtime's
-- clock, not the database's.
CREATE TABLE saga_timeouts (
    saga           text        NOT NULL,
    key            text        NOT NULL,
    name           text        NOT NULL,
    id             uuid        NOT NULL UNIQUE,
    due_at         timestamptz NOT NULL,
    payload        jsonb       NOT NULL,
    correlation_id uuid        NOT NULL,
    PRIMARY KEY (saga, key, name)
);

CREATE INDEX saga_timeouts_due ON saga_timeouts (saga, due_at);
