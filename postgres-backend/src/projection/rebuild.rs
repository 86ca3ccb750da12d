//! Rebuilding a projection from scratch into fresh tables, then swapping them in.

use std::time::{Duration, Instant};

use factum::subscription::{Lease, StartFrom};
use factum::{Error, LogPosition};

use super::runner::{PgProjectionRunner, PgProjector};
use super::{PgProjection, TableName, Tables};
use crate::error::to_error;
use crate::subscription::{PgLease, commit, lock_checkpoint, save_checkpoint_as};

/// How far a rebuild is, as reported to its progress callback after each batch.
#[derive(Clone, PartialEq, Debug)]
#[non_exhaustive]
pub struct Progress {
    /// Events applied so far (including those of an interrupted earlier run it resumed).
    pub done: u64,
    /// Events to apply: those matching the projection up to the head of the log when the rebuild
    /// started. Events written meanwhile are applied after the swap (or by the live runner).
    pub total: u64,
    /// Events per second applied by this run.
    pub rate: f64,
    /// Estimated time left at this rate (`None` until there is a rate).
    pub eta: Option<Duration>,
    /// Time spent by this run.
    pub elapsed: Duration,
    /// The last position applied.
    pub position: LogPosition,
}

impl Progress {
    /// `done / total` in `0.0..=1.0` (1.0 when there is nothing to do).
    pub fn fraction(&self) -> f64 {
        if self.total == 0 {
            1.0
        } else {
            (self.done as f64 / self.total as f64).min(1.0)
        }
    }
}

const REBUILD: &str = "_rebuild";
const OLD: &str = "_old";

