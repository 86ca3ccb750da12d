//! Bulk import of existing history (a legacy system's events) through `COPY`.
//!
//! The input is read in chunks. Each chunk is read, checked, its event ids looked up in every
//! partition and its rows encoded while the chunk before it is being stored (on another
//! connection, so the lookup's time overlaps that chunk's `COPY`); then it is one transaction
//! that
//! 1. judges the ids stored before: an id stored as the same event (same stream, type, schema
//!    version and payload, and version when the input gives one) is skipped, which makes a re-run
//!    of an interrupted import safe; any other stored id is an error naming it. (A chunk holding
//!    an id of the chunk stored while it was looked up looks its ids up again, inside its
//!    transaction, so it never misses one);
//! 2. creates or locks the `streams` rows of the streams that get events, in stream order, and
//!    refuses archived and deleted streams;
//! 3. numbers each stream's events on from the stream's current version, in input order
//!    (checking the version the input gives, if any);
//! 4. bumps the `streams` rows and `COPY`s the events straight into `events`, where the global
//!    position and the transaction id come from the columns' defaults, as for an append.
//!
//! Gap safety needs nothing more: the chunk's positions are taken inside its transaction, so a
//! reader of the global log sees the chunk whole, after its commit, and never past it while it is
//! in flight (see the crate docs). A failed chunk stores nothing; the chunks before it stay.

use std::collections::HashMap;
use std::io::Write as _;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use factum::{
    BoxError, Error, EventId, ExpectedVersion, GlobalPosition, NewEvent, StreamId, StreamVersion,
};
use futures_util::{Stream, StreamExt};
use uuid::Uuid;

use crate::error::{Failure, Op, classify};
use crate::store::PostgresStore;

/// One event of a legacy system's history, to be imported with [`PostgresStore::import`].
///
/// It keeps its own event id, payload, metadata (user metadata, correlation and causation ids)
/// and recording time. Its stream version is the next one of its stream, in input order;
/// [`at_version`](Self::at_version) makes the import check it.
#[derive(Clone, Debug)]
pub struct ImportedEvent {
    /// The stream the event belongs to.
    pub stream_id: StreamId,
    /// The event: id, wire name, schema version, payload and metadata, as for an append.
    pub event: NewEvent,
    /// When the legacy system recorded it (stored as `recorded_at`).
    pub recorded_at: DateTime<Utc>,
    /// The version the event must land at, when the input knows it; `None`: the next one.
    pub version: Option<StreamVersion>,
}

impl ImportedEvent {
    /// An event of `stream_id` recorded at `recorded_at`, taking the next version of its stream.
    pub fn new(stream_id: StreamId, event: NewEvent, recorded_at: DateTime<Utc>) -> Self {
        Self {
            stream_id,
            event,
            recorded_at,
            version: None,
        }
    }

    /// Requires the event to land at `version` of its stream: the import fails with
    /// [`Error::Conflict`] when the stream (with the events before it in the input) is not at
    /// `version - 1`, which catches input out of order or with gaps.
    pub fn at_version(mut self, version: StreamVersion) -> Self {
        self.version = Some(version);
        self
    }
}

/// How [`PostgresStore::import`] reads and commits its input.
#[derive(Clone, Debug)]
pub struct ImportOptions {
    chunk_size: usize,
    total: Option<u64>,
}

impl Default for ImportOptions {
    fn default() -> Self {
        Self {
            chunk_size: Self::DEFAULT_CHUNK_SIZE,
            total: None,
        }
    }
}

impl ImportOptions {
    /// Events per chunk (one transaction each) by default.
    pub const DEFAULT_CHUNK_SIZE: usize = 10_000;

    /// Events per chunk, each chunk one transaction (at least 1; default 10 000). Larger chunks
    /// cost fewer round trips; each one holds subscribers back while it is in flight (gap
    /// safety: nothing after an open transaction is read), so keep a chunk well under a second.
    pub fn with_chunk_size(mut self, events: usize) -> Self {
        self.chunk_size = events.max(1);
        self
    }

    /// How many events the input holds, when known: progress then reports a fraction and an
    /// estimated time left.
    pub fn with_total(mut self, events: u64) -> Self {
        self.total = Some(events);
        self
    }

    /// Events per chunk.
    pub fn chunk_size(&self) -> usize {
        self.chunk_size
    }

    /// The input's size, if given.
    pub fn total(&self) -> Option<u64> {
        self.total
    }
}

