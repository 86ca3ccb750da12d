//! The transactional checkpoint: the capability a backend gives the consumer loop so that a
//! batch's effects, its checkpoint and its parked events commit together.

use std::future::Future;

use crate::error::Error;
use crate::ids::LogPosition;

use super::store::{CheckpointStore, DeadLetterStore, ParkedEvent};

/// What [`TransactionalCheckpoint::begin`] found.
#[derive(Debug)]
pub enum Begun<Tx> {
    /// The checkpoint is where the consumer left it: handle the batch in this transaction.
    Ready(Tx),
    /// The checkpoint is not where the consumer left it (another instance moved it, a rebuild
    /// swapped its tables in, an operator rewound it, or a commit whose acknowledgement was lost
    /// landed after all): the consumer resumes from this stored position.
    Moved(LogPosition),
}

/// Units of work in which a consumer's handler writes, its checkpoint moves and failing events
/// are parked, all or nothing: the part of the consumer loop a backend supplies.
///
/// The loop (one for every consumer, in [`Subscription`](super::Subscription)) calls, per batch:
/// [`begin`](Self::begin) (which checks the checkpoint is where the loop left it), the handler
/// with the transaction, maybe [`park`](Self::park), then [`commit`](Self::commit) with the new
/// position, or [`rollback`](Self::rollback).
///
/// * [`StoreCheckpoints`] is the trivial implementation over any [`CheckpointStore`] and
///   [`DeadLetterStore`] (the in-memory backend, or a plain subscription on any backend): its
///   transaction is `()`, the checkpoint is saved at commit, so delivery is at least once.
/// * `factum_postgres::subscription::PgCheckpoints` opens a PostgreSQL transaction that locks
///   the checkpoint row: a handler writing on it applies each event exactly once, even with
///   several instances.
pub trait TransactionalCheckpoint: Send + Sync {
    /// The unit of work the handler writes in.
    type Tx: Send;

    /// The stored checkpoint of consumer `name`, if any.
    fn load(&self, name: &str) -> impl Future<Output = Result<Option<LogPosition>, Error>> + Send;

    /// Stores `position` as the checkpoint of `name`, whatever it was (where a consumer starts
    /// when its start mode overrides the checkpoint, or when it has none).
    fn reset(
        &self,
        name: &str,
        position: LogPosition,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// Opens a unit of work for consumer `name`, whose checkpoint the loop expects at
    /// `expected`.
    fn begin(
        &self,
        name: &str,
        expected: LogPosition,
    ) -> impl Future<Output = Result<Begun<Self::Tx>, Error>> + Send;

    /// Parks an event within the unit of work.
    fn park(
        &self,
        tx: &mut Self::Tx,
        parked: ParkedEvent,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// Moves the checkpoint of `name` to `position` and commits the unit of work.
    fn commit(
        &self,
        tx: Self::Tx,
        name: &str,
        position: LogPosition,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// Abandons the unit of work (nothing of it is kept, where the backend can undo it).
    fn rollback(&self, tx: Self::Tx) -> impl Future<Output = ()> + Send;
}

/// The trivial [`TransactionalCheckpoint`] over a store's [`CheckpointStore`] and
/// [`DeadLetterStore`]: no transaction (`Tx = ()`); parking writes the dead letter at once and
/// commit saves the checkpoint. What [`Subscription::new`](super::Subscription::new) uses.
///
/// The handler's effects and the checkpoint are not atomic: after a crash, the events since the
/// last checkpoint are handed over again (at-least-once delivery; handlers dedupe by event id).
#[derive(Clone, Debug)]
pub struct StoreCheckpoints<S> {
    store: S,
}

impl<S> StoreCheckpoints<S> {
    /// Checkpoints and dead letters in `store`.
    pub fn new(store: S) -> Self {
        Self { store }
    }
}

impl<S: CheckpointStore + DeadLetterStore> TransactionalCheckpoint for StoreCheckpoints<S> {
    type Tx = ();

    fn load(&self, name: &str) -> impl Future<Output = Result<Option<LogPosition>, Error>> + Send {
        self.store.load_checkpoint(name)
    }

    fn reset(
        &self,
        name: &str,
        position: LogPosition,
    ) -> impl Future<Output = Result<(), Error>> + Send {
        self.store.save_checkpoint(name, position)
    }

    fn begin(
        &self,
        _name: &str,
        _expected: LogPosition,
    ) -> impl Future<Output = Result<Begun<()>, Error>> + Send {
        std::future::ready(Ok(Begun::Ready(())))
    }

    fn park(
        &self,
        _tx: &mut (),
        parked: ParkedEvent,
    ) -> impl Future<Output = Result<(), Error>> + Send {
        self.store.park(parked)
    }

    fn commit(
        &self,
        _tx: (),
        name: &str,
        position: LogPosition,
    ) -> impl Future<Output = Result<(), Error>> + Send {
        self.store.save_checkpoint(name, position)
    }

    fn rollback(&self, _tx: ()) -> impl Future<Output = ()> + Send {
        std::future::ready(())
    }
}
