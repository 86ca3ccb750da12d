//! Pool and store configuration.

use std::time::Duration;

use factum::bus::ServiceName;
use factum::resilience::{Operation, RetryPolicies, RetryPolicy};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::error::to_error;
use crate::schema::SchemaName;

/// How [`PostgresStore::connect_with`](crate::PostgresStore::connect_with) builds its
/// connection pool.
///
/// Session settings are sent as startup parameters, so they cost no extra round trip:
///
/// ```
/// use std::time::Duration;
/// use factum_postgres::PoolConfig;
///
/// let config = PoolConfig {
///     max_connections: 32,
///     statement_timeout: Some(Duration::from_secs(5)),
///     ..PoolConfig::default()
/// };
/// assert_eq!(config.acquire_timeout, Duration::from_secs(10));
/// ```
#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// The most connections the pool opens (default 10).
    pub max_connections: u32,
    /// Connections kept open when idle (default 0).
    pub min_connections: u32,
    /// How long an operation waits for a free connection before failing with a transient
    /// error (default 10 s).
    pub acquire_timeout: Duration,
    /// The server-side `statement_timeout` of every connection (default none). A statement
    /// cancelled by it was rolled back: the error is transient.
    pub statement_timeout: Option<Duration>,
    /// The server-side `idle_in_transaction_session_timeout` of every connection (default 60 s):
    /// a transaction left open by a stuck client would stall every reader of the global log (see
    /// the crate docs on gap safety), so the server ends it.
    pub idle_in_transaction_session_timeout: Option<Duration>,
    /// The `application_name` the server shows in `pg_stat_activity` (default `factum`).
    pub application_name: String,
    /// Whether the pool pings a connection every time it hands one out (sqlx's
    /// `test_before_acquire`; default `false`). The ping is a round trip before every statement,
    /// which a command pays twice (load and append); the store does not need it, because a
    /// connection that died while idle fails its statement like any lost connection: a read is
    /// retried, and an append is settled by looking its event ids up before it is retried.
    pub test_before_acquire: bool,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_connections: 10,
            min_connections: 0,
            acquire_timeout: Duration::from_secs(10),
            statement_timeout: None,
            idle_in_transaction_session_timeout: Some(Duration::from_secs(60)),
            application_name: "factum".to_owned(),
            test_before_acquire: false,
        }
    }
}

impl PoolConfig {
    /// The connect options for `url` with this configuration's session settings.
    pub fn connect_options(&self, url: &str) -> Result<PgConnectOptions, factum::Error> {
        let options: PgConnectOptions = url.parse().map_err(|e: sqlx::Error| {
            factum::Error::InvalidArgument(format!("invalid PostgreSQL URL: {e}"))
        })?;
        let mut settings = Vec::new();
        if let Some(t) = self.statement_timeout {
            settings.push(("statement_timeout", t.as_millis().to_string()));
        }
        if let Some(t) = self.idle_in_transaction_session_timeout {
            settings.push((
                "idle_in_transaction_session_timeout",
                t.as_millis().to_string(),
            ));
        }
        Ok(options
            .application_name(&self.application_name)
            .options(settings))
    }

    /// Opens a pool to `url` with this configuration (connecting once to check the URL).
    pub async fn connect(&self, url: &str) -> Result<PgPool, factum::Error> {
        let options = self.connect_options(url)?;
        PgPoolOptions::new()
            .max_connections(self.max_connections)
            .min_connections(self.min_connections)
            .acquire_timeout(self.acquire_timeout)
            .test_before_acquire(self.test_before_acquire)
            .connect_with(options)
            .await
            .map_err(|e| to_error(e, "connect"))
    }
}

/// How a [`PostgresStore`](crate::PostgresStore) behaves on top of its pool.
///
/// ```
/// use std::time::Duration;
/// use factum::resilience::RetryPolicy;
/// use factum_postgres::{SchemaName, StoreOptions};
///
/// let options = StoreOptions::default()
///     .with_schema(SchemaName::new("billing").unwrap())
///     .with_retry(RetryPolicy::new().with_max_attempts(3).with_initial_delay(Duration::from_millis(20)));
/// assert_eq!(options.schema().as_str(), "billing");
/// assert_eq!(options.retry().max_attempts(), 3);
///
/// // Under `factum::resilience::Resilient`, which retries by itself: one layer of retries.
/// let wrapped = StoreOptions::default().with_retry(RetryPolicy::no_retry());
/// assert_eq!(wrapped.retry().max_attempts(), 1);
/// ```
#[derive(Clone, Debug)]
pub struct StoreOptions {
    schema: SchemaName,
    service: Option<ServiceName>,
    retry: RetryPolicy,
    outcome_check_timeout: Duration,
    read_settle_timeout: Duration,
    group_commit: GroupCommit,
    batched_reads: BatchedReads,
}