/// How far an import is, as reported to its progress callback after each committed chunk.
#[derive(Clone, PartialEq, Debug)]
#[non_exhaustive]
pub struct ImportProgress {
    /// Input events read and committed (imported or skipped).
    pub done: u64,
    /// Events stored so far.
    pub imported: u64,
    /// Events skipped because they were stored before (a re-run).
    pub skipped: u64,
    /// Chunks committed.
    pub chunks: u64,
    /// The input's size, when [`ImportOptions::with_total`] gave it.
    pub total: Option<u64>,
    /// Input events per second so far.
    pub rate: f64,
    /// Estimated time left (with a total and a rate).
    pub eta: Option<Duration>,
    /// Time spent so far.
    pub elapsed: Duration,
    /// The highest global position stored so far.
    pub last_position: Option<GlobalPosition>,
}

impl ImportProgress {
    /// `done / total` in `0.0..=1.0`, when the total is known.
    pub fn fraction(&self) -> Option<f64> {
        self.total.map(|total| {
            if total == 0 {
                1.0
            } else {
                (self.done as f64 / total as f64).min(1.0)
            }
        })
    }
}

/// What [`PostgresStore::import`] did.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
#[non_exhaustive]
pub struct ImportReport {
    /// Events stored.
    pub imported: u64,
    /// Events skipped because they were stored before, as the same events (a re-run).
    pub skipped: u64,
    /// Streams created by the import.
    pub streams_created: u64,
    /// Streams that existed and got events.
    pub streams_extended: u64,
    /// Chunks committed (each one transaction).
    pub chunks: u64,
    /// The lowest global position stored (`None` when nothing was stored).
    pub first_position: Option<GlobalPosition>,
    /// The highest global position stored.
    pub last_position: Option<GlobalPosition>,
    /// How long the import took.
    pub elapsed: Duration,
}

impl ImportReport {
    /// Input events (imported or skipped) per second.
    pub fn rate(&self) -> f64 {
        let seconds = self.elapsed.as_secs_f64();
        if seconds == 0.0 {
            0.0
        } else {
            (self.imported + self.skipped) as f64 / seconds
        }
    }
}

/// Reading the import's input failed.
#[derive(Debug, thiserror::Error)]
#[error(
    "reading input event #{index} of the import failed; the {committed} events before it that were read in committed chunks are stored: fix the input and re-run the import (stored events are skipped)"
)]
struct InputFailed {
    index: u64,
    committed: u64,
    #[source]
    source: BoxError,
}

/// A chunk the database refused or rolled back.
#[derive(Debug, thiserror::Error)]
#[error(
    "import chunk {chunk} (input events #{first} to #{last}) was rolled back, nothing of it is stored{culprit}; the chunks before it are stored: fix what the database refused (or wait, when it was busy) and re-run the import, which skips stored events"
)]
struct ChunkFailed {
    chunk: u64,
    first: u64,
    last: u64,
    /// `, at input event #n (event id .., stream ..)` when the database named the row.
    culprit: String,
    #[source]
    source: sqlx::Error,
}

/// One chunk's outcome.
struct Chunk {
    imported: u64,
    skipped: u64,
    created: u64,
    extended: u64,
    positions: Option<(i64, i64)>,
}

/// Where an input event of a chunk stands.
#[derive(Clone, Copy)]
enum Fate {
    /// Stored before as the same event: skipped.
    Stored,
    /// To be stored, at this version.
    New(i64),
}

/// The import's input, read chunk by chunk.
struct Input<'a, S> {
    events: std::pin::Pin<&'a mut S>,
    size: usize,
    /// The input returned `None`: it is not polled again.
    ended: bool,
}

/// A stored event holding an id of a chunk: (event id, stream, version, type, schema version).
type StoredId = (Uuid, String, i64, String, i32);

/// A chunk read from the input, checked, its ids looked up and its rows encoded (up to the
/// stream version, which its transaction decides).
struct Staged {
    events: Vec<ImportedEvent>,
    /// The input index of its first event.
    first: u64,
    /// Its number, from 1.
    number: u64,
    ids: Vec<Uuid>,
    index_of: HashMap<Uuid, usize>,
    /// The stored events holding one of its ids, when it was staged.
    stored: Vec<StoredId>,
    /// Each row's columns after the stream version, and where each row's ends.
    tails: Vec<u8>,
    ends: Vec<usize>,
    /// Looked up while the chunk before it, holding one of its ids, was being stored: look
    /// again inside its transaction.
    look_again: bool,
}

