//! The lease that lets one runner of a projection work at a time: a session-level advisory lock
//! on a connection of its own.
//!
//! The connection is opened outside the pool on purpose: a pooled connection dropped by an
//! aborted task goes back to the pool with its session lock still held, while a dedicated
//! connection closes, and the server releases the lock with the session.

use factum::Error;
use sqlx::{Connection, PgConnection, PgPool};

use crate::error::to_error;

/// The first key of the two-key advisory lock: factum's projection leases, apart from any other
/// advisory lock the application takes.
const LEASE_SQL: &str = "SELECT pg_try_advisory_lock(hashtext('factum.projection'), hashtext($1))";

/// A held lease. Dropping it closes the connection, which releases the lock.
#[derive(Debug)]
pub(crate) struct Lease {
    conn: PgConnection,
}

/// Tries to take the lease `key`, reusing `spare` (a connection from an earlier failed try).
pub(crate) async fn try_acquire(
    pool: &PgPool,
    key: &str,
    spare: &mut Option<PgConnection>,
) -> Result<Option<Lease>, Error> {
    let mut conn = match spare.take() {
        Some(conn) => conn,
        None => PgConnection::connect_with(&pool.connect_options())
            .await
            .map_err(|e| to_error(e, "connect for the projection lease"))?,
    };
    let taken: bool = match sqlx::query_scalar(sqlx::AssertSqlSafe(LEASE_SQL))
        .bind(key)
        .fetch_one(&mut conn)
        .await
    {
        Ok(taken) => taken,
        // The connection may be broken: drop it, the next try opens a new one.
        Err(e) => return Err(to_error(e, "take the projection lease")),
    };
    if taken {
        Ok(Some(Lease { conn }))
    } else {
        *spare = Some(conn);
        Ok(None)
    }
}

impl Lease {
    /// Whether the lease's connection (and so the lock) is still alive.
    pub(crate) async fn is_held(&mut self) -> bool {
        self.conn.ping().await.is_ok()
    }
}