impl<P: PgProjection> PgProjectionRunner<P> {
    /// Rebuilds the read model from the start of the log into fresh copies of its
    /// [tables](PgProjection::TABLES) (`<table>_rebuild`, created `LIKE` the live ones with their
    /// indexes and defaults), up to the head of the log when it started; then, in one
    /// transaction, swaps them in (`<table>` → `<table>_old`, `<table>_rebuild` → `<table>`,
    /// old dropped), moves the projection's checkpoint to where the rebuild stopped, and clears
    /// its dead letters. Readers see the old model until that commit and the complete new one
    /// after it.
    ///
    /// A runner of the same projection may keep running meanwhile (it updates the old tables);
    /// after the swap it finds the checkpoint moved and continues from the rebuild's position on
    /// the new tables, so events written during the rebuild are applied once, to the new model.
    ///
    /// The rebuild keeps its own checkpoint (`<name>:rebuild`): an interrupted rebuild resumes
    /// where it stopped. `on_progress` is called after each batch. A handler error stops the
    /// rebuild (retry it after fixing the projection: it resumes). Only one rebuild of a
    /// projection runs at a time; another waits for it.
    ///
    /// Every table the projection writes must be listed in [`PgProjection::TABLES`] and named
    /// through [`ProjectionTx::table`](super::ProjectionTx::table): a write to any other table would be applied to the live
    /// model a second time. A projection with no `TABLES` is refused
    /// ([`Error::InvalidArgument`]).
    pub async fn rebuild(
        &mut self,
        mut on_progress: impl FnMut(&Progress) + Send,
    ) -> Result<LogPosition, Error> {
        if P::TABLES.is_empty() {
            // Its writes would go to the live tables and apply every event a second time.
            return Err(Error::InvalidArgument(format!(
                "projection `{}` declares no TABLES, so it cannot be rebuilt beside its live model; list the tables it writes in `PgProjection::TABLES`",
                self.name
            )));
        }
        let name = format!("{}:rebuild", self.name);
        // Held through the swap: only one rebuild of a projection at a time.
        let lease = PgLease::new(&self.store);
        let _lease = loop {
            if let Some(guard) = lease.try_acquire(&name).await? {
                break guard;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let tables: Vec<TableName> = P::TABLES
            .iter()
            .map(|t| TableName::parse(t))
            .collect::<Result<_, _>>()?;
        let rebuild_tables = Tables::new(P::TABLES, REBUILD)?;
        let position = self.prepare_rebuild(&name, &tables).await?;
        let target = self.head().await?;
        let done_before = self.count_between(LogPosition::START, position).await?;
        let total = self.count_between(LogPosition::START, target).await?;
        let started = Instant::now();
        let report = |done: u64, position: LogPosition, on_progress: &mut dyn FnMut(&Progress)| {
            let elapsed = started.elapsed();
            let this_run = done.saturating_sub(done_before);
            let rate = if elapsed.is_zero() {
                0.0
            } else {
                this_run as f64 / elapsed.as_secs_f64()
            };
            let eta = (rate > 0.0)
                .then(|| Duration::from_secs_f64(total.saturating_sub(done) as f64 / rate));
            on_progress(&Progress {
                done: done.min(total.max(done)),
                total,
                rate,
                eta,
                elapsed,
                position,
            });
        };
        report(done_before, position, &mut on_progress);
        let mut position = position;
        if position < target {
            // The one consumer loop, on the rebuild's own checkpoint, writing to the fresh
            // tables; a failing event stops it (retry the rebuild after the fix: it resumes).
            let options = self
                .consumer
                .consumer_options()
                .clone()
                .start_from(StartFrom::Checkpoint)
                .handler_retries(1, Duration::ZERO)
                .stop_on_failures();
            let mut consumer = factum::subscription::Subscription::with_checkpoints(
                name.clone(),
                self.reader.clone(),
                self.checkpoints.clone(),
            )
            .options(options);
            let mut status = consumer.status();
            let projector = PgProjector::new(&mut self.projection, &rebuild_tables);
            let run = consumer.catch_up_to(projector, target);
            tokio::pin!(run);
            let mut reported = 0;
            let mut watching = true;
            let result = loop {
                tokio::select! {
                    result = &mut run => break result,
                    changed = status.changed(), if watching => {
                        if changed.is_err() {
                            watching = false;
                            continue;
                        }
                        let s = status.borrow_and_update().clone();
                        if s.handled != reported {
                            reported = s.handled;
                            report(done_before + s.handled, s.position, &mut on_progress);
                        }
                    }
                }
            };
            // The last progress, also when the rebuild stopped on an event.
            let last = status.borrow().clone();
            report(done_before + last.handled, last.position, &mut on_progress);
            position = result?;
        }
        self.swap(&name, &tables, position).await?;
        Ok(position)
    }

    /// Resumes an interrupted rebuild, or creates empty `_rebuild` tables and a checkpoint at the
    /// start of the log.
    async fn prepare_rebuild(
        &self,
        name: &str,
        tables: &[TableName],
    ) -> Result<LogPosition, Error> {
        let pool = self.store.pool();
        let stored = self.store.load_checkpoint_row(name).await?;
        if let Some(stored) = stored {
            let mut complete = true;
            for table in tables {
                let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
                    .bind(table.quoted(REBUILD))
                    .fetch_one(pool)
                    .await
                    .map_err(|e| to_error(e, "look up rebuild tables"))?;
                complete &= exists;
            }
            if complete {
                tracing::info!(projection = %self.name, %stored, "resuming an interrupted rebuild");
                return Ok(stored);
            }
        }
        let mut tx = crate::tx::begin(pool)
            .await
            .map_err(|e| to_error(e, "prepare rebuild"))?;
        for table in tables {
            let ddl = format!(
                "DROP TABLE IF EXISTS {new}; CREATE TABLE {new} (LIKE {live} INCLUDING ALL)",
                new = table.quoted(REBUILD),
                live = table.quoted(""),
            );
            sqlx::raw_sql(sqlx::AssertSqlSafe(ddl.as_str()))
                .execute(&mut *tx)
                .await
                .map_err(|e| to_error(e, "create rebuild tables"))?;
        }
        save_checkpoint_as(self.sql(), &mut tx, name, LogPosition::START).await?;
        commit(tx).await?;
        Ok(LogPosition::START)
    }

    /// Swaps the rebuilt tables in and moves the live checkpoint, in one transaction.
    async fn swap(
        &self,
        name: &str,
        tables: &[TableName],
        position: LogPosition,
    ) -> Result<(), Error> {
        let mut tx = crate::tx::begin(self.store.pool())
            .await
            .map_err(|e| to_error(e, "swap rebuilt tables"))?;
        // Taken first, like every batch of a live runner does: no deadlock with one, and its
        // batch in flight finishes (on the old tables) before the swap.
        lock_checkpoint(self.sql(), &mut tx, &self.name, LogPosition::START).await?;
        let mut ddl = String::new();
        for table in tables {
            ddl.push_str(&format!(
                "ALTER TABLE {live} RENAME TO {old}; ALTER TABLE {new} RENAME TO {bare}; DROP TABLE {old_q};",
                live = table.quoted(""),
                old = table.bare(OLD),
                new = table.quoted(REBUILD),
                bare = table.bare(""),
                old_q = table.quoted(OLD),
            ));
        }
        let s = self.store.schema().quoted();
        ddl.push_str(&format!(
            "DELETE FROM {s}.subscription_checkpoints WHERE subscription = '{}'; \
             DELETE FROM {s}.dead_letters WHERE subscription = '{}';",
            name.replace('\'', "''"),
            self.name.replace('\'', "''"),
        ));
        sqlx::raw_sql(sqlx::AssertSqlSafe(ddl.as_str()))
            .execute(&mut *tx)
            .await
            .map_err(|e| to_error(e, "swap rebuilt tables"))?;
        save_checkpoint_as(self.sql(), &mut tx, &self.name, position).await?;
        commit(tx).await
    }

    /// How many events pass the runner's filter in `(after, up_to]`.
    async fn count_between(&self, after: LogPosition, up_to: LogPosition) -> Result<u64, Error> {
        let s = self.store.schema().quoted();
        let mut sql = format!(
            "SELECT count(*) FROM {s}.events e \
             WHERE (e.transaction_id, e.global_position) > ($1::bigint::text::xid8, $2) \
               AND (e.transaction_id, e.global_position) <= ($3::bigint::text::xid8, $4)"
        );
        if self
            .consumer
            .consumer_options()
            .event_filter()
            .event_types()
            .is_some()
        {
            sql.push_str(" AND e.event_type = ANY($5::text[])");
        }
        if self
            .consumer
            .consumer_options()
            .event_filter()
            .categories()
            .is_some()
        {
            sql.push_str(&format!(
                " AND split_part(e.stream_id, '{}', 1) = ANY(${}::text[])",
                factum::CATEGORY_SEPARATOR,
                if self
                    .consumer
                    .consumer_options()
                    .event_filter()
                    .event_types()
                    .is_some()
                {
                    6
                } else {
                    5
                }
            ));
        }
        let i = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let mut query = sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql.as_str()))
            .bind(i(after.commit))
            .bind(i(after.global.get()))
            .bind(i(up_to.commit))
            .bind(i(up_to.global.get()));
        if let Some(types) = self
            .consumer
            .consumer_options()
            .event_filter()
            .event_types()
        {
            query = query.bind(types.to_vec());
        }
        if let Some(categories) = self.consumer.consumer_options().event_filter().categories() {
            query = query.bind(categories.to_vec());
        }
        let count = query
            .fetch_one(self.store.pool())
            .await
            .map_err(|e| to_error(e, "count events to rebuild"))?;
        Ok(u64::try_from(count).unwrap_or(0))
    }
}
