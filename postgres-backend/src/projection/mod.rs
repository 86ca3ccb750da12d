//! Transactional projections: read models in PostgreSQL tables, updated **exactly once**.
//!
//! A [`PgProjection`] applies events with SQL on the transaction it is handed. A
//! [`PgProjectionRunner`] reads the global log in batches (gap-safe, filtered to the projection's
//! event types at the source; while catching up, the next batch is read while the current one is
//! applied) and, for each batch, opens **one** transaction that applies the events and moves the
//! projection's checkpoint. Either both commit or neither does, so after any
//! crash the runner resumes exactly where the read model stands: no event is applied twice, none
//! is skipped.
//!
//! ```no_run
//! use factum::{BoxError, Envelope};
//! use factum_postgres::projection::{PgProjection, PgProjectionRunner, ProjectionTx};
//! # #[derive(Debug)]
//! # enum AccountEvent { Deposited { amount: i64 } }
//! # impl factum::Event for AccountEvent {
//! #     fn event_type(&self) -> &'static str { "account.deposited" }
//! #     fn schema_version(&self) -> u32 { 1 }
//! #     fn event_types() -> &'static [&'static str] { &["account.deposited"] }
//! #     fn encode(&self) -> Result<Box<factum::RawValue>, factum::EncodeError> { unimplemented!() }
//! #     fn decode(stored: &factum::Stored<'_>) -> Result<Self, factum::DecodeError> { let (_, _, _) = (stored.event_type, stored.schema_version, stored.payload);
//! #         Ok(AccountEvent::Deposited { amount: 1 })
//! #     }
//! # }
//!
//! /// Balances per account, in table `balances(account text primary key, balance bigint)`.
//! struct Balances;
//!
//! impl PgProjection for Balances {
//!     const NAME: &'static str = "balances";
//!     const TABLES: &'static [&'static str] = &["balances"];
//!     type Event = AccountEvent;
//!
//!     async fn apply(
//!         &mut self,
//!         tx: &mut ProjectionTx<'_>,
//!         event: &Envelope<AccountEvent>,
//!     ) -> Result<(), BoxError> {
//!         let AccountEvent::Deposited { amount } = &event.event;
//!         let sql = format!(
//!             "INSERT INTO {0} AS b (account, balance) VALUES ($1, $2) \
//!              ON CONFLICT (account) DO UPDATE SET balance = b.balance + $2",
//!             tx.table("balances"),
//!         );
//!         sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
//!             .bind(event.stream_id.aggregate_id())
//!             .bind(amount)
//!             .execute(tx.conn())
//!             .await?;
//!         Ok(())
//!     }
//! }
//!
//! # async fn run(store: factum_postgres::PostgresStore) -> Result<(), factum::Error> {
//! let mut runner = PgProjectionRunner::new(store, Balances);
//! let shutdown = std::future::pending::<()>(); // e.g. a ctrl-c signal
//! runner.run(shutdown).await?; // catches up, then follows the log until shutdown
//! # Ok(()) }
//! ```
//!
//! # Failures
//! A handler error rolls the batch back; the runner then applies the batch's events one per
//! transaction, retrying the failing one ([`handler_retries`](PgProjectionRunner::handler_retries)).
//! (An event that does not decode is found before the batch is applied: the events before it
//! commit in one transaction, then it is retried alone.)
//! If it keeps failing, the runner stops with [`factum::Error::Handler`] (its checkpoint just
//! before the event), or — with [`park_failures`](PgProjectionRunner::park_failures) — parks it in
//! the dead-letter table in the same transaction that moves the checkpoint past it, and goes on.
//! [`retry_parked`](PgProjectionRunner::retry_parked) applies a parked event later (after the
//! handler is fixed), again in one transaction with its removal from the dead-letter table.
//!
//! # Several instances
//! The runner is factum's one consumer loop ([`Subscription`](factum::subscription::Subscription))
//! with [`PgCheckpoints`](crate::subscription::PgCheckpoints) and
//! [`PgLease`](crate::subscription::PgLease). Only one runner of a projection applies events at a
//! time: the runner holds a session-level advisory lock (a 64-bit key hashed from schema and
//! projection name) on a dedicated connection while it works.
//! Other instances wait in [`SubscriptionState::Standby`](factum::subscription::SubscriptionState)
//! and take over when the holder's connection ends (its process died, its task was dropped).
//! Independently of the lock, every batch transaction locks the checkpoint row and checks it is
//! where the runner left it, so two writers can never both apply a batch.
//!
//! # In-memory state
//! The read model lives in the tables: fields of the projection value are a cache at best, since
//! `apply` can run for events whose transaction is then rolled back (a later event of the batch
//! failed) and run again.