impl Default for StoreOptions {
    /// Schema `factum`; retries by the default [`Operation::Append`] policy of
    /// [`RetryPolicies`](factum::resilience::RetryPolicies) (5 attempts, 50 ms to 2 s, 10 s in
    /// all); outcome checks for at most 10 s; `read_all` waits at most 250 ms; no group commit
    /// ([`GroupCommit::default`]) and no batched reads ([`BatchedReads::default`]).
    fn default() -> Self {
        Self {
            schema: SchemaName::default(),
            service: None,
            retry: *RetryPolicies::default().get(Operation::Append),
            outcome_check_timeout: Duration::from_secs(10),
            read_settle_timeout: Duration::from_millis(250),
            group_commit: GroupCommit::default(),
            batched_reads: BatchedReads::default(),
        }
    }
}

impl StoreOptions {
    /// The store of service `service`: it belongs to that service, and refuses to work on a
    /// schema that belongs to another one ([`Error::WrongService`](factum::Error::WrongService)).
    /// The first [`migrate`](crate::PostgresStore::migrate) records the owner; connecting, health
    /// checks and the first append check it. The schema stays what
    /// [`with_schema`](Self::with_schema) says (a database per service can keep the default; two
    /// services in one database need a schema each).
    #[must_use]
    pub fn for_service(mut self, service: ServiceName) -> Self {
        self.service = Some(service);
        self
    }

    /// The service the store belongs to, if it was opened for one.
    pub fn service(&self) -> Option<&ServiceName> {
        self.service.as_ref()
    }

    /// The schema holding the tables (default `factum`).
    #[must_use]
    pub fn with_schema(mut self, schema: SchemaName) -> Self {
        self.schema = schema;
        self
    }

    /// How an append is retried inside the store: attempts, backoff with full jitter, time limit
    /// (default: the [`Operation::Append`] policy of
    /// [`RetryPolicies::default`](factum::resilience::RetryPolicies)).
    ///
    /// It applies to appends the server rolled back (deadlock, serialization failure, server
    /// starting, statement timeout...), to the look-ups of a batch's event ids after a lost
    /// connection, and to the retry of a batch those look-ups found not stored. These retries
    /// pass no retry budget and no circuit breaker: when the store is wrapped in
    /// [`Resilient`](factum::resilience::Resilient), which has both and retries the same
    /// failures, pass [`RetryPolicy::no_retry`] here so that attempts do not multiply.
    #[must_use]
    pub fn with_retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Shorthand for [`with_retry`](Self::with_retry) with the current policy's attempts
    /// replaced (1 disables retries).
    #[must_use]
    pub fn with_max_attempts(mut self, attempts: u32) -> Self {
        self.retry = self.retry.with_max_attempts(attempts);
        self
    }

    /// The longest an append whose connection was lost keeps looking its event ids up before
    /// giving up with [`factum::Error::UnknownOutcome`] (default 10 s), on top of the retry
    /// policy's own limits.
    #[must_use]
    pub fn with_outcome_check_timeout(mut self, timeout: Duration) -> Self {
        self.outcome_check_timeout = timeout;
        self
    }

    /// How long [`read_all`](factum::EventStore::read_all) may wait for transactions that were
    /// in flight when it was called (default 250 ms).
    ///
    /// The global log is read only below the oldest transaction in flight (gap safety), so an
    /// event committed just before the call can still be hidden by a transaction of another
    /// client that began earlier and has not finished. Waiting for those transactions (never for
    /// ones that begin later) makes a reader see its own writes; a page that is already full
    /// returns at once. Zero disables the wait: readers then see such events on their next poll.
    #[must_use]
    pub fn with_read_settle_timeout(mut self, timeout: Duration) -> Self {
        self.read_settle_timeout = timeout;
        self
    }

    /// Whether and how concurrent appends to different streams share statements (default:
    /// [`GroupCommit::default`], off). See [`GroupCommit`].
    #[must_use]
    pub fn with_group_commit(mut self, group_commit: GroupCommit) -> Self {
        self.group_commit = group_commit;
        self
    }

    /// How concurrent appends share statements.
    pub fn group_commit(&self) -> GroupCommit {
        self.group_commit
    }