impl Staged {
    /// The error of a statement of this chunk that failed (`culprit` names the row, if known).
    fn failed(&self, source: sqlx::Error, culprit: String) -> Error {
        // Rolled back by the server, a connection lost before the commit (nothing stored), or
        // an id stored meanwhile by an append (a re-run judges it): a re-run may succeed.
        let (retry, source) = match classify(source, Op::Read) {
            Failure::Transient(e) | Failure::UnknownOutcome(e) | Failure::DuplicateEventId(e) => {
                (true, e)
            }
            other => (false, other.into_source()),
        };
        let chunk_failed = ChunkFailed {
            chunk: self.number,
            first: self.first,
            last: self.first + self.events.len() as u64 - 1,
            culprit,
            source,
        };
        if retry {
            Error::transient("import", chunk_failed)
        } else {
            Error::permanent("import", chunk_failed)
        }
    }
}

/// Why a chunk could not be staged.
enum Staging {
    /// Reading input event `index` failed.
    Input { index: u64, source: BoxError },
    /// The chunk is refused (a local check, or the id lookup failed).
    Refused(Error),
}

impl Staging {
    /// The import's error, once the chunks before are committed (`committed` events).
    fn into_error(self, committed: u64) -> Error {
        match self {
            Self::Input { index, source } => Error::permanent(
                "import",
                InputFailed {
                    index,
                    committed,
                    source,
                },
            ),
            Self::Refused(error) => error,
        }
    }
}

const COPY_COLUMNS: &str = "stream_id, stream_version, event_id, event_type, schema_version, \
    payload, metadata, correlation_id, causation_id, recorded_at";

