//! The repair after a logical restore: stored transaction ids moved below the new cluster's
//! horizon, in the original log order, with every checkpoint moved along.
//!
//! The global log is ordered by `(transaction_id, global_position)`, and a reader only returns
//! rows written by transactions older than the oldest one in flight. `pg_dump` copies the stored
//! transaction ids as they are; restored into another cluster, whose transaction counter is
//! behind the old one, they lie ahead of every id the new cluster hands out. The store detects
//! that ([`RestoreRepairNeeded`](crate::RestoreRepairNeeded)) and refuses to read; this module
//! repairs it.
//!
//! The repair gives every event a new transaction id below the horizon. Distinct old ids are not
//! kept: events that follow each other in log order with increasing global positions share one
//! new id (the log order inside one id is by global position), and a new id starts only where
//! the old order went back in global position (a transaction that took its positions earlier
//! but committed later). So the number of new ids is the number of such out-of-order commits
//! plus one, usually far below the new cluster's counter; when it is not, the repair first
//! consumes transaction ids until there is room.
//!
//! Events appended in the new cluster before the repair (their row's `xmin` is their own
//! transaction id, unlike restored rows, whose `xmin` is the restore's) are ordered after every
//! restored event, among themselves in their own order. Checkpoints are positions of the old
//! cluster: each one moves to the new position of the last restored event at or before it, so a
//! subscription resumes exactly where it stopped.

use factum::Error;

use crate::error::to_error;
use crate::store::PostgresStore;

/// The first normal transaction id: ids 0 to 2 are reserved by PostgreSQL.
const FIRST_NEW_ID: i64 = 3;

/// How many attempts the repair makes (each consumes transaction ids when the previous one found
/// no room below the horizon).
const ATTEMPTS: u32 = 3;

/// What [`PostgresStore::repair_after_restore`] did.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
#[non_exhaustive]
pub struct RestoreRepair {
    /// False when there was nothing to repair (no stored transaction id at or above the
    /// cluster's next one): nothing was changed.
    pub repaired: bool,
    /// Events whose transaction id was rewritten.
    pub events_rewritten: u64,
    /// Distinct transaction ids the log holds after the repair.
    pub commits: u64,
    /// Checkpoints (subscriptions, projections, rebuilds) moved to the new positions.
    pub checkpoints_moved: u64,
    /// Transaction ids consumed to make room below the horizon (0 when there was room).
    pub transaction_ids_consumed: u64,
}

