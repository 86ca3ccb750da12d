//! Batched reads: concurrent stream reads share one statement (see
//! [`BatchedReads`](crate::BatchedReads)); the queue is the one group commit uses.

use factum::{StreamId, StreamVersion};
use sqlx::Row;
use sqlx::postgres::PgRow;

use crate::group::Member;

/// One stream read waiting for, or leading, a batched statement.
pub(crate) struct BatchedRead {
    pub(crate) stream: StreamId,
    pub(crate) after: StreamVersion,
}

impl Member for BatchedRead {
    /// The rows of its stream (at most the statement's limit), or `None` when the statement
    /// failed or its leader went away: then it runs its own statement.
    type Outcome = Option<Vec<PgRow>>;

    fn exclusive_stream(&self) -> Option<&StreamId> {
        // Reads of one stream may share a statement: each is a row of its own in it.
        None
    }
}

/// The batched read statement: $1 the streams, $2 the version each reads after, $3 the most
/// rows per stream, $4 the number of reads. The columns are those of the single read
/// (`payload_from_row`), then the read's place in `$1` (from 1), in that order and then by
/// version. Each stream's rows honour its pruning bound like the single read.
///
/// `LIMIT $4` changes no result (it is the arrays' length) but the plan: without it the
/// planner estimates the arrays at 10 elements in a generic plan and at their real length in a
/// custom one, so for small batches it keeps planning each execution anew (about 0.7 ms of
/// server CPU on the partitioned table, more than the read itself); with it the generic plan
/// (a nested loop of index scans, right for any batch) is estimated cheapest and is cached.
pub(crate) fn statement(s: &str) -> String {
    let prune = crate::maintenance::stream_read_pruning(s, "r.stream_id");
    format!(
        "SELECT e.stream_version, e.event_type, e.schema_version, e.payload::text, e.recorded_at, \
         e.metadata::text, e.correlation_id, e.causation_id, r.n \
         FROM (SELECT * FROM unnest($1::text[], $2::bigint[]) WITH ORDINALITY \
             AS u(stream_id, after_version, n) LIMIT $4) r \
         CROSS JOIN LATERAL (SELECT stream_version, event_type, schema_version, payload, \
             recorded_at, metadata, correlation_id, causation_id \
             FROM {s}.events WHERE stream_id = r.stream_id AND stream_version > r.after_version \
             {prune} ORDER BY stream_version LIMIT $3) e \
         ORDER BY r.n, e.stream_version"
    )
}

/// Splits a batched statement's rows among its `reads` members, in their order.
pub(crate) fn split(rows: Vec<PgRow>, reads: usize) -> Result<Vec<Vec<PgRow>>, sqlx::Error> {
    let mut each: Vec<Vec<PgRow>> = (0..reads).map(|_| Vec::new()).collect();
    for row in rows {
        let n: i64 = row.try_get(8)?;
        let slot = usize::try_from(n - 1)
            .ok()
            .and_then(|i| each.get_mut(i))
            .ok_or_else(|| {
                sqlx::Error::Protocol(format!("batched read row for read {n} of {reads}"))
            })?;
        slot.push(row);
    }
    Ok(each)
}

/// The version of the last row of a stream's rows (column 0), where a longer stream goes on.
pub(crate) fn last_version(rows: &[PgRow]) -> Result<Option<StreamVersion>, sqlx::Error> {
    rows.last()
        .map(|row| {
            row.try_get::<i64, _>(0)
                .map(|v| StreamVersion::new(u64::try_from(v).unwrap_or(0)))
        })
        .transpose()
}