impl PostgresStore {
    /// Imports existing history (a legacy system's events with their own ids, streams,
    /// timestamps and metadata) through `COPY`, keeping every guarantee of an append, and
    /// returns what it did. `on_progress` is called after each committed chunk.
    ///
    /// The input is read in chunks of [`ImportOptions::chunk_size`] events, each one
    /// transaction, committed in input order; global positions follow the input order, so give
    /// the events in the legacy system's global order (each stream's events in stream order).
    /// While a chunk is stored, the next one is read, checked and its ids looked up (on a second
    /// connection of the pool), so an import uses two connections at once.
    /// Per chunk:
    /// * **Stream versions** continue each stream's current version, in input order, without
    ///   gaps (an event given [`at_version`](ImportedEvent::at_version) must land there, else
    ///   [`Error::Conflict`]). The `streams` rows are created or bumped in the same transaction;
    ///   appends racing with the chunk wait for it and then see the new version.
    /// * **Event ids are unique**, across partitions. An id already stored *as the same event*
    ///   (same stream, type, schema version and payload, and version if given) is skipped: a
    ///   re-run of an interrupted import (same input) stores each event once. Any other stored
    ///   id fails the chunk with [`Error::DuplicateEventId`] naming it; an id twice in the input
    ///   is an [`Error::InvalidArgument`].
    /// * **Archived and deleted streams** are refused ([`Error::StreamArchived`],
    ///   [`Error::StreamDeleted`]) unless every one of their events in the chunk is skipped.
    /// * **Gap safety**: positions and transaction ids come from the columns' defaults inside
    ///   the chunk's transaction, as for an append, so running subscribers see the chunk whole
    ///   after its commit and never skip it.
    ///
    /// A chunk that fails stores nothing, and the import stops with its error (naming the input
    /// event when the database names a row); the chunks before it stay committed, and
    /// `on_progress` has reported them. The returned error is [`Error::Transient`] when a retry
    /// may succeed and [`Error::UnknownOutcome`] when the connection was lost during a commit;
    /// in every case re-running the import with the same input completes it.
    ///
    /// Imported events keep their `recorded_at`, which may be older than events already in the
    /// log: [`position_at`](factum::EventStore::position_at) and the write rate
    /// [`ensure_partitions_for_window`](Self::ensure_partitions_for_window) measures assume
    /// times that grow with positions, so import history before live traffic where possible.
    /// Payloads are stored as given.
    ///
    /// ```no_run
    /// use factum::{EventMetadata, NewEvent, StreamId};
    /// use factum_postgres::{ImportOptions, ImportedEvent};
    ///
    /// # async fn run(store: factum_postgres::PostgresStore) -> Result<(), factum::Error> {
    /// // A legacy export: (event id, stream, type, payload, recorded at), in global order.
    /// let legacy = vec![(uuid::Uuid::now_v7(), "account-7", "account.opened", r#"{"owner":"Ada"}"#, chrono::Utc::now())];
    /// let events = futures_util::stream::iter(legacy.into_iter().map(|(id, stream, kind, payload, at)| {
    ///     Ok::<_, factum::BoxError>(ImportedEvent::new(
    ///         StreamId::new(stream)?,
    ///         NewEvent {
    ///             event_id: factum::EventId::from_uuid(id),
    ///             event_type: kind.into(),
    ///             schema_version: 1,
    ///             payload: factum::RawValue::from_string(payload.into())?,
    ///             metadata: EventMetadata::default(),
    ///         },
    ///         at,
    ///     ))
    /// }));
    /// let report = store
    ///     .import(events, &ImportOptions::default().with_total(1), |p| {
    ///         println!("{} of {:?} events, {:.0}/s", p.done, p.total, p.rate)
    ///     })
    ///     .await?;
    /// println!("{} imported, {} already there", report.imported, report.skipped);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn import<S, E>(
        &self,
        events: S,
        options: &ImportOptions,
        mut on_progress: impl FnMut(&ImportProgress) + Send,
    ) -> Result<ImportReport, Error>
    where
        S: Stream<Item = Result<ImportedEvent, E>> + Send,
        E: Into<BoxError>,
    {
        self.ensure_service().await?;
        let started = Instant::now();
        let size = options.chunk_size();
        let mut input = Input {
            events: std::pin::pin!(events),
            size,
            ended: false,
        };
        let mut report = ImportReport::default();
        let mut staged = self
            .stage(&mut input, 0, 1)
            .await
            .map_err(|e| e.into_error(0))?;
        while let Some(chunk) = staged.take() {
            // The next chunk is read, checked, looked up and encoded while this one's
            // transaction runs (on another connection): the database's time for the lookup then
            // overlaps the COPY instead of adding to it.
            let following = chunk.first + chunk.events.len() as u64;
            let (done, next) = futures_util::future::join(
                self.import_chunk(&chunk),
                self.stage(&mut input, following, chunk.number + 1),
            )
            .await;
            let done = done?;
            let read = following;
            report.chunks += 1;
            report.imported += done.imported;
            report.skipped += done.skipped;
            report.streams_created += done.created;
            report.streams_extended += done.extended;
            if let Some((low, high)) = done.positions {
                let (low, high) = (position(low), position(high));
                report.first_position = Some(report.first_position.map_or(low, |p| p.min(low)));
                report.last_position = Some(report.last_position.map_or(high, |p| p.max(high)));
            }
            let elapsed = started.elapsed();
            let rate = read as f64 / elapsed.as_secs_f64().max(1e-9);
            on_progress(&ImportProgress {
                done: read,
                imported: report.imported,
                skipped: report.skipped,
                chunks: report.chunks,
                total: options.total(),
                rate,
                eta: options
                    .total()
                    .filter(|_| rate > 0.0)
                    .map(|t| Duration::from_secs_f64(t.saturating_sub(read) as f64 / rate)),
                elapsed,
                last_position: report.last_position,
            });
            staged = next.map_err(|e| e.into_error(read))?;
            if let Some(next) = &mut staged {
                // Its ids were looked up before this chunk committed: one of them stored by this
                // chunk would have been missed, so such a chunk looks its ids up again.
                next.look_again = next.ids.iter().any(|id| chunk.index_of.contains_key(id));
            }
        }
        report.elapsed = started.elapsed();
        tracing::info!(
            schema = %self.schema(),
            imported = report.imported,
            skipped = report.skipped,
            chunks = report.chunks,
            elapsed_ms = report.elapsed.as_millis() as u64,
            "import finished"
        );
        Ok(report)
    }

    /// Reads the next chunk from the input, checks it, looks its ids up and encodes its rows:
    /// `None` once the input is exhausted. `first` is the input index of its first event.
    async fn stage<S, E>(
        &self,
        input: &mut Input<'_, S>,
        first: u64,
        number: u64,
    ) -> Result<Option<Staged>, Staging>
    where
        S: Stream<Item = Result<ImportedEvent, E>> + Send,
        E: Into<BoxError>,
    {
        let mut events = Vec::with_capacity(input.size.min(100_000));
        while !input.ended && events.len() < input.size {
            match input.events.next().await {
                Some(Ok(event)) => events.push(event),
                Some(Err(source)) => {
                    return Err(Staging::Input {
                        index: first + events.len() as u64,
                        source: source.into(),
                    });
                }
                None => input.ended = true,
            }
        }
        if events.is_empty() {
            return Ok(None);
        }
        // The checks, the look-up and the encoding run in a task of their own, so that their
        // CPU time overlaps the chunk being stored (polled by this task) instead of holding it
        // up on a multi-threaded runtime.
        let staging = tokio::spawn(prepare(
            events,
            first,
            number,
            self.pool().clone(),
            lookup_sql(&self.schema().quoted()),
        ));
        let _abort = AbortOnDrop(staging.abort_handle());
        match staging.await {
            Ok(staged) => staged.map(Some),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(Staging::Refused(Error::permanent(
                "import",
                format!("staging chunk {number} was cancelled: {e}"),
            ))),
        }
    }

    /// Imports one staged chunk in one transaction.
    async fn import_chunk(&self, staged: &Staged) -> Result<Chunk, Error> {
        let s = self.schema().quoted();
        let Staged {
            events: chunk,
            first,
            number,
            ids,
            index_of,
            tails,
            ends,
            ..
        } = staged;
        let (first, number) = (*first, *number);
        let failed = |source: sqlx::Error, culprit: String| staged.failed(source, culprit);
        let fail = |e: sqlx::Error| failed(e, String::new());
        let mut tx = crate::tx::begin(self.pool()).await.map_err(fail)?;

        // 1. Ids stored before: the same event is skipped, anything else is refused.
        let mut fates: Vec<Option<Fate>> = vec![None; chunk.len()];
        let looked_again;
        let stored = if staged.look_again {
            looked_again = stored_ids(&mut *tx, &lookup_sql(&s), ids)
                .await
                .map_err(fail)?;
            &looked_again
        } else {
            &staged.stored
        };
        if !stored.is_empty() {
            let found: Vec<usize> = stored.iter().map(|row| index_of[&row.0]).collect();
            let payloads: Vec<&str> = found
                .iter()
                .map(|&i| chunk[i].event.payload.get())
                .collect();
            let found_ids: Vec<Uuid> = found.iter().map(|&i| ids[i]).collect();
            let differ: Vec<Uuid> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT i.id FROM unnest($1::uuid[], $2::text[]) AS i(id, payload) \
                 JOIN {s}.events e ON e.event_id = i.id WHERE e.payload <> i.payload::jsonb"
            )))
            .bind(&found_ids)
            .bind(&payloads)
            .fetch_all(&mut *tx)
            .await
            .map_err(fail)?;
            for (id, stream, version, event_type, schema_version) in stored {
                let i = index_of[id];
                let imported = &chunk[i];
                let same = stream == imported.stream_id.as_str()
                    && *event_type == imported.event.event_type
                    && i64::from(*schema_version) == i64::from(imported.event.schema_version)
                    && !differ.contains(id)
                    && imported
                        .version
                        .is_none_or(|v| i64::try_from(v.get()) == Ok(*version));
                if !same {
                    tracing::warn!(%id, input = first + i as u64, stored_stream = %stream, stored_version = version, "an imported event id is stored as another event");
                    return Err(Error::DuplicateEventId {
                        stream: imported.stream_id.clone(),
                        event_id: EventId::from_uuid(*id),
                        existing_stream: StreamId::new(stream.clone())
                            .unwrap_or_else(|_| imported.stream_id.clone()),
                    });
                }
                fates[i] = Some(Fate::Stored);
            }
        }

        // 2. The streams that get events, created or bumped by their count of new events in one
        // statement, locking the rows in stream order (as group appends lock them). The rows stay
        // invisible to others until the commit; a refusal below rolls them back.
        let mut counts: HashMap<&str, (i64, &StreamId)> = HashMap::new();
        for (i, imported) in chunk.iter().enumerate() {
            if fates[i].is_none() {
                counts
                    .entry(imported.stream_id.as_str())
                    .or_insert((0, &imported.stream_id))
                    .0 += 1;
            }
        }
        let mut streams: Vec<(&str, i64, &StreamId)> =
            counts.iter().map(|(s, &(n, id))| (*s, n, id)).collect();
        streams.sort_unstable_by_key(|&(s, _, _)| s);
        let names: Vec<&str> = streams.iter().map(|s| s.0).collect();
        let categories: Vec<&str> = streams.iter().map(|s| s.2.category()).collect();
        let added: Vec<i64> = streams.iter().map(|s| s.1).collect();
        let rows: Vec<(String, i64, bool, bool)> = if streams.is_empty() {
            Vec::new()
        } else {
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "INSERT INTO {s}.streams AS st (stream_id, category, version) \
                 SELECT n.stream_id, n.category, n.added \
                 FROM unnest($1::text[], $2::text[], $3::int8[]) \
                     WITH ORDINALITY AS n(stream_id, category, added, o) ORDER BY n.o \
                 ON CONFLICT (stream_id) DO UPDATE SET version = st.version + EXCLUDED.version \
                 RETURNING st.stream_id, st.version, st.archived, st.deleted_at IS NOT NULL"
            )))
            .bind(&names)
            .bind(&categories)
            .bind(&added)
            .fetch_all(&mut *tx)
            .await
            .map_err(fail)?
        };
        // (version before the chunk, version so far) per stream.
        let mut versions: HashMap<String, (i64, i64)> = HashMap::with_capacity(rows.len());
        let (mut created, mut extended) = (0, 0);
        for (stream, version, archived, deleted) in rows {
            if deleted || archived {
                let id = StreamId::new(stream)
                    .map_err(|e| Error::permanent("import", format!("stored stream id: {e}")))?;
                return Err(if deleted {
                    Error::StreamDeleted { stream: id }
                } else {
                    Error::StreamArchived { stream: id }
                });
            }
            let base = version - counts.get(stream.as_str()).map_or(0, |c| c.0);
            if base == 0 {
                created += 1;
            } else {
                extended += 1;
            }
            versions.insert(stream, (base, base));
        }

        // 3. Versions, in input order; a stream's stored events come before its new ones.
        for (i, imported) in chunk.iter().enumerate() {
            let stream = imported.stream_id.as_str();
            match fates[i] {
                Some(Fate::Stored) => {
                    if versions.get(stream).is_some_and(|&(from, now)| now > from) {
                        return Err(Error::InvalidArgument(format!(
                            "input event #{} ({}) of stream `{stream}` is stored already, but an earlier input event of the stream is not: the input is not in stream order, or changed since the import that stored it; nothing of chunk {number} was stored",
                            first + i as u64,
                            ids[i]
                        )));
                    }
                }
                Some(Fate::New(_)) => unreachable!("fates are decided once"),
                None => {
                    let entry = versions
                        .get_mut(stream)
                        .expect("every stream with a new event has a row");
                    let next = entry.1 + 1;
                    if let Some(wanted) = imported.version
                        && i64::try_from(wanted.get()) != Ok(next)
                    {
                        return Err(Error::Conflict {
                            stream: imported.stream_id.clone(),
                            expected: ExpectedVersion::Exact(StreamVersion::new(wanted.get() - 1)),
                            actual: StreamVersion::new(u64::try_from(entry.1).unwrap_or(0)),
                        });
                    }
                    entry.1 = next;
                    fates[i] = Some(Fate::New(next));
                }
            }
        }
        let skipped = fates
            .iter()
            .filter(|f| matches!(f, Some(Fate::Stored)))
            .count() as u64;
        let new: Vec<usize> = (0..chunk.len())
            .filter(|&i| matches!(fates[i], Some(Fate::New(_))))
            .collect();
        if new.is_empty() {
            tx.rollback().await.map_err(fail)?;
            return Ok(Chunk {
                imported: 0,
                skipped,
                created: 0,
                extended: 0,
                positions: None,
            });
        }

        // 4. The events.
        let mut data = Vec::with_capacity(tails.len() + new.len() * 48);
        for &i in &new {
            let Some(Fate::New(version)) = fates[i] else {
                continue;
            };
            text(&mut data, chunk[i].stream_id.as_str());
            let _ = write!(data, "\t{version}");
            let start = if i == 0 { 0 } else { ends[i - 1] };
            data.extend_from_slice(&tails[start..ends[i]]);
        }
        let culprit = |e: &sqlx::Error| -> String {
            copy_line(e)
                .and_then(|line| new.get(line.checked_sub(1)?))
                .map(|&i| {
                    format!(
                        ", at input event #{} (event id {}, stream `{}`)",
                        first + i as u64,
                        ids[i],
                        chunk[i].stream_id
                    )
                })
                .unwrap_or_default()
        };
        let mut copy = tx
            .copy_in_raw(&format!("COPY {s}.events ({COPY_COLUMNS}) FROM STDIN"))
            .await
            .map_err(fail)?;
        let sent = copy.send(data).await.map(|_| ());
        let copied = match sent {
            Ok(()) => copy.finish().await,
            Err(e) => {
                let _ = copy.abort("the import could not send its rows").await;
                Err(e)
            }
        }
        .map_err(|e| {
            let who = culprit(&e);
            failed(e, who)
        })?;
        if copied != new.len() as u64 {
            return Err(Error::permanent(
                "import",
                format!(
                    "COPY stored {copied} rows of chunk {number} instead of {}; the chunk was rolled back",
                    new.len()
                ),
            ));
        }
        let (low, high): (Option<i64>, Option<i64>) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT min(global_position), max(global_position) FROM {s}.events \
             WHERE transaction_id = pg_current_xact_id()"
        )))
        .fetch_one(&mut *tx)
        .await
        .map_err(fail)?;
        if let Err(e) = tx.commit().await {
            return Err(match classify(e, Op::Write) {
                Failure::UnknownOutcome(e) => Error::UnknownOutcome {
                    operation: "import",
                    stream: chunk[new[0]].stream_id.clone(),
                    source: Box::new(e),
                },
                other => failed(other.into_source(), String::new()),
            });
        }
        Ok(Chunk {
            imported: new.len() as u64,
            skipped,
            created,
            extended,
            positions: low.zip(high),
        })
    }
}