impl PostgresStore {
    /// Repairs the event log after a logical restore (`pg_dump` / `pg_restore` into another
    /// cluster): rewrites the stored transaction ids so that they sort below the new cluster's
    /// horizon in the original log order, and moves every stored checkpoint (subscriptions,
    /// projections, rebuilds) to the same events' new positions, in one transaction.
    ///
    /// Run it once after the restore, **with no writer running** (it locks `events` and the
    /// checkpoints against writes for its duration; readers may go on and see the old ids until
    /// it commits). It does nothing when the log needs no repair, so running it twice is safe.
    /// Afterwards `ANALYZE` refreshes the planner's statistics of the rewritten column.
    ///
    /// Cost: one pass over the log and an update of every event (each row is rewritten), so plan
    /// for about the time of a bulk update of the table, plus the same again in WAL.
    ///
    /// See [`RestoreRepairNeeded`](crate::RestoreRepairNeeded) for why, and the book's
    /// "Backup and restore" chapter for the whole procedure.
    ///
    /// ```no_run
    /// # async fn repair(store: factum_postgres::PostgresStore) -> Result<(), factum::Error> {
    /// let repair = store.repair_after_restore().await?;
    /// println!(
    ///     "rewrote {} events into {} commits, moved {} checkpoints",
    ///     repair.events_rewritten, repair.commits, repair.checkpoints_moved
    /// );
    /// # Ok(())
    /// # }
    /// ```
    pub async fn repair_after_restore(&self) -> Result<RestoreRepair, Error> {
        let s = self.schema().quoted();
        let mut consumed = 0;
        for _ in 0..ATTEMPTS {
            match self.try_repair(&s).await? {
                Attempt::Done(mut repair) => {
                    if repair.repaired {
                        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("ANALYZE {s}.events")))
                            .execute(self.pool())
                            .await
                            .map_err(|e| to_error(e, "repair after restore (analyze)"))?;
                    }
                    repair.transaction_ids_consumed = consumed;
                    return Ok(repair);
                }
                Attempt::NoRoom { needed } => {
                    // Outside any transaction: each loop turn commits, and so takes an id.
                    let count = needed.saturating_add(1000);
                    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                        "DO $$ BEGIN FOR i IN 1..{count} LOOP \
                             PERFORM pg_current_xact_id(); COMMIT; \
                         END LOOP; END $$"
                    )))
                    .execute(self.pool())
                    .await
                    .map_err(|e| to_error(e, "repair after restore (consume transaction ids)"))?;
                    consumed += count;
                }
            }
        }
        Err(Error::permanent(
            "repair after restore",
            format!(
                "no room below the transaction horizon after {ATTEMPTS} attempts; is a long transaction holding the horizon back (see pg_stat_activity)? End it and run the repair again"
            ),
        ))
    }

    async fn try_repair(&self, s: &str) -> Result<Attempt, Error> {
        let err = |e| to_error(e, "repair after restore");
        let mut tx = crate::tx::begin(self.pool()).await.map_err(err)?;
        // Blocks appends and checkpoint writes (they take ROW EXCLUSIVE), lets plain reads on.
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "LOCK TABLE {s}.events, {s}.streams, {s}.subscription_checkpoints IN EXCLUSIVE MODE"
        )))
        .execute(&mut *tx)
        .await
        .map_err(err)?;
        let (newest, next): (Option<i64>, i64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT (SELECT n.transaction_id FROM {s}.events n \
                     ORDER BY n.transaction_id DESC LIMIT 1)::text::bigint, \
                 pg_snapshot_xmax(pg_current_snapshot())::text::bigint"
        )))
        .fetch_one(&mut *tx)
        .await
        .map_err(err)?;
        if newest.is_none_or(|newest| newest < next) {
            tx.rollback().await.map_err(err)?;
            return Ok(Attempt::Done(RestoreRepair::default()));
        }

        // The new id of each event: restored rows first (native = false), in their log order;
        // a new id wherever the global position goes back. `xmin` of a restored row is the
        // restoring transaction, never the row's own stored id (only its low 32 bits are kept).
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE TEMP TABLE factum_restore_map ON COMMIT DROP AS \
             SELECT global_position, old_id, native, \
                 {FIRST_NEW_ID} + sum(back) OVER (ORDER BY native, old_id, global_position \
                     ROWS UNBOUNDED PRECEDING) AS new_id \
             FROM ( \
                 SELECT global_position, old_id, native, \
                     CASE WHEN global_position < lag(global_position) \
                          OVER (ORDER BY native, old_id, global_position) THEN 1 ELSE 0 END AS back \
                 FROM ( \
                     SELECT global_position, transaction_id AS old_id, \
                         xmin::text::bigint = transaction_id::text::bigint % 4294967296 AS native \
                     FROM {s}.events \
                 ) r \
             ) b; \
             CREATE INDEX ON factum_restore_map (old_id, global_position) WHERE NOT native; \
             CREATE INDEX ON factum_restore_map (global_position); \
             ANALYZE factum_restore_map"
        )))
        .execute(&mut *tx)
        .await
        .map_err(err)?;
        let (highest, horizon): (Option<i64>, i64) = sqlx::query_as(
            "SELECT (SELECT max(new_id) FROM factum_restore_map), \
                 pg_snapshot_xmin(pg_current_snapshot())::text::bigint",
        )
        .fetch_one(&mut *tx)
        .await
        .map_err(err)?;
        let highest = highest.unwrap_or(FIRST_NEW_ID);
        if highest >= horizon {
            tx.rollback().await.map_err(err)?;
            return Ok(Attempt::NoRoom {
                needed: u64::try_from(highest - horizon + 1).unwrap_or(0),
            });
        }

        // Each checkpoint moves to the new position of the last restored event at or before it
        // (START stays START): the events after it are the same events as before.
        let checkpoints = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE {s}.subscription_checkpoints c \
             SET commit_id = coalesce(m.new_id, 0), \
                 global_position = coalesce(m.global_position, 0), updated_at = now() \
             FROM {s}.subscription_checkpoints c0 LEFT JOIN LATERAL ( \
                 SELECT r.new_id, r.global_position FROM factum_restore_map r \
                 WHERE NOT r.native \
                   AND (r.old_id, r.global_position) <= (c0.commit_id::text::xid8, c0.global_position) \
                 ORDER BY r.old_id DESC, r.global_position DESC LIMIT 1 \
             ) m ON true \
             WHERE c.subscription = c0.subscription"
        )))
        .execute(&mut *tx)
        .await
        .map_err(err)?
        .rows_affected();
        let events = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE {s}.events e SET transaction_id = r.new_id::text::xid8 \
             FROM factum_restore_map r \
             WHERE e.global_position = r.global_position \
               AND e.transaction_id <> r.new_id::text::xid8"
        )))
        .execute(&mut *tx)
        .await
        .map_err(err)?
        .rows_affected();
        tx.commit().await.map_err(err)?;
        Ok(Attempt::Done(RestoreRepair {
            repaired: true,
            events_rewritten: events,
            commits: u64::try_from(highest - FIRST_NEW_ID + 1).unwrap_or(0),
            checkpoints_moved: checkpoints,
            transaction_ids_consumed: 0,
        }))
    }
}

enum Attempt {
    Done(RestoreRepair),
    NoRoom { needed: u64 },
}
