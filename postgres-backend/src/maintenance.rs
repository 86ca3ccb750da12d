//! Partition maintenance: range partitions of `events` created ahead of need, and partitions of
//! archived streams detached for archival.
//!
//! `events` is partitioned by range of global position (see the crate docs). The first migration
//! creates `events_p0` for positions below 1 000 000 000 and a default partition that catches
//! anything beyond the last range, so appends never fail for lack of a partition; a maintenance
//! task (a cron job, a periodic task of the service, or the operator CLI's
//! `factum partitions create`) calls [`PostgresStore::ensure_partitions`] so that positions land
//! in real range partitions, each with its own unique `(stream_id, stream_version)` and
//! `event_id` indexes.

use factum::{Error, StreamId};

use crate::error::to_error;
use crate::store::PostgresStore;

/// One partition of the `events` table.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub struct Partition {
    /// The table's name, in the store's schema (e.g. `events_p1000000000`).
    pub name: String,
    /// The first global position it holds; `None` for the default partition, or for a range
    /// unbounded below.
    pub from: Option<u64>,
    /// The first global position past it; `None` for the default partition, or for a range
    /// unbounded above.
    pub to: Option<u64>,
    /// True for the default partition, which catches positions beyond every range.
    pub is_default: bool,
}

impl Partition {
    /// True when `position` falls in this range partition.
    pub fn contains(&self, position: u64) -> bool {
        !self.is_default
            && self.from.is_none_or(|from| from <= position)
            && self.to.is_none_or(|to| position < to)
    }
}

/// Parses `FOR VALUES FROM (MINVALUE) TO ('1000')` / `DEFAULT` (`pg_get_expr` of a bound).
fn parse_bound(bound: &str) -> (Option<u64>, Option<u64>, bool) {
    if bound.trim() == "DEFAULT" {
        return (None, None, true);
    }
    let value = |part: &str| -> Option<u64> {
        let digits: String = part.chars().filter(char::is_ascii_digit).collect();
        digits.parse().ok()
    };
    match bound.split_once(" TO ") {
        Some((from, to)) => (value(from), value(to), false),
        None => (None, None, false),
    }
}

/// Partition names this module creates (and the migration's `events_p0`): nothing to escape.
fn is_partition_name(name: &str) -> bool {
    name.strip_prefix("events_p")
        .is_some_and(|rest| !rest.is_empty() && rest.chars().all(|c| c.is_ascii_digit()))
}

/// The condition stream reads add so that partitions below the stream's first position are
/// never scanned (migration 0009): `$1` is the stream id. The bound comes from the `streams` row
/// in the same statement, so PostgreSQL prunes at run time (the plan shows the partitions below
/// it as never executed); a stream without a row reads every partition.
/// `stream` is the SQL that names the stream read (`$1`, or a column).
pub(crate) fn stream_read_pruning(s: &str, stream: &str) -> String {
    format!(
        "AND global_position >= (SELECT COALESCE(max(first_position), 0) \
         FROM {s}.streams WHERE stream_id = {stream})"
    )
}

/// The name of the constraint that records a detached partition's range on the table itself.
fn bounds_constraint(name: &str) -> String {
    format!("{name}_bounds")
}

/// Parses `CHECK (((global_position >= 10) AND (global_position < 20)))`, the definition of a
/// bounds constraint, into `(from, to)`.
fn parse_bounds_constraint(definition: &str) -> Option<(u64, u64)> {
    let number = |after: &str| -> Option<u64> {
        let start = definition.find(after)? + after.len();
        let digits: String = definition[start..]
            .trim_start()
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    };
    Some((number("global_position >=")?, number("global_position <")?))
}

/// What [`PostgresStore::stream_read_plan`] found: which partitions a stream read touched.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub struct StreamReadPlan {
    /// The partitions the read scanned (the default partition is always among them: it can hold
    /// any position).
    pub scanned: Vec<String>,
    /// The partitions in the plan that the read never scanned, pruned at run time because they
    /// lie wholly below the stream's first position.
    pub pruned: Vec<String>,
    /// The plan, as `EXPLAIN (ANALYZE, FORMAT JSON)` printed it.
    pub explain: serde_json::Value,
}

