//! The bank account on cqrs-es + postgres-es: the same commands, events and state as
//! `bank::Account`, in the shape cqrs-es wants (serialisable state, async `handle`).

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

/// postgres-es's own schema (its `db/init.sql`), in the bench database's `public` schema.
pub(crate) const SCHEMA: &str = "CREATE TABLE public.events (
    aggregate_type text NOT NULL,
    aggregate_id   text NOT NULL,
    sequence       bigint CHECK (sequence >= 0) NOT NULL,
    event_type     text NOT NULL,
    event_version  text NOT NULL,
    payload        json NOT NULL,
    metadata       json NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
);
CREATE TABLE public.snapshots (
    aggregate_type   text NOT NULL,
    aggregate_id     text NOT NULL,
    last_sequence    bigint CHECK (last_sequence >= 0) NOT NULL,
    current_snapshot bigint CHECK (current_snapshot >= 0) NOT NULL,
    payload          json NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, last_sequence)
);";

#[derive(Default, Serialize, Deserialize)]
pub(crate) struct PeerAccount {
    open: bool,
    owner: String,
    pub(crate) balance: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) enum PeerEvent {
    Opened { owner: String },
    Deposited { amount: u64 },
}

impl DomainEvent for PeerEvent {
    fn event_type(&self) -> String {
        match self {
            PeerEvent::Opened { .. } => "Opened".into(),
            PeerEvent::Deposited { .. } => "Deposited".into(),
        }
    }
    fn event_version(&self) -> String {
        "1.0".into()
    }
}

pub(crate) enum PeerCommand {
    Open { owner: String },
    Deposit { amount: u64 },
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum PeerError {
    #[error("the account is already open")]
    AlreadyOpen,
    #[error("the account has not been opened")]
    NotOpen,
}

impl Aggregate for PeerAccount {
    const TYPE: &'static str = "account";
    type Command = PeerCommand;
    type Event = PeerEvent;
    type Error = PeerError;
    type Services = ();

    async fn handle(
        &mut self,
        command: PeerCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), PeerError> {
        match command {
            PeerCommand::Open { owner } if !self.open => {
                sink.write(PeerEvent::Opened { owner }, self).await;
            }
            PeerCommand::Open { .. } => return Err(PeerError::AlreadyOpen),
            PeerCommand::Deposit { .. } if !self.open => return Err(PeerError::NotOpen),
            PeerCommand::Deposit { amount } => {
                sink.write(PeerEvent::Deposited { amount }, self).await;
            }
        }
        Ok(())
    }

    fn apply(&mut self, event: PeerEvent) {
        match event {
            PeerEvent::Opened { owner } => {
                self.open = true;
                self.owner = owner;
            }
            PeerEvent::Deposited { amount } => self.balance += amount,
        }
    }
}