/// Aborts a spawned task when dropped (the import's future was dropped).
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The statement finding the stored events holding one of the ids in `$1`, in every partition.
fn lookup_sql(s: &str) -> String {
    format!(
        "SELECT event_id, stream_id, stream_version, event_type, schema_version \
         FROM {s}.events WHERE event_id = ANY($1)"
    )
}

/// The stored events holding one of `ids`.
async fn stored_ids<'c>(
    conn: impl sqlx::PgExecutor<'c>,
    sql: &str,
    ids: &[Uuid],
) -> Result<Vec<StoredId>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(ids)
        .fetch_all(conn)
        .await
}

/// Checks a chunk read from the input, looks its ids up and encodes its rows.
async fn prepare(
    events: Vec<ImportedEvent>,
    first: u64,
    number: u64,
    pool: sqlx::PgPool,
    lookup: String,
) -> Result<Staged, Staging> {
    // Local checks first: nothing reaches the database from a chunk that cannot be stored.
    let mut ids = Vec::with_capacity(events.len());
    let mut index_of: HashMap<Uuid, usize> = HashMap::with_capacity(events.len());
    for (i, imported) in events.iter().enumerate() {
        let id = imported.event.event_id.as_uuid();
        if let Some(earlier) = index_of.insert(id, i) {
            return Err(Staging::Refused(Error::InvalidArgument(format!(
                "event id {id} appears twice in the import (input events #{} and #{}); nothing of chunk {number} was stored",
                first + earlier as u64,
                first + i as u64
            ))));
        }
        // Personal fields in plaintext form (an event encoded by a derive with `#[personal]`)
        // are refused as appends refuse them: the import does not encrypt.
        if let Err(Error::InvalidArgument(why)) =
            factum::validate_batch(&imported.stream_id, std::slice::from_ref(&imported.event))
        {
            return Err(Staging::Refused(Error::InvalidArgument(format!(
                "input event #{}: {why} (the import stores payloads as given and does not encrypt them: write such events with `append` on a store with a shredder); nothing of chunk {number} was stored",
                first + i as u64
            ))));
        }
        if i32::try_from(imported.event.schema_version).is_err() {
            return Err(Staging::Refused(Error::InvalidArgument(format!(
                "input event #{} ({id}) has schema version {}, above PostgreSQL's integer range",
                first + i as u64,
                imported.event.schema_version
            ))));
        }
        if imported
            .version
            .is_some_and(|v| v == StreamVersion::INITIAL)
        {
            return Err(Staging::Refused(Error::InvalidArgument(format!(
                "input event #{} ({id}) asks for version 0 of stream `{}`: versions start at 1",
                first + i as u64,
                imported.stream_id
            ))));
        }
        ids.push(id);
    }
    let mut staged = Staged {
        events,
        first,
        number,
        ids,
        index_of,
        stored: Vec::new(),
        tails: Vec::new(),
        ends: Vec::new(),
        look_again: false,
    };
    // The rows' columns after the version are encoded while the database looks the ids up.
    let lookup = stored_ids(&pool, &lookup, &staged.ids);
    let encode = async {
        let mut tails = Vec::with_capacity(staged.events.len() * 420);
        let mut ends = Vec::with_capacity(staged.events.len());
        for (i, imported) in staged.events.iter().enumerate() {
            encode_tail(&mut tails, imported).map_err(|e| (i, e))?;
            ends.push(tails.len());
        }
        Ok::<_, (usize, String)>((tails, ends))
    };
    let (stored, encoded) = futures_util::future::join(lookup, encode).await;
    let (tails, ends) = encoded.map_err(|(i, e)| {
        Staging::Refused(Error::InvalidArgument(format!(
            "input event #{} ({}): {e}; nothing of chunk {number} was stored",
            first + i as u64,
            staged.ids[i]
        )))
    })?;
    staged.stored = stored.map_err(|e| Staging::Refused(staged.failed(e, String::new())))?;
    staged.tails = tails;
    staged.ends = ends;
    Ok(staged)
}