    /// Whether and how concurrent stream reads (aggregate loads) share statements (default:
    /// [`BatchedReads::default`], off). See [`BatchedReads`].
    #[must_use]
    pub fn with_batched_reads(mut self, batched_reads: BatchedReads) -> Self {
        self.batched_reads = batched_reads;
        self
    }

    /// How concurrent stream reads share statements.
    pub fn batched_reads(&self) -> BatchedReads {
        self.batched_reads
    }

    /// How long `read_all` waits for transactions in flight when it was called.
    pub fn read_settle_timeout(&self) -> Duration {
        self.read_settle_timeout
    }

    /// The schema holding the tables.
    pub fn schema(&self) -> &SchemaName {
        &self.schema
    }

    /// How an append is retried inside the store.
    pub fn retry(&self) -> &RetryPolicy {
        &self.retry
    }

    /// How long a lost connection's outcome is checked for.
    pub fn outcome_check_timeout(&self) -> Duration {
        self.outcome_check_timeout
    }
}

/// Group commit: how a [`PostgresStore`](crate::PostgresStore) combines concurrent appends into
/// shared statements. Off by default ([`GroupCommit::default`]); turn it on with
/// [`StoreOptions::with_group_commit`] and [`GroupCommit::enabled`].
///
/// While [`max_in_flight`](Self::max_in_flight) append statements of the store are in flight,
/// further appends queue; when one returns, the queued ones (to streams not in flight) go out
/// together as one statement, at most [`max_batch`](Self::max_batch) of them. This is natural
/// batching: no timer, and an append that finds a free slot goes out at once, alone, so a single
/// client sees no change. Each request keeps its own guarantees: its own expected version (a
/// conflict fails that request only, the others commit), its own idempotency key and event-id
/// checks, its own [`AppendResult`](factum::AppendResult) or error. Two requests for one stream
/// never share a statement and are never in flight together: the later one waits for the next
/// statement, so they keep their order and cannot meet a conflict the other caused by merging.
/// Appends inside a caller's transaction ([`append_in`](crate::PostgresStore::append_in)) are
/// never grouped.
///
/// What a failed group statement means for its requests: when the server rolled it back (a
/// deadlock, a unique violation, a payload it refused, a statement timeout), nothing of it was
/// stored, and every request runs its own statement at once and gets its own verdict; when the
/// connection was lost while it was in flight (or the caller whose task ran it was cancelled),
/// every request's outcome is unknown and each is settled by its own event ids, exactly as for a
/// lost connection of a lone append (stored: success; absent: retried; unreachable:
/// [`factum::Error::UnknownOutcome`]).
///
/// A group's statement waits for its slowest member: an append blocked on a stream row held by a
/// long transaction (e.g. an [`append_in`](crate::PostgresStore::append_in) that stays open)
/// holds up the appends grouped with it. Keep write transactions short, as the gap-safe log
/// already requires, or set a `statement_timeout`.
///
/// Whether it pays depends on where the time goes: see the book's PostgreSQL chapter for the
/// measurements (`FACTUM_BENCH_ONLY=group`).
///
/// ```
/// use factum_postgres::{GroupCommit, StoreOptions};
///
/// let options = StoreOptions::default()
///     .with_group_commit(GroupCommit::enabled().with_max_batch(32).with_max_in_flight(2));
/// assert!(options.group_commit().is_enabled());
/// assert_eq!(options.group_commit().max_batch(), 32);
/// assert_eq!(options.group_commit().max_in_flight(), 2);
///
/// // The default: one statement per append.
/// assert!(!StoreOptions::default().group_commit().is_enabled());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupCommit {
    max_batch: usize,
    max_in_flight: usize,
}

impl Default for GroupCommit {
    /// Off: every append is a statement of its own.
    fn default() -> Self {
        Self::disabled()
    }
}

impl GroupCommit {
    /// Off: every append is a statement of its own.
    pub fn disabled() -> Self {
        Self {
            max_batch: 1,
            max_in_flight: 4,
        }
    }

    /// On, with at most 64 appends per statement and 4 statements in flight.
    pub fn enabled() -> Self {
        Self {
            max_batch: 64,
            max_in_flight: 4,
        }
    }

    /// At most `appends` requests per statement (1 turns group commit off).
    #[must_use]
    pub fn with_max_batch(mut self, appends: usize) -> Self {
        self.max_batch = appends.max(1);
        self
    }