mod inbound;
mod rebuild;
mod runner;

use std::borrow::Cow;
use std::future::Future;

use factum::{BoxError, Envelope, Error, Event};
use sqlx::PgConnection;

pub use inbound::InboundProjection;
pub use rebuild::Progress;
pub use runner::PgProjectionRunner;

/// A read model kept in PostgreSQL tables, updated in the runner's transaction.
///
/// Implement `apply` with `async fn`; write with SQL on [`ProjectionTx::conn`], naming tables
/// through [`ProjectionTx::table`] so a [rebuild](PgProjectionRunner::rebuild) can redirect the
/// writes into fresh tables.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a PostgreSQL projection",
    note = "implement `factum_postgres::projection::PgProjection` for `{Self}`: a NAME, its TABLES, an Event type and an `async fn apply`"
)]
pub trait PgProjection: Send + 'static {
    /// A stable name: the key of the projection's checkpoint and lease.
    const NAME: &'static str;
    /// The tables the projection writes (`name` or `schema.name`, lowercase identifiers), so a
    /// rebuild can build fresh copies and swap them in. Tables not listed are written in place.
    const TABLES: &'static [&'static str] = &[];
    /// The events it handles; the runner reads only their wire names.
    type Event: Event;

    /// The events registered in the categories this projection reads, or `None` (the default)
    /// to read only its own event types at the source. With them, the runner reads those
    /// categories whole and stops on (or parks) an event of a type nothing registers, instead of
    /// never seeing it: see [`factum::Projection::known_events`].
    fn known_events() -> Option<factum::subscription::KnownEvents> {
        None
    }

    /// Applies one event within the runner's transaction. An error rolls the transaction back.
    fn apply(
        &mut self,
        tx: &mut ProjectionTx<'_>,
        event: &Envelope<Self::Event>,
    ) -> impl Future<Output = Result<(), BoxError>> + Send;

    /// Applies a batch of events (in log order) within the runner's transaction; by default,
    /// [`apply`](Self::apply) for each. Override it to write a whole batch in a few statements
    /// (e.g. `unnest`ed arrays): the runner's throughput is then bound by reading, not by round
    /// trips. An error rolls the transaction back; the runner then retries the events one per
    /// transaction with [`apply`](Self::apply), to find and handle the failing one.
    fn apply_batch(
        &mut self,
        tx: &mut ProjectionTx<'_>,
        events: &[Envelope<Self::Event>],
    ) -> impl Future<Output = Result<(), BoxError>> + Send {
        async move {
            for event in events {
                self.apply(tx, event).await?;
            }
            Ok(())
        }
    }
}

/// The transaction a [`PgProjection`] writes in, and where its tables are.
pub struct ProjectionTx<'a> {
    conn: &'a mut PgConnection,
    tables: Cow<'a, Tables>,
}

impl std::fmt::Debug for ProjectionTx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProjectionTx")
            .field("tables", &self.tables)
            .finish_non_exhaustive()
    }
}

impl<'a> ProjectionTx<'a> {
    pub(crate) fn new(conn: &'a mut PgConnection, tables: &'a Tables) -> Self {
        Self {
            conn,
            tables: Cow::Borrowed(tables),
        }
    }

    /// The handle the runner gives `P`'s [`apply`](PgProjection::apply), on a transaction the
    /// caller holds, writing to `P`'s live tables: for code that drives a projection itself,
    /// such as test fixtures (`factum_testkit::PgProjectionFixture`). The caller begins and
    /// commits the transaction; no checkpoint is read or moved.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when one of `P::TABLES` is not a valid table name.
    pub fn for_live_tables<P: PgProjection>(conn: &'a mut PgConnection) -> Result<Self, Error> {
        Ok(Self {
            conn,
            tables: Cow::Owned(Tables::new(P::TABLES, "")?),
        })
    }

    /// The connection, inside the batch's transaction: run the read model's SQL on it.
    pub fn conn(&mut self) -> &mut PgConnection {
        self.conn
    }

    /// The SQL name (quoted) to use for the declared table `name`: the live table normally, its
    /// `_rebuild` copy during a rebuild. Names not in [`PgProjection::TABLES`] are returned as
    /// given.
    pub fn table<'n>(&'n self, name: &'n str) -> &'n str {
        self.tables.get(name).unwrap_or(name)
    }
}

/// A projection's declared tables and the names its writes go to.
#[derive(Clone, Debug, Default)]
pub(crate) struct Tables {
    /// (declared name, quoted name to write to)
    entries: Vec<(String, String)>,
}

