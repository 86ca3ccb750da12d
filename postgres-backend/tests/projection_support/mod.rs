//! A ledger read model shared by the transactional-projection tests: a total, a count, each
//! stream's last version, and a unique row per applied event (a second application of an event
//! fails on its primary key, so "applied once" is checked by the database itself).

#![allow(dead_code, unreachable_pub)]

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use factum::subscription::SubscriptionStatus;
use factum::{
    BoxError, DecodeError, EncodeError, Envelope, EventId, EventStore, NewEvent, RawValue, StreamId,
};
use factum_postgres::PostgresStore;
use factum_postgres::projection::{PgProjection, ProjectionTx};
use factum_testkit::postgres::TestDatabase;
use sqlx::PgPool;
use tokio::sync::watch;

#[derive(Debug)]
pub struct Entry {
    pub n: i64,
}

impl factum::Event for Entry {
    fn event_type(&self) -> &'static str {
        "ledger.entry"
    }
    fn schema_version(&self) -> u32 {
        1
    }
    fn event_types() -> &'static [&'static str] {
        &["ledger.entry"]
    }
    fn encode(&self) -> Result<Box<RawValue>, EncodeError> {
        factum::encode_json(&serde_json::json!({ "n": self.n }))
    }
    fn decode(stored: &factum::Stored<'_>) -> Result<Self, DecodeError> {
        let (event_type, version, payload) =
            (stored.event_type, stored.schema_version, stored.payload);
        match (event_type, version) {
            ("ledger.entry", 1) => {
                let value: serde_json::Value = factum::decode_json(payload)?;
                Ok(Entry {
                    n: value["n"].as_i64().unwrap_or_default(),
                })
            }
            _ => Err(DecodeError::unknown(event_type, version)),
        }
    }
}

/// The projection under test; fails on entries whose `n` is in `poison`. With a `probe`, it
/// records its runner's status each time it applies an event.
#[derive(Default)]
pub struct Ledger {
    pub poison: HashSet<i64>,
    pub probe: Option<(watch::Receiver<SubscriptionStatus>, Vec<SubscriptionStatus>)>,
}

impl PgProjection for Ledger {
    const NAME: &'static str = "ledger";
    const TABLES: &'static [&'static str] = &["ledger_totals", "ledger_streams", "ledger_applied"];
    type Event = Entry;

    async fn apply(
        &mut self,
        tx: &mut ProjectionTx<'_>,
        event: &Envelope<Entry>,
    ) -> Result<(), BoxError> {
        if let Some((status, seen)) = &mut self.probe {
            seen.push(status.borrow().clone());
        }
        if self.poison.contains(&event.event.n) {
            return Err(format!("entry {} is poisoned", event.event.n).into());
        }
        // One round trip per event: three writes in one statement.
        let sql = format!(
            "WITH a AS (INSERT INTO {applied} (event_id) VALUES ($1)), \
                  s AS (INSERT INTO {streams} AS s (stream_id, last_version) VALUES ($2, $3) \
                        ON CONFLICT (stream_id) DO UPDATE \
                        SET last_version = GREATEST(s.last_version, EXCLUDED.last_version)) \
             INSERT INTO {totals} AS t (id, total, count) VALUES (1, $4, 1) \
             ON CONFLICT (id) DO UPDATE SET total = t.total + $4, count = t.count + 1",
            applied = tx.table("ledger_applied"),
            streams = tx.table("ledger_streams"),
            totals = tx.table("ledger_totals"),
        );
        sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
            .bind(event.event_id.as_uuid())
            .bind(event.stream_id.as_str())
            .bind(i64::try_from(event.stream_version.get())?)
            .bind(event.event.n)
            .execute(tx.conn())
            .await?;
        Ok(())
    }
}

pub async fn create_tables(pool: &PgPool) {
    sqlx::raw_sql(
        "CREATE TABLE ledger_totals (id int PRIMARY KEY, total bigint NOT NULL, count bigint NOT NULL); \
         CREATE TABLE ledger_streams (stream_id text PRIMARY KEY, last_version bigint NOT NULL); \
         CREATE TABLE ledger_applied (event_id uuid PRIMARY KEY);",
    )
    .execute(pool)
    .await
    .expect("create the read model's tables");
}

/// The read model: (total, count, last version per stream, applied event ids).
#[derive(Debug, PartialEq, Eq, Default)]
pub struct Model {
    pub total: i64,
    pub count: i64,
    pub streams: BTreeMap<String, i64>,
    pub applied: usize,
}

pub async fn read_model(pool: &PgPool) -> Model {
    let (total, count): (i64, i64) =
        sqlx::query_as("SELECT total, count FROM ledger_totals WHERE id = 1")
            .fetch_optional(pool)
            .await
            .expect("totals")
            .unwrap_or_default();
    let streams: Vec<(String, i64)> =
        sqlx::query_as("SELECT stream_id, last_version FROM ledger_streams")
            .fetch_all(pool)
            .await
            .expect("streams");
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger_applied")
        .fetch_one(pool)
        .await
        .expect("applied");
    Model {
        total,
        count,
        streams: streams.into_iter().collect(),
        applied: usize::try_from(applied).expect("count"),
    }
}

/// What the events written so far fold to, kept by the test as it writes.
#[derive(Debug, Default)]
pub struct Fold {
    pub model: Model,
    pub ids: Vec<EventId>,
}

impl Fold {
    pub fn add(&mut self, stream: &str, version: u64, n: i64, id: EventId) {
        self.model.total += n;
        self.model.count += 1;
        self.model.applied += 1;
        let version = i64::try_from(version).expect("version");
        let last = self.model.streams.entry(stream.to_owned()).or_default();
        *last = (*last).max(version);
        self.ids.push(id);
    }
}

pub fn entry(n: i64) -> NewEvent {
    NewEvent::encode(&Entry { n }, Default::default()).expect("encode")
}

/// Appends `count` entries to `stream` (numbers `first..`), recording them in `fold`.
pub async fn append(store: &PostgresStore, fold: &mut Fold, stream: &str, first: i64, count: i64) {
    let id = StreamId::new(stream).expect("id");
    let batch: Vec<NewEvent> = (first..first + count).map(entry).collect();
    let ids: Vec<EventId> = batch.iter().map(|e| e.event_id).collect();
    let result = store
        .append(factum::AppendRequest::new(id.clone(), batch))
        .await
        .expect("append");
    let last = result.stream_version.get();
    let base = last - u64::try_from(count).expect("count");
    for (i, (n, id)) in (first..first + count).zip(ids).enumerate() {
        fold.add(stream, base + 1 + i as u64, n, id);
    }
}

/// A store whose reads wait out transactions in flight elsewhere in the cluster-wide horizon.
pub fn patient_store(db: &TestDatabase) -> PostgresStore {
    db.store_with(
        factum_postgres::StoreOptions::default().with_read_settle_timeout(Duration::from_secs(10)),
    )
}

pub async fn bounded<F: std::future::Future>(seconds: u64, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(seconds), f)
        .await
        .expect("the test finished in time")
}

/// Waits (bounded) until the status satisfies `pred`.
pub async fn wait_for(
    status: &mut watch::Receiver<SubscriptionStatus>,
    what: &str,
    pred: impl FnMut(&SubscriptionStatus) -> bool,
) {
    let waited = tokio::time::timeout(Duration::from_secs(30), async {
        status.wait_for(pred).await.is_ok()
    })
    .await;
    match waited {
        Ok(true) => {}
        Ok(false) => panic!("the runner went away while waiting for {what}"),
        Err(_) => panic!("timed out waiting for {what}: {:?}", *status.borrow()),
    }
}