fn position(p: i64) -> GlobalPosition {
    GlobalPosition::new(u64::try_from(p).unwrap_or(0))
}

/// The line of the COPY data the database refused (1-based), from its error context
/// (`COPY events, line 17, column payload: ...`).
fn copy_line(error: &sqlx::Error) -> Option<usize> {
    let sqlx::Error::Database(db) = error else {
        return None;
    };
    let pg = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>()?;
    // The context may hold other lines first (`JSON data, line 1: ...` for a bad payload).
    let context = pg.r#where()?.lines().find(|l| l.starts_with("COPY "))?;
    let rest = &context[context.find(", line ")? + ", line ".len()..];
    rest.chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()
}

/// Appends one row of `COPY ... FROM STDIN` text format: the columns of [`COPY_COLUMNS`].
#[cfg(test)]
fn encode_row(out: &mut Vec<u8>, imported: &ImportedEvent, version: i64) -> Result<(), String> {
    text(out, imported.stream_id.as_str());
    let _ = write!(out, "\t{version}");
    encode_tail(out, imported)
}

/// Appends the columns of a COPY row after the stream version (from the tab before the event id
/// to the end of the line): all of a row that does not depend on the stream's current version.
fn encode_tail(out: &mut Vec<u8>, imported: &ImportedEvent) -> Result<(), String> {
    let event = &imported.event;
    let metadata = serde_json::to_string(&event.metadata.user)
        .map_err(|e| format!("its metadata cannot be serialised: {e}"))?;
    // Writing to a Vec cannot fail.
    let _ = write!(out, "\t{}\t", event.event_id.as_uuid());
    text(out, &event.event_type);
    let _ = write!(out, "\t{}\t", event.schema_version);
    text(out, event.payload.get());
    out.push(b'\t');
    text(out, &metadata);
    out.push(b'\t');
    optional_uuid(out, event.metadata.correlation_id.map(|c| c.as_uuid()));
    out.push(b'\t');
    optional_uuid(out, event.metadata.causation_id.map(|c| c.as_uuid()));
    // `2017-07-14 02:40:00.123456`: the fraction as long as needed, in UTC.
    let _ = writeln!(out, "\t{}+00", imported.recorded_at.naive_utc());
    Ok(())
}

