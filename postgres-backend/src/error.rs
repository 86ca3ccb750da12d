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
