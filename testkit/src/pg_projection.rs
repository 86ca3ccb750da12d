//! The PostgreSQL projection fixture: given events, then rows.

use std::fmt::Debug;

use factum::{BoxError, Envelope};
use factum_postgres::projection::{PgProjection, ProjectionTx};
use sqlx::postgres::PgRow;
use sqlx::{FromRow, PgPool};

use crate::envelope::{TestEnvelope, TestLog, envelope};
use crate::postgres::TestDatabase;
use crate::support::pretty;

/// Feeds events to a [`PgProjection`] in real PostgreSQL transactions and checks the rows it
/// writes.
///
/// The events go through the same path as under
/// [`PgProjectionRunner`](factum_postgres::projection::PgProjectionRunner): a transaction, a
/// [`ProjectionTx`] on the projection's live tables, [`apply_batch`](PgProjection::apply_batch)
/// for each batch (every `given…` call is one batch), and a commit. With
/// [`one_event_per_transaction`](Self::one_event_per_transaction), each event is applied alone
/// with [`apply`](PgProjection::apply) instead, as the runner does after a failed batch — a way
/// to check that a hand-written `apply_batch` agrees with `apply`. No checkpoint is involved.
///
/// Envelopes are numbered like a store would number them (see [`envelope`](crate::envelope)).
/// The database is a [`TestDatabase`]: create the read model's tables with
/// [`setup`](Self::setup) (or the application's own migrations) first.
///
/// ```
/// use factum::{BoxError, Envelope};
/// use factum_postgres::projection::{PgProjection, ProjectionTx};
/// use factum_testkit::PgProjectionFixture;
/// # use factum::{DecodeError, EncodeError, Event, RawValue};
/// # #[derive(Debug)]
/// # struct Deposited(i64);
/// # impl Event for Deposited {
/// #     fn event_type(&self) -> &'static str { "account.deposited" }
/// #     fn schema_version(&self) -> u32 { 1 }
/// #     fn event_types() -> &'static [&'static str] { &["account.deposited"] }
/// #     fn encode(&self) -> Result<Box<RawValue>, EncodeError> { factum::encode_json(&self.0) }
/// #     fn decode(stored: &factum::Stored<'_>) -> Result<Self, DecodeError> { let (_, _, p) = (stored.event_type, stored.schema_version, stored.payload);
/// #         factum::decode_json(p).map(Deposited)
/// #     }
/// # }
///
/// /// Balances per account, in `balances(account text primary key, cents bigint)`.
/// struct Balances;
///
/// impl PgProjection for Balances {
///     const NAME: &'static str = "balances";
///     const TABLES: &'static [&'static str] = &["balances"];
///     type Event = Deposited;
///
///     async fn apply(&mut self, tx: &mut ProjectionTx<'_>, event: &Envelope<Deposited>) -> Result<(), BoxError> {
///         let sql = format!(
///             "INSERT INTO {0} AS b (account, cents) VALUES ($1, $2) \
///              ON CONFLICT (account) DO UPDATE SET cents = b.cents + $2",
///             tx.table("balances"),
///         );
///         sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
///             .bind(event.stream_id.aggregate_id())
///             .bind(event.event.0)
///             .execute(tx.conn())
///             .await?;
///         Ok(())
///     }
/// }
///
/// # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
/// PgProjectionFixture::create(Balances) // a fresh, migrated database of its own
///     .await
///     .setup("CREATE TABLE balances (account text PRIMARY KEY, cents bigint NOT NULL)")
///     .await
///     .given_events("account-a1", [Deposited(100), Deposited(20)])
///     .await
///     .given_events("account-b2", [Deposited(3)])
///     .await
///     .then_rows(
///         "SELECT account, cents FROM balances ORDER BY account",
///         [("a1".to_string(), 120_i64), ("b2".to_string(), 3)],
///     )
///     .await;
/// # });
/// ```
pub struct PgProjectionFixture<P: PgProjection> {
    projection: P,
    pool: PgPool,
    /// The database, when the fixture created it (dropped with the fixture).
    _database: Option<TestDatabase>,
    log: TestLog,
    applied: Vec<String>,
    one_per_transaction: bool,
}

impl<P: PgProjection> std::fmt::Debug for PgProjectionFixture<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgProjectionFixture")
            .field("projection", &P::NAME)
            .field("applied", &self.applied)
            .field("one_per_transaction", &self.one_per_transaction)
            .finish_non_exhaustive()
    }
}

impl<P: PgProjection> PgProjectionFixture<P> {
    /// A fixture around `projection` on a fresh [`TestDatabase`] of its own, dropped with the
    /// fixture.
    ///
    /// # Panics
    /// When no test database can be created (see [`TestDatabase::create`]).
    pub async fn create(projection: P) -> Self {
        let database = TestDatabase::create().await;
        let mut fixture = Self::new(&database, projection);
        fixture._database = Some(database);
        fixture
    }

    /// A fixture around `projection` on `database`, which must outlive the fixture.
    pub fn new(database: &TestDatabase, projection: P) -> Self {
        Self {
            projection,
            pool: database.pool().clone(),
            _database: None,
            log: TestLog::default(),
            applied: Vec::new(),
            one_per_transaction: false,
        }
    }

    /// Applies each event in a transaction of its own with [`apply`](PgProjection::apply),
    /// instead of each `given…` call's events in one transaction with
    /// [`apply_batch`](PgProjection::apply_batch).
    #[must_use]
    pub fn one_event_per_transaction(mut self) -> Self {
        self.one_per_transaction = true;
        self
    }