fn optional_uuid(out: &mut Vec<u8>, id: Option<Uuid>) {
    match id {
        Some(id) => {
            let _ = write!(out, "{id}");
        }
        None => out.extend_from_slice(b"\\N"),
    }
}

/// A text column of COPY's text format: backslash, tab, newline and carriage return escaped.
fn text(out: &mut Vec<u8>, value: &str) {
    let bytes = value.as_bytes();
    if !bytes
        .iter()
        .any(|b| matches!(b, b'\\' | b'\t' | b'\n' | b'\r'))
    {
        out.extend_from_slice(bytes);
        return;
    }
    for &b in bytes {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            _ => out.push(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_columns_are_escaped_for_copy() {
        let mut out = Vec::new();
        text(&mut out, "a\\b\tc\nd\re");
        assert_eq!(out, b"a\\\\b\\tc\\nd\\re");
        let mut plain = Vec::new();
        text(&mut plain, r#"{"owner":"Ada"}"#);
        assert_eq!(plain, br#"{"owner":"Ada"}"#);
    }

    #[test]
    fn a_row_has_every_column_in_order() {
        let event = NewEvent {
            event_id: EventId::from_uuid(Uuid::nil()),
            event_type: "account.opened".into(),
            schema_version: 2,
            payload: factum::RawValue::from_string(r#"{"note":"a\"b"}"#.into()).expect("json"),
            metadata: Default::default(),
        };
        let at = DateTime::from_timestamp(1_500_000_000, 123_456_000).expect("time");
        let imported = ImportedEvent::new(StreamId::new("account-7").expect("id"), event, at);
        let mut out = Vec::new();
        encode_row(&mut out, &imported, 3).expect("row");
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            "account-7\t3\t00000000-0000-0000-0000-000000000000\taccount.opened\t2\t\
             {\"note\":\"a\\\\\"b\"}\t{}\t\\N\t\\N\t2017-07-14 02:40:00.123456+00\n"
        );
    }
}
