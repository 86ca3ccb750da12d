//! How Redis failures become factum's [`Error`]s, and the sink's own failures.

use factum::Error;
use redis::{ErrorKind, RedisError, ServerErrorKind};

/// What went wrong in a unit of work on Redis, beyond the client's own errors. It is the source
/// of the [`factum::Error`] returned, so callers can downcast to it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SinkError {
    /// A watched key changed between `begin` and `EXEC` (the consumer's checkpoint moved:
    /// another instance committed first, or an operator reset it; or a key the handler
    /// [watched](crate::RedisTx::watch) changed). Nothing of the unit of work was applied; the
    /// consumer resumes from the stored checkpoint. Transient.
    #[error(
        "{what} changed while the unit of work was open (another instance committed first, or it was reset): nothing was applied; the consumer resumes from the stored checkpoint"
    )]
    Moved {
        /// The key (or keys) that changed, e.g. `checkpoint "orders:factum:checkpoint:feeds"`.
        what: String,
    },
    /// Redis refused a command of the unit of work when it was queued (a syntax or arity error,
    /// out of memory): nothing was applied. Permanent: fix the handler's command.
    #[error(
        "Redis refused command {index} ({command}) of the unit of work: {message}; nothing was applied"
    )]
    Refused {
        /// Its index among the unit of work's commands (from 0).
        index: usize,
        /// Its name.
        command: String,
        /// Redis's error.
        message: String,
    },
    /// A command failed when `EXEC` ran it (typically `WRONGTYPE`: a key of another type).
    /// Redis does not roll back: the other commands and the checkpoint move **were applied**.
    /// Permanent: the read model needs repair (or a rebuild) for this key.
    #[error(
        "command {index} ({command}) failed inside EXEC: {message}; Redis applied the other commands and moved the checkpoint (it does not roll back): repair or rebuild the read model's key"
    )]
    FailedInExec {
        /// Its index among the unit of work's commands (from 0).
        index: usize,
        /// Its name.
        command: String,
        /// Redis's error.
        message: String,
    },
    /// The connection failed after `EXEC` was sent: the unit of work may or may not have been
    /// applied. Transient: the next unit of work's checkpoint check settles it (a checkpoint
    /// already moved is reported as moved, and nothing is applied twice).
    #[error(
        "the outcome of EXEC is unknown (the connection failed after it was sent): the next unit of work's checkpoint check settles it"
    )]
    UnknownOutcome {
        /// The client's error.
        #[source]
        source: RedisError,
    },
    /// A stored value factum wrote (a checkpoint, a dead letter) is not in the format it writes:
    /// it was changed outside factum.
    #[error(
        "{key} holds {found:?}, which is not {expected}: it was changed outside factum; repair or delete it"
    )]
    Corrupt {
        /// The key.
        key: String,
        /// What it holds (cut to 200 characters).
        found: String,
        /// What factum expects there.
        expected: &'static str,
    },
}

/// Whether the client's error may pass on a retry: the connection (refused, dropped, timed out),
/// or a server that is loading, failing over or read-only for now.
pub(crate) fn is_transient(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || matches!(
            error.kind(),
            ErrorKind::Server(
                ServerErrorKind::BusyLoading
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::ClusterDown
                    | ServerErrorKind::ReadOnly
            )
        )
}

/// The client's error as factum's, classified once.
pub(crate) fn to_error(error: RedisError, operation: &'static str) -> Error {
    if is_transient(&error) {
        Error::transient(operation, error)
    } else {
        Error::permanent(operation, error)
    }
}

pub(crate) fn sink_error(error: SinkError, operation: &'static str) -> Error {
    match error {
        SinkError::Moved { .. } | SinkError::UnknownOutcome { .. } => {
            Error::transient(operation, error)
        }
        SinkError::Refused { .. } | SinkError::FailedInExec { .. } | SinkError::Corrupt { .. } => {
            Error::permanent(operation, error)
        }
    }
}

pub(crate) fn corrupt(key: &str, found: &[u8], expected: &'static str) -> Error {
    let found: String = String::from_utf8_lossy(found).chars().take(200).collect();
    sink_error(
        SinkError::Corrupt {
            key: key.to_owned(),
            found,
            expected,
        },
        "read a stored value",
    )
}