    /// Runs `sql` (one or more statements, e.g. the read model's `CREATE TABLE`s).
    ///
    /// # Panics
    /// When a statement fails; the message shows the SQL.
    pub async fn setup(self, sql: &str) -> Self {
        if let Err(error) = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&self.pool)
            .await
        {
            panic!(
                "projection `{}`: the setup SQL failed: {error}\n  sql: {sql}",
                P::NAME
            );
        }
        self
    }

    /// Applies one event: an [`envelope`](crate::envelope) being built, or a ready
    /// [`Envelope`]. It is one batch of its own.
    ///
    /// # Panics
    /// When the projection returns an error or the transaction cannot commit (then nothing of
    /// the batch is stored).
    pub async fn given(mut self, event: impl Into<TestEnvelope<P::Event>>) -> Self {
        let envelope = self.log.place(event.into());
        self.apply(vec![envelope]).await;
        self
    }

    /// Applies events appended one after another to `stream`, as one batch.
    ///
    /// # Panics
    /// When `stream` is not a valid stream id, the projection returns an error or the
    /// transaction cannot commit (then nothing of the batch is stored).
    pub async fn given_events(
        mut self,
        stream: &str,
        events: impl IntoIterator<Item = P::Event>,
    ) -> Self {
        let batch: Vec<_> = events
            .into_iter()
            .map(|event| self.log.place(envelope(stream, event)))
            .collect();
        self.apply(batch).await;
        self
    }

    async fn apply(&mut self, batch: Vec<Envelope<P::Event>>) {
        if batch.is_empty() {
            return;
        }
        if self.one_per_transaction {
            for envelope in batch {
                let at = describe(&envelope);
                self.transaction(std::slice::from_ref(&envelope), &at).await;
                self.applied.push(at);
            }
        } else {
            let described: Vec<String> = batch.iter().map(describe).collect();
            self.transaction(&batch, &described.join(", ")).await;
            self.applied.extend(described);
        }
    }

    /// One transaction: a single event through `apply`, or a batch through `apply_batch`.
    async fn transaction(&mut self, events: &[Envelope<P::Event>], at: &str) {
        let name = P::NAME;
        let mut tx = match self.pool.begin().await {
            Ok(tx) => tx,
            Err(error) => panic!("projection `{name}`: cannot begin a transaction: {error}"),
        };
        let applied: Result<(), BoxError> = async {
            let mut ptx = ProjectionTx::for_live_tables::<P>(&mut tx)?;
            match events {
                [one] if self.one_per_transaction => self.projection.apply(&mut ptx, one).await,
                _ => self.projection.apply_batch(&mut ptx, events).await,
            }
        }
        .await;
        if let Err(error) = applied {
            let _ = tx.rollback().await;
            panic!(
                "projection `{name}` failed to apply {at}: {error}\n{}",
                self.applied_listing()
            );
        }
        if let Err(error) = tx.commit().await {
            panic!("projection `{name}`: the transaction applying {at} did not commit: {error}");
        }
    }

    /// Checks that the query `sql` returns exactly `expected`, in order (write an `ORDER BY`).
    /// Rows decode into `T`, e.g. a tuple of the selected columns or a `#[derive(sqlx::FromRow)]`
    /// struct.
    ///
    /// # Panics
    /// When the query fails or the rows differ, showing both sides and the events applied.
    pub async fn then_rows<T>(self, sql: &str, expected: impl IntoIterator<Item = T>) -> Self
    where
        T: for<'r> FromRow<'r, PgRow> + Send + Unpin + PartialEq + Debug,
    {
        let expected: Vec<T> = expected.into_iter().collect();
        let actual = self.rows::<T>(sql).await;
        if actual != expected {
            panic!(
                "projection `{}`: the rows differ from the expected ones\n  sql: {sql}\n  expected:\n{}\n  actual:\n{}\n{}",
                P::NAME,
                pretty(&expected, 4),
                pretty(&actual, 4),
                self.applied_listing(),
            );
        }
        self
    }

    /// The rows the query `sql` returns, decoded into `T`.
    ///
    /// # Panics
    /// When the query fails; the message shows the SQL.
    pub async fn rows<T>(&self, sql: &str) -> Vec<T>
    where
        T: for<'r> FromRow<'r, PgRow> + Send + Unpin,
    {
        match sqlx::query_as::<_, T>(sqlx::AssertSqlSafe(sql))
            .fetch_all(&self.pool)
            .await
        {
            Ok(rows) => rows,
            Err(error) => panic!(
                "projection `{}`: the query failed: {error}\n  sql: {sql}",
                P::NAME
            ),
        }
    }

    /// The database's pool, for checks of your own.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The projection value.
    pub fn projection(&self) -> &P {
        &self.projection
    }

    fn applied_listing(&self) -> String {
        let mut out = format!("after {} event(s):", self.applied.len());
        for (i, at) in self.applied.iter().enumerate() {
            out.push_str(&format!("\n  [{i}] {at}"));
        }
        out
    }
}

fn describe<E: factum::Event>(envelope: &Envelope<E>) -> String {
    format!(
        "{} at version {} (position {}, {:?})",
        envelope.stream_id,
        envelope.stream_version,
        envelope.position.global,
        envelope.event.event_type()
    )
}