    /// At most `statements` append statements of the store in flight at once (minimum 1);
    /// appends beyond them queue and go out grouped.
    #[must_use]
    pub fn with_max_in_flight(mut self, statements: usize) -> Self {
        self.max_in_flight = statements.max(1);
        self
    }

    /// The most requests one statement carries.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// The most append statements in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight
    }

    /// Whether appends are grouped at all.
    pub fn is_enabled(&self) -> bool {
        self.max_batch > 1
    }
}

/// Batched reads: how a [`PostgresStore`](crate::PostgresStore) combines concurrent stream reads
/// ([`read_stream_payloads`](factum::EventStore::read_stream_payloads), what a
/// [`Repository`](factum::Repository) loads an aggregate with) into shared statements. Off by
/// default ([`BatchedReads::default`]); turn it on with [`StoreOptions::with_batched_reads`] and
/// [`BatchedReads::enabled`].
///
/// The same natural batching as [`GroupCommit`]: while
/// [`max_in_flight`](Self::max_in_flight) read statements of the store are in flight, further
/// reads queue, and when one returns the queued ones go out together as one statement, at most
/// [`max_batch`](Self::max_batch) of them; a read that finds a free slot goes out at once. On a
/// busy store this turns many index look-ups of one stream each into one statement, which costs
/// the server far less per stream (the book's PostgreSQL chapter has the measurements,
/// `FACTUM_BENCH_ONLY=group`).
///
/// What a reader sees does not change: each stream's events in version order, from one snapshot
/// of the database, exactly as its own statement would return them. A statement returns at most
/// [`rows_per_stream`](Self::rows_per_stream) events of each stream; a longer stream goes on
/// with a statement of its own from where that left off (a later snapshot, which may hold newer
/// events: a read of a stream has never promised to stop at the events stored when it began). A
/// batched statement that fails sends each of its reads to run its own statement, so every
/// caller gets the error of its own read. Reads of a store with a shredder (`with_shredder`,
/// feature `personal`), which decrypt every event, are not batched.
///
/// ```
/// use factum_postgres::{BatchedReads, StoreOptions};
///
/// let options = StoreOptions::default().with_batched_reads(
///     BatchedReads::enabled().with_max_batch(32).with_rows_per_stream(64),
/// );
/// assert!(options.batched_reads().is_enabled());
/// assert_eq!(options.batched_reads().max_batch(), 32);
/// assert_eq!(options.batched_reads().max_in_flight(), 2);
/// assert_eq!(options.batched_reads().rows_per_stream(), 64);
///
/// // The default: one statement per read.
/// assert!(!StoreOptions::default().batched_reads().is_enabled());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchedReads {
    max_batch: usize,
    max_in_flight: usize,
    rows_per_stream: usize,
}

impl Default for BatchedReads {
    /// Off: every read is a statement of its own.
    fn default() -> Self {
        Self::disabled()
    }
}

impl BatchedReads {
    /// Off: every read is a statement of its own.
    pub fn disabled() -> Self {
        Self {
            max_batch: 1,
            max_in_flight: 2,
            rows_per_stream: 128,
        }
    }

    /// On, with at most 64 reads per statement, 2 statements in flight and 128 events of each
    /// stream per statement. (Fewer statements in flight than group commit's 4: a read does not
    /// wait for a flush to disk, so reads keep fewer statements busy and need a lower bar to
    /// start queueing.)
    pub fn enabled() -> Self {
        Self {
            max_batch: 64,
            ..Self::disabled()
        }
    }

    /// At most `reads` per statement (1 turns batched reads off).
    #[must_use]
    pub fn with_max_batch(mut self, reads: usize) -> Self {
        self.max_batch = reads.max(1);
        self
    }

    /// At most `statements` batched read statements of the store in flight at once (minimum
    /// 1); reads beyond them queue and go out together.
    #[must_use]
    pub fn with_max_in_flight(mut self, statements: usize) -> Self {
        self.max_in_flight = statements.max(1);
        self
    }

    /// At most `events` of each stream per statement (minimum 1); the rest of a longer stream
    /// is read by a statement of its own.
    #[must_use]
    pub fn with_rows_per_stream(mut self, events: usize) -> Self {
        self.rows_per_stream = events.max(1);
        self
    }

    /// The most reads one statement carries.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// The most read statements in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight
    }

    /// The most events of one stream one statement returns.
    pub fn rows_per_stream(&self) -> usize {
        self.rows_per_stream
    }

    /// Whether reads are batched at all.
    pub fn is_enabled(&self) -> bool {
        self.max_batch > 1
    }
}