/// A table name split into its optional schema and its name, validated.
#[derive(Clone, Debug)]
pub(crate) struct TableName {
    schema: Option<String>,
    name: String,
}

impl TableName {
    pub(crate) fn parse(declared: &str) -> Result<Self, Error> {
        let valid = |part: &str| {
            let mut chars = part.chars();
            chars
                .next()
                .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
                && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                && part.len() <= 50
        };
        let (schema, name) = match declared.split_once('.') {
            Some((schema, name)) => (Some(schema), name),
            None => (None, declared),
        };
        if !valid(name) || !schema.is_none_or(valid) {
            return Err(Error::InvalidArgument(format!(
                "projection table {declared:?} is invalid: use `name` or `schema.name` with 1 to 50 lowercase ASCII letters, digits or `_` each"
            )));
        }
        Ok(Self {
            schema: schema.map(str::to_owned),
            name: name.to_owned(),
        })
    }

    /// The quoted, schema-qualified name with `suffix` appended to the table name.
    pub(crate) fn quoted(&self, suffix: &str) -> String {
        match &self.schema {
            Some(schema) => format!("\"{schema}\".\"{}{suffix}\"", self.name),
            None => format!("\"{}{suffix}\"", self.name),
        }
    }

    /// The bare table name with `suffix`, quoted (for `ALTER TABLE ... RENAME TO`).
    pub(crate) fn bare(&self, suffix: &str) -> String {
        format!("\"{}{suffix}\"", self.name)
    }
}

impl Tables {
    /// The declared tables, each written to its name with `suffix` appended.
    pub(crate) fn new(declared: &[&str], suffix: &str) -> Result<Self, Error> {
        let entries = declared
            .iter()
            .map(|d| Ok(((*d).to_owned(), TableName::parse(d)?.quoted(suffix))))
            .collect::<Result<_, Error>>()?;
        Ok(Self { entries })
    }

    fn get(&self, declared: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(d, _)| d == declared)
            .map(|(_, q)| q.as_str())
    }
}

/// Checks a projection's declaration once, so errors come at construction, not mid-run.
/// Whether a projection's declaration is valid: a non-empty `NAME`, and `TABLES` of `name` or
/// `schema.name` with 1 to 50 lowercase ASCII letters, digits or `_` each, not starting with a
/// digit (the rule of [`TableName::parse`], in a form the compiler can evaluate).
pub(crate) const fn declaration_is_valid(name: &str, tables: &[&str]) -> bool {
    const fn part_is_valid(bytes: &[u8], start: usize, end: usize) -> bool {
        if end <= start || end - start > 50 || bytes[start].is_ascii_digit() {
            return false;
        }
        let mut i = start;
        while i < end {
            let b = bytes[i];
            if !(b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') {
                return false;
            }
            i += 1;
        }
        true
    }
    if name.is_empty() {
        return false;
    }
    let mut t = 0;
    while t < tables.len() {
        let bytes = tables[t].as_bytes();
        let mut dot = None;
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'.' {
                if dot.is_some() {
                    return false;
                }
                dot = Some(i);
            }
            i += 1;
        }
        let valid = match dot {
            Some(d) => part_is_valid(bytes, 0, d) && part_is_valid(bytes, d + 1, bytes.len()),
            None => part_is_valid(bytes, 0, bytes.len()),
        };
        if !valid {
            return false;
        }
        t += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_validated_and_quoted() {
        let t = TableName::parse("read.balances").unwrap();
        assert_eq!(t.quoted("_rebuild"), "\"read\".\"balances_rebuild\"");
        assert_eq!(t.bare(""), "\"balances\"");
        assert!(TableName::parse("Balances").is_err());
        assert!(TableName::parse("x; drop table y").is_err());
        assert!(TableName::parse("a.b.c").is_err());
        let tables = Tables::new(&["balances"], "_rebuild").unwrap();
        assert_eq!(tables.get("balances"), Some("\"balances_rebuild\""));
        assert_eq!(tables.get("other"), None);
    }

    #[test]
    fn the_compile_time_rule_is_the_parse_rule() {
        for table in [
            "balances",
            "read.balances",
            "_x1",
            "Balances",
            "x; drop table y",
            "a.b.c",
            "1abc",
            "a.",
            ".a",
            "",
            "read.Balances",
            &"a".repeat(50),
            &"a".repeat(51),
        ] {
            assert_eq!(
                declaration_is_valid("p", &[table]),
                TableName::parse(table).is_ok(),
                "{table:?}"
            );
        }
        assert!(!declaration_is_valid("", &[]));
        assert!(declaration_is_valid("p", &[]));
    }
}
