-- Subscriptions: each one's checkpoint (a position in the global log, by commit then position),
-- and the events it parked in the dead-letter queue. Parked rows point at the stored event by id
-- rather than copying it.
CREATE TABLE subscription_checkpoints (
    subscription    text        PRIMARY KEY,
    commit_id       bigint      NOT NULL,
    global_position bigint      NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE dead_letters (
    subscription text        NOT NULL,
    event_id     uuid        NOT NULL,
    error        text        NOT NULL,
    attempts     integer     NOT NULL,
    parked_at    timestamptz NOT NULL,
    PRIMARY KEY (subscription, event_id)
);