/// Collects `(relation, loops)` of every scan node in an `EXPLAIN (FORMAT JSON)` plan.
fn scans(node: &serde_json::Value, out: &mut Vec<(String, u64)>) {
    if let Some(relation) = node.get("Relation Name").and_then(|r| r.as_str()) {
        let loops = node
            .get("Actual Loops")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        out.push((relation.to_owned(), loops));
    }
    if let Some(children) = node.get("Plans").and_then(|p| p.as_array()) {
        for child in children {
            scans(child, out);
        }
    }
}

impl PostgresStore {
    /// The partitions of `events`, range partitions in position order, the default one last.
    pub async fn partitions(&self) -> Result<Vec<Partition>, Error> {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT c.relname::text, pg_get_expr(c.relpartbound, c.oid) \
             FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhparent = to_regclass($1)",
        )
        .bind(format!("{}.events", self.schema().quoted()))
        .fetch_all(self.pool())
        .await
        .map_err(|e| to_error(e, "list partitions"))?;
        let mut partitions: Vec<Partition> = rows
            .into_iter()
            .map(|(name, bound)| {
                let (from, to, is_default) = parse_bound(&bound);
                Partition {
                    name,
                    from,
                    to,
                    is_default,
                }
            })
            .collect();
        partitions.sort_by_key(|p| (p.is_default, p.from));
        Ok(partitions)
    }

    /// Creates range partitions of `size` positions each after the last one, until the
    /// partitions cover every position up to `ahead` past the last one handed out, and returns
    /// the partitions it created (none when there was enough headroom already).
    ///
    /// Run it periodically with `ahead` well above the events written between two runs, so that
    /// appends land in range partitions rather than the default one. Each new partition gets the
    /// unique `(stream_id, stream_version)` and `event_id` indexes before it is attached with
    /// `ATTACH PARTITION`. When there is something to create, appends wait for the few
    /// milliseconds that takes (a `SHARE ROW EXCLUSIVE` lock on `events`, waited for at most 5 s):
    /// the appends in flight finish first, so that none can take a position of the new range
    /// and still write it to the default partition; reads go on. Positions that already went to
    /// the default partition stay there: the first new range starts above them (and the attach
    /// scans the default partition, so keep it empty by running this ahead of need). Concurrent
    /// calls are serialised by an advisory lock; a call with enough headroom locks nothing.
    ///
    /// ```no_run
    /// # async fn run(store: factum_postgres::PostgresStore) -> Result<(), factum::Error> {
    /// // Partitions of 10 million positions, always 20 million positions ahead.
    /// let created = store.ensure_partitions(10_000_000, 20_000_000).await?;
    /// for partition in created {
    ///     println!("created {} for positions {:?}..{:?}", partition.name, partition.from, partition.to);
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn ensure_partitions(&self, size: u64, ahead: u64) -> Result<Vec<Partition>, Error> {
        if size == 0 || size > i64::MAX as u64 / 4 {
            return Err(Error::InvalidArgument(format!(
                "partition size {size} must be between 1 and {}",
                i64::MAX / 4
            )));
        }
        let fail = |e| to_error(e, "ensure partitions");
        let s = self.schema().quoted();
        let mut tx = crate::tx::begin(self.pool()).await.map_err(fail)?;
        // Waiting for a lock behind a long transaction would block appends queued behind us.
        sqlx::query("SET LOCAL lock_timeout = '5s'")
            .execute(&mut *tx)
            .await
            .map_err(fail)?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(format!("factum partitions {}", self.schema()))
            .execute(&mut *tx)
            .await
            .map_err(fail)?;
        let partitions = self.partitions().await?;
        if partitions.iter().any(|p| !p.is_default && p.to.is_none()) {
            // A range unbounded above: nothing can come after it.
            return Ok(Vec::new());
        }
        let last_to = partitions.iter().filter_map(|p| p.to).max().unwrap_or(0);
        // Twice: a look without blocking anyone, and when partitions are to be created, again
        // under a lock that waits for the appends in flight and holds new ones until the
        // commit. Without it an append could take a position in the new range and still insert
        // it into the default partition (its statement planned before the attach), which fails
        // the attach (positions already in the default partition) or the append.
        let mut from = 0;
        let mut target = 0;
        for locked in [false, true] {
            if locked {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "LOCK TABLE {s}.events IN SHARE ROW EXCLUSIVE MODE"
                )))
                .execute(&mut *tx)
                .await
                .map_err(fail)?;
            }
            let handed_out: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END \
                 FROM {s}.events_global_position_seq"
            )))
            .fetch_one(&mut *tx)
            .await
            .map_err(fail)?;
            let in_default: Option<i64> = if partitions.iter().any(|p| p.is_default) {
                sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                    "SELECT max(global_position) FROM {s}.events_default"
                )))
                .fetch_one(&mut *tx)
                .await
                .map_err(fail)?
            } else {
                None
            };
            target = u64::try_from(handed_out).unwrap_or(0).saturating_add(ahead);
            from = last_to.max(in_default.map_or(0, |m| u64::try_from(m).unwrap_or(0) + 1));
            if from > target {
                // Enough headroom: nothing to create, nobody held up.
                tx.commit().await.map_err(fail)?;
                return Ok(Vec::new());
            }
        }
        let mut created = Vec::new();
        while from <= target {
            let to = from + size;
            let name = format!("events_p{from}");
            let statements = [
                format!(
                    "CREATE TABLE {s}.{name} (LIKE {s}.events INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
                ),
                format!(
                    "CREATE UNIQUE INDEX {name}_stream_version_uq ON {s}.{name} (stream_id, stream_version)"
                ),
                format!("CREATE UNIQUE INDEX {name}_event_id_uq ON {s}.{name} (event_id)"),
                format!(
                    "ALTER TABLE {s}.events ATTACH PARTITION {s}.{name} FOR VALUES FROM ({from}) TO ({to})"
                ),
            ];
            for statement in statements {
                sqlx::query(sqlx::AssertSqlSafe(statement.as_str()))
                    .execute(&mut *tx)
                    .await
                    .map_err(fail)?;
            }
            tracing::info!(schema = %self.schema(), partition = %name, from, to, "created an events partition");
            created.push(Partition {
                name,
                from: Some(from),
                to: Some(to),
                is_default: false,
            });
            from = to;
        }
        tx.commit().await.map_err(fail)?;
        Ok(created)
    }

    /// Time-rolled partitions: like [`ensure_partitions`](Self::ensure_partitions), with the size
    /// taken from the write rate observed, so that a partition holds roughly one `window` of
    /// events (e.g. a month), and enough partitions ahead to cover `windows_ahead` windows at that
    /// rate. Returns the partitions created and the size used.
    ///
    /// The rate is the positions handed out over the last `window` (the log's age, when it is
    /// younger), found with a binary search over positions (index probes, never a scan);
    /// the size is never below `min_size`, so a quiet store does not get thousands of tiny
    /// partitions (and a log with less than 1% of a window of history gets `min_size`). Run it more often than once a window (e.g. daily for monthly windows).
    ///
    /// ```no_run
    /// # async fn run(store: factum_postgres::PostgresStore) -> Result<(), factum::Error> {
    /// // About a month per partition, two months ahead, never fewer than 100k positions each.
    /// let month = chrono::Duration::days(30);
    /// let (created, size) = store.ensure_partitions_for_window(month, 2, 100_000).await?;
    /// println!("{} partitions of {size} positions created", created.len());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn ensure_partitions_for_window(
        &self,
        window: chrono::Duration,
        windows_ahead: u32,
        min_size: u64,
    ) -> Result<(Vec<Partition>, u64), Error> {
        if window <= chrono::Duration::zero() || windows_ahead == 0 || min_size == 0 {
            return Err(Error::InvalidArgument(format!(
                "a partition window must be positive ({window}), with at least one window ahead ({windows_ahead}) and a minimum size of at least 1 ({min_size})"
            )));
        }
        let per_window = self.positions_per_window(window).await?;
        let size = per_window.max(min_size);
        let ahead = size.saturating_mul(u64::from(windows_ahead));
        let created = self.ensure_partitions(size, ahead).await?;
        Ok((created, size))
    }

    /// Positions handed out per `window`, from the last `window` of the log (scaled up when the
    /// log is younger than that).
    async fn positions_per_window(&self, window: chrono::Duration) -> Result<u64, Error> {
        let fail = |e| to_error(e, "measure the write rate");
        let s = self.schema().quoted();
        let at = format!(
            "SELECT global_position, recorded_at FROM {s}.events \
             WHERE global_position >= $1 ORDER BY global_position LIMIT 1"
        );
        let last = format!(
            "SELECT global_position, recorded_at FROM {s}.events \
             ORDER BY global_position DESC LIMIT 1"
        );
        let probe = |position: i64| {
            sqlx::query_as::<_, (i64, chrono::DateTime<chrono::Utc>)>(sqlx::AssertSqlSafe(
                at.clone(),
            ))
            .bind(position)
            .fetch_optional(self.pool())
        };
        let Some((first_pos, first_at)) = probe(0).await.map_err(fail)? else {
            return Ok(0);
        };
        let (last_pos, last_at): (i64, chrono::DateTime<chrono::Utc>) =
            sqlx::query_as(sqlx::AssertSqlSafe(last))
                .fetch_one(self.pool())
                .await
                .map_err(fail)?;
        let since = last_at - window;
        // The first event recorded at or after `since`: positions grow with time (up to the
        // order commits take), so a binary search over positions finds it.
        let (start_pos, start_at) = if first_at >= since {
            (first_pos, first_at)
        } else {
            let (mut lo, mut hi) = (first_pos, last_pos);
            let mut found = (last_pos, last_at);
            while lo <= hi {
                let mid = lo + (hi - lo) / 2;
                match probe(mid).await.map_err(fail)? {
                    Some((pos, at)) if at >= since => {
                        found = (pos, at);
                        hi = mid - 1;
                    }
                    Some((pos, _)) => lo = pos + 1,
                    None => hi = mid - 1,
                }
            }
            found
        };
        let written = u64::try_from(last_pos - start_pos + 1).unwrap_or(0);
        let observed = (last_at - start_at).num_milliseconds().max(1);
        let window_ms = window.num_milliseconds().max(1);
        if observed >= window_ms {
            return Ok(written);
        }
        if observed.saturating_mul(100) < window_ms {
            // Under 1% of a window of history says nothing about the rate: the caller's minimum.
            return Ok(0);
        }
        // A log younger than the window: extrapolate its rate to a whole window.
        let scaled = u128::from(written) * window_ms as u128 / observed as u128;
        Ok(u64::try_from(scaled).unwrap_or(u64::MAX))
    }

    /// Marks a stream archived, the condition for [`detach_partition`](Self::detach_partition)
    /// to release its events. Returns false when the stream does not exist.
    ///
    /// Archiving is final for writers: once this returns, every append to the stream fails with
    /// [`Error::StreamArchived`](factum::Error::StreamArchived) and stores nothing (an append
    /// that committed first keeps its events; one racing with this call either commits before
    /// it or is refused). Re-appending a batch that was stored before is still the idempotent
    /// repeat it was.
    pub async fn archive_stream(&self, stream: &StreamId) -> Result<bool, Error> {
        let updated = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE {}.streams SET archived = true WHERE stream_id = $1",
            self.schema().quoted()
        )))
        .bind(stream.as_str())
        .execute(self.pool())
        .await
        .map_err(|e| to_error(e, "archive stream"))?;
        Ok(updated.rows_affected() == 1)
    }

    /// Detaches the range partition `name` from `events`, once every event in it belongs to an
    /// archived stream. The table stays in the schema, outside the log, to be dumped and dropped
    /// by the operator; its events no longer appear in reads, and its event ids no longer count
    /// for idempotent re-appends.
    ///
    /// The default partition and the partition of the newest position cannot be detached.
    /// PostgreSQL refuses `DETACH PARTITION ... CONCURRENTLY` while a default partition exists,
    /// so this is a plain `DETACH`: a catalogue change that takes a brief exclusive lock on
    /// `events` (waiting at most 5 s for it rather than queueing appends behind a long
    /// transaction).
    pub async fn detach_partition(&self, name: &str) -> Result<(), Error> {
        let partitions = self.partitions().await?;
        let Some(partition) = partitions.iter().find(|p| p.name == name) else {
            return Err(Error::InvalidArgument(format!(
                "`{name}` is not a partition of {}.events; see PostgresStore::partitions",
                self.schema()
            )));
        };
        if partition.is_default || !is_partition_name(name) {
            return Err(Error::InvalidArgument(format!(
                "`{name}` is the default partition, which catches positions beyond every range: it cannot be detached"
            )));
        }
        let fail = |e| to_error(e, "detach partition");
        let s = self.schema().quoted();
        let newest: Option<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT max(global_position) FROM {s}.events"
        )))
        .fetch_one(self.pool())
        .await
        .map_err(fail)?;
        if newest.is_some_and(|n| partition.contains(u64::try_from(n).unwrap_or(0))) {
            return Err(Error::InvalidArgument(format!(
                "`{name}` holds the newest event of the log: it is still being written"
            )));
        }
        let live: Option<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT e.stream_id FROM {s}.{name} e JOIN {s}.streams st USING (stream_id) \
             WHERE NOT st.archived LIMIT 1"
        )))
        .fetch_optional(self.pool())
        .await
        .map_err(fail)?;
        if let Some(stream) = live {
            return Err(Error::InvalidArgument(format!(
                "`{name}` holds events of stream `{stream}`, which is not archived: archive its streams first (PostgresStore::archive_stream)"
            )));
        }
        let mut tx = crate::tx::begin(self.pool()).await.map_err(fail)?;
        sqlx::query("SET LOCAL lock_timeout = '5s'")
            .execute(&mut *tx)
            .await
            .map_err(fail)?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "ALTER TABLE {s}.events DETACH PARTITION {s}.{name}"
        )))
        .execute(&mut *tx)
        .await
        .map_err(fail)?;
        // The range goes with the table (into its dump too), for `attach_partition`. Added NOT
        // VALID here, which is instant, so that the exclusive lock on `events` is not held while
        // the table is scanned; validated below, locking only the detached table.
        let (from, to) = (
            partition.from.unwrap_or(0),
            partition.to.unwrap_or(i64::MAX as u64),
        );
        let bounds = bounds_constraint(name);
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "ALTER TABLE {s}.{name} ADD CONSTRAINT {bounds} \
             CHECK (global_position >= {from} AND global_position < {to}) NOT VALID"
        )))
        .execute(&mut *tx)
        .await
        .map_err(fail)?;
        tx.commit().await.map_err(fail)?;
        tracing::info!(schema = %self.schema(), partition = %name, "detached an events partition");
        // A valid constraint lets a later ATTACH skip its scan of the table. The detach is done
        // whatever happens here: `attach_partition` validates what is not validated yet.
        if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(format!(
            "ALTER TABLE {s}.{name} VALIDATE CONSTRAINT {bounds}"
        )))
        .execute(self.pool())
        .await
        {
            tracing::warn!(schema = %self.schema(), partition = %name, error = %e, "the detached partition's range constraint was not validated; attach_partition will");
        }
        Ok(())
    }

    /// Attaches a table detached by [`detach_partition`](Self::detach_partition) (and possibly
    /// dumped, dropped and restored since: see the book's chapter on partitions) back to
    /// `events`, so that its events are in the log again: stream reads, a replay from the start
    /// and the re-append check see them. Returns the partition.
    ///
    /// The range is the one the table had, recorded on it at detach time as the CHECK constraint
    /// `<name>_bounds`. Before attaching, the call validates that
    /// * the table exists in the store's schema, is not attached, and its range overlaps no
    ///   attached partition;
    /// * every row lies in the range (the constraint is validated);
    /// * every stream it holds events of has its row in `streams`, at a version no lower than
    ///   its events', and was not deleted ([`delete_stream`](Self::delete_stream) does not reach
    ///   detached events: delete them from the table first);
    /// * none of its event ids is in the log meanwhile (one index probe per event and partition).
    ///
    /// Any failed check is an [`Error::InvalidArgument`] naming the table and what to fix;
    /// nothing is attached then. The attach itself takes a brief lock on `events` (at most 5 s
    /// waited for) and scans the default partition for rows in the range, as
    /// [`ensure_partitions`](Self::ensure_partitions) does.
    ///
    /// Re-attached events keep their positions and transaction ids: a subscription whose
    /// checkpoint is past them does not receive them again (they are history it read before the
    /// detach); a replay or rebuild from the start reads them in their original order.
    ///
    /// ```no_run
    /// # async fn run(store: factum_postgres::PostgresStore) -> Result<(), factum::Error> {
    /// store.detach_partition("events_p1000000000").await?;
    /// // ... later, after restoring the table from cold storage:
    /// let partition = store.attach_partition("events_p1000000000").await?;
    /// assert_eq!(partition.from, Some(1_000_000_000));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn attach_partition(&self, name: &str) -> Result<Partition, Error> {
        let schema = self.schema();
        let invalid =
            |why: String| Error::InvalidArgument(format!("cannot attach `{name}`: {why}"));
        if !is_partition_name(name) {
            return Err(invalid(format!(
                "not a name of an events partition (`events_p<first position>`) of {schema}"
            )));
        }
        let fail = |e| to_error(e, "attach partition");
        let s = schema.quoted();
        let table = format!("{s}.{name}");
        let partitions = self.partitions().await?;
        if partitions.iter().any(|p| p.name == name) {
            return Err(invalid(format!(
                "it is attached to {schema}.events already"
            )));
        }
        let found: Option<bool> = sqlx::query_scalar(
            "SELECT c.relispartition FROM pg_class c WHERE c.oid = to_regclass($1)",
        )
        .bind(&table)
        .fetch_optional(self.pool())
        .await
        .map_err(fail)?;
        match found {
            None => {
                return Err(invalid(format!(
                    "there is no table {schema}.{name}: restore it from its dump first"
                )));
            }
            Some(true) => {
                return Err(invalid("it is a partition of another table".to_owned()));
            }
            Some(false) => {}
        }
        let bounds = bounds_constraint(name);
        let constraint: Option<(String, bool)> = sqlx::query_as(
            "SELECT pg_get_constraintdef(oid), convalidated FROM pg_constraint \
             WHERE conrelid = to_regclass($1) AND conname = $2",
        )
        .bind(&table)
        .bind(&bounds)
        .fetch_optional(self.pool())
        .await
        .map_err(fail)?;
        let named_from: u64 = name["events_p".len()..].parse().unwrap_or(0);
        let Some((definition, validated)) = constraint else {
            return Err(invalid(format!(
                "it has no `{bounds}` constraint recording its range (tables detached before this \
                 version do not): add it with ALTER TABLE {schema}.{name} ADD CONSTRAINT {bounds} \
                 CHECK (global_position >= {named_from} AND global_position < <the first position \
                 of the partition that followed it>)"
            )));
        };
        let Some((from, to)) = parse_bounds_constraint(&definition) else {
            return Err(invalid(format!(
                "its `{bounds}` constraint is not a range of global positions: {definition}"
            )));
        };
        if from != named_from || from >= to {
            return Err(invalid(format!(
                "its `{bounds}` constraint ({definition}) does not start at the position its name says ({named_from})"
            )));
        }
        let overlaps = |p: &Partition| {
            !p.is_default && p.from.is_none_or(|f| f < to) && p.to.is_none_or(|t| from < t)
        };
        if let Some(other) = partitions.iter().find(|p| overlaps(p)) {
            return Err(invalid(format!(
                "its range {from}..{to} overlaps partition `{}` ({:?}..{:?})",
                other.name, other.from, other.to
            )));
        }
        if !validated {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "ALTER TABLE {table} VALIDATE CONSTRAINT {bounds}"
            )))
            .execute(self.pool())
            .await
            .map_err(|e| {
                invalid(format!(
                    "some of its rows lie outside its range {from}..{to}: {e}"
                ))
            })?;
        }
        let stream: Option<(String, Option<i64>, bool, i64)> =
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT d.stream_id, st.version, st.deleted_at IS NOT NULL, max(d.stream_version) \
                 FROM {table} d LEFT JOIN {s}.streams st USING (stream_id) \
                 GROUP BY d.stream_id, st.version, st.deleted_at \
                 HAVING st.version IS NULL OR st.deleted_at IS NOT NULL \
                     OR max(d.stream_version) > st.version \
                 LIMIT 1"
            )))
            .fetch_optional(self.pool())
            .await
            .map_err(fail)?;
        if let Some((stream, version, deleted, newest)) = stream {
            return Err(invalid(match (version, deleted) {
                (None, _) => format!(
                    "it holds events of stream `{stream}`, which has no row in {schema}.streams (the version authority): restore the streams table with it"
                ),
                (Some(_), true) => format!(
                    "it holds events of stream `{stream}`, which was deleted: delete them from the table first (DELETE FROM {schema}.{name} WHERE stream_id = '{stream}')"
                ),
                (Some(version), false) => format!(
                    "it holds version {newest} of stream `{stream}`, whose row in {schema}.streams is at version {version}"
                ),
            }));
        }
        let duplicate: Option<(uuid::Uuid, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT d.event_id, e.stream_id FROM {table} d \
             JOIN {s}.events e ON e.event_id = d.event_id LIMIT 1"
        )))
        .fetch_optional(self.pool())
        .await
        .map_err(fail)?;
        if let Some((id, stream)) = duplicate {
            return Err(invalid(format!(
                "its event {id} is in the log already (stream `{stream}`): event ids are unique across partitions"
            )));
        }
        let mut tx = crate::tx::begin(self.pool()).await.map_err(fail)?;
        sqlx::query("SET LOCAL lock_timeout = '5s'")
            .execute(&mut *tx)
            .await
            .map_err(fail)?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(format!("factum partitions {schema}"))
            .execute(&mut *tx)
            .await
            .map_err(fail)?;
        for statement in [
            format!(
                "ALTER TABLE {s}.events ATTACH PARTITION {table} FOR VALUES FROM ({from}) TO ({to})"
            ),
            // The partition's own constraint says the same from now on; a later detach adds it
            // again.
            format!("ALTER TABLE {table} DROP CONSTRAINT {bounds}"),
        ] {
            sqlx::query(sqlx::AssertSqlSafe(statement))
                .execute(&mut *tx)
                .await
                .map_err(fail)?;
        }
        tx.commit().await.map_err(fail)?;
        tracing::info!(schema = %schema, partition = %name, from, to, "attached an events partition");
        Ok(Partition {
            name: name.to_owned(),
            from: Some(from),
            to: Some(to),
            is_default: false,
        })
    }

    /// Runs the store's stream read for `stream` under `EXPLAIN ANALYZE` and reports which
    /// partitions of `events` it scanned and which it pruned: an operator's check that stream
    /// reads skip the partitions below a stream's first position (see the crate docs and the
    /// book's chapter on partitions). The read is executed (and its rows discarded).
    ///
    /// ```no_run
    /// # async fn run(store: factum_postgres::PostgresStore) -> Result<(), factum::Error> {
    /// let stream = factum::StreamId::new("order-17").expect("a valid id");
    /// let plan = store.stream_read_plan(&stream).await?;
    /// println!("scanned {:?}, pruned {:?}", plan.scanned, plan.pruned);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn stream_read_plan(&self, stream: &StreamId) -> Result<StreamReadPlan, Error> {
        let fail = |e| to_error(e, "explain a stream read");
        let partitions: Vec<String> = self
            .partitions()
            .await?
            .into_iter()
            .map(|p| p.name)
            .collect();
        let sqlx::types::Json(explain): sqlx::types::Json<serde_json::Value> =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF, FORMAT JSON) {}",
                self.sql_read_stream()
            )))
            .bind(stream.as_str())
            .bind(0_i64)
            .fetch_one(self.pool())
            .await
            .map_err(fail)?;
        let mut found = Vec::new();
        if let Some(plans) = explain.as_array() {
            for plan in plans {
                if let Some(root) = plan.get("Plan") {
                    scans(root, &mut found);
                }
            }
        }
        let (mut scanned, mut pruned) = (Vec::new(), Vec::new());
        for (relation, loops) in found {
            if !partitions.contains(&relation) {
                continue;
            }
            let list = if loops > 0 { &mut scanned } else { &mut pruned };
            if !list.contains(&relation) {
                list.push(relation);
            }
        }
        Ok(StreamReadPlan {
            scanned,
            pruned,
            explain,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_and_names_parse() {
        assert_eq!(
            parse_bound("FOR VALUES FROM (MINVALUE) TO ('1000000000')"),
            (None, Some(1_000_000_000), false)
        );
        assert_eq!(
            parse_bound("FOR VALUES FROM ('10') TO ('20')"),
            (Some(10), Some(20), false)
        );
        assert_eq!(
            parse_bound("FOR VALUES FROM ('10') TO (MAXVALUE)"),
            (Some(10), None, false)
        );
        assert_eq!(parse_bound("DEFAULT"), (None, None, true));
        assert!(is_partition_name("events_p0"));
        assert!(is_partition_name("events_p1000000000"));
        assert!(!is_partition_name("events_default"));
        assert!(!is_partition_name("events_p1; DROP TABLE x"));
        assert_eq!(
            parse_bounds_constraint(
                "CHECK (((global_position >= 1000000000) AND (global_position < 1000000010)))"
            ),
            Some((1_000_000_000, 1_000_000_010))
        );
        assert_eq!(parse_bounds_constraint("CHECK ((n > 1))"), None);
    }
}
