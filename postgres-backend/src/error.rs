//! The one place that turns PostgreSQL / sqlx failures into factum's error classes.
//!
//! Nothing else in the crate looks at SQLSTATE codes: callers get a [`Failure`] and decide with
//! its variant.

use factum::Error;

/// What a failed statement means for the caller.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The server rolled the transaction back (or refused it) and nothing was stored: retrying
    /// the whole operation may succeed.
    Transient(sqlx::Error),
    /// The connection broke (or timed out) while a write was in flight: it may have committed.
    UnknownOutcome(sqlx::Error),
    /// A unique violation on the (stream_id, stream_version) index: another writer won.
    VersionConflict(sqlx::Error),
    /// A unique violation on the event_id index: some id of the batch is already stored.
    DuplicateEventId(sqlx::Error),
    /// A unique violation on the idempotency key: a concurrent append stored the key first.
    KeyTaken(sqlx::Error),
    /// Anything else: retrying will not help.
    Permanent(sqlx::Error),
}

/// Whether the failed statement may have changed data, which decides what a lost connection means.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Op {
    /// A read: a lost connection just means "try again".
    Read,
    /// A write: a lost connection after it was sent leaves the outcome unknown.
    Write,
}

/// Index-name suffixes of the per-partition unique indexes (see the migrations).
const VERSION_INDEX_SUFFIX: &str = "_stream_version_uq";
const EVENT_ID_INDEX_SUFFIX: &str = "_event_id_uq";
/// The primary key of the idempotency keys (migration 0004).
const IDEMPOTENCY_KEY_INDEX: &str = "idempotency_keys_pkey";

/// Classifies a sqlx error. The only function in the crate that reads SQLSTATE codes.
pub(crate) fn classify(error: sqlx::Error, op: Op) -> Failure {
    let lost_connection = |error| match op {
        Op::Read => Failure::Transient(error),
        Op::Write => Failure::UnknownOutcome(error),
    };
    match &error {
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            match code.as_str() {
                // unique_violation: which index decides what it means.
                "23505" => {
                    let constraint = db.constraint().unwrap_or_default();
                    if constraint.ends_with(VERSION_INDEX_SUFFIX) {
                        Failure::VersionConflict(error)
                    } else if constraint.ends_with(EVENT_ID_INDEX_SUFFIX) {
                        Failure::DuplicateEventId(error)
                    } else if constraint == IDEMPOTENCY_KEY_INDEX {
                        Failure::KeyTaken(error)
                    } else {
                        Failure::Permanent(error)
                    }
                }
                // transaction_rollback (serialization_failure 40001, deadlock 40P01, 40000...),
                // insufficient resources (53xxx), lock_not_available, cannot_connect_now.
                c if c.starts_with("40") || c.starts_with("53") => Failure::Transient(error),
                "55P03" | "57P03" => Failure::Transient(error),
                // query_canceled: statement_timeout, or a cancel request. The statement was
                // rolled back by the server, which told us so: nothing was stored.
                "57014" => Failure::Transient(error),
                // connection exceptions, admin/crash shutdown: the session is gone mid-request.
                c if c.starts_with("08") || c == "57P01" || c == "57P02" => lost_connection(error),
                _ => Failure::Permanent(error),
            }
        }
        // Nothing was sent: no connection could be had.
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => Failure::Transient(error),
        sqlx::Error::Io(_) | sqlx::Error::WorkerCrashed | sqlx::Error::Protocol(_) => {
            lost_connection(error)
        }
        _ => Failure::Permanent(error),
    }
}

impl Failure {
    /// The sqlx error inside.
    pub(crate) fn into_source(self) -> sqlx::Error {
        match self {
            Failure::Transient(e)
            | Failure::UnknownOutcome(e)
            | Failure::VersionConflict(e)
            | Failure::DuplicateEventId(e)
            | Failure::KeyTaken(e)
            | Failure::Permanent(e) => e,
        }
    }
}

/// Maps a read failure (or a write failure the caller has no better context for) to
/// [`factum::Error`].
pub(crate) fn to_error(error: sqlx::Error, operation: &'static str) -> Error {
    match classify(error, Op::Read) {
        Failure::Transient(e) | Failure::UnknownOutcome(e) => Error::transient(operation, e),
        other => Error::permanent(operation, other.into_source()),
    }
}

/// The event log holds transaction ids at or above the cluster's next one, so the gap-safe read
/// order cannot be trusted: the typical cause is a logical restore (`pg_dump` / `pg_restore`)
/// into another cluster, whose transaction counter is behind the one that wrote the events.
///
/// Readers of the global log only return events written by transactions older than the oldest
/// one in flight; restored ids lie ahead of every id the new cluster has used, so every stored
/// event would stay invisible, and new appends (with the new cluster's smaller ids) would sort
/// before them. The store refuses instead: [`PostgresStore::connect`](crate::PostgresStore::connect),
/// [`migrate`](crate::PostgresStore::migrate), [`health`](crate::PostgresStore::health),
/// [`head`](factum::EventStore::head) and [`read_all`](factum::EventStore::read_all) (and so
/// every subscription and projection runner) fail with a [`factum::Error::Permanent`] whose
/// source is this error. Repair once with
/// [`PostgresStore::repair_after_restore`](crate::PostgresStore::repair_after_restore), with no
/// writer running.
///
/// Find it in an error with [`RestoreRepairNeeded::find`].
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
#[non_exhaustive]
#[error(
    "the event log in schema `{schema}` holds transaction ids up to {newest_stored}, but this cluster's next transaction id is {next_transaction}: the database was restored from a logical backup (pg_dump/pg_restore) or copied from another cluster, and in the gap-safe log order every stored event would stay hidden and new appends would sort before them; nothing was read. Stop the writers and run `PostgresStore::repair_after_restore` once (see the book's \"Backup and restore\" chapter)"
)]
pub struct RestoreRepairNeeded {
    /// The store's schema.
    pub schema: String,
    /// The highest transaction id stored in `events`.
    pub newest_stored: u64,
    /// The cluster's next transaction id when it was checked.
    pub next_transaction: u64,
}

impl RestoreRepairNeeded {
    /// The `RestoreRepairNeeded` in `error`'s source chain, if any.
    ///
    /// ```
    /// # fn check(error: &factum::Error) {
    /// use factum_postgres::RestoreRepairNeeded;
    ///
    /// if let Some(restored) = RestoreRepairNeeded::find(error) {
    ///     eprintln!("run the restore repair: {restored}");
    /// }
    /// # }
    /// ```
    pub fn find(error: &Error) -> Option<&RestoreRepairNeeded> {
        let mut source = std::error::Error::source(error);
        while let Some(cause) = source {
            if let Some(found) = cause.downcast_ref::<RestoreRepairNeeded>() {
                return Some(found);
            }
            source = cause.source();
        }
        None
    }

    /// This as a [`factum::Error`]: permanent (retrying will not help), for `operation`.
    pub(crate) fn into_error(self, operation: &'static str) -> Error {
        Error::permanent(operation, self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_are_transient_on_reads_and_unknown_on_writes() {
        let io = || sqlx::Error::Io(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "gone"));
        assert!(matches!(classify(io(), Op::Read), Failure::Transient(_)));
        assert!(matches!(
            classify(io(), Op::Write),
            Failure::UnknownOutcome(_)
        ));
        assert!(matches!(
            classify(sqlx::Error::PoolTimedOut, Op::Write),
            Failure::Transient(_)
        ));
        assert!(matches!(
            classify(sqlx::Error::RowNotFound, Op::Read),
            Failure::Permanent(_)
        ));
    }
}
