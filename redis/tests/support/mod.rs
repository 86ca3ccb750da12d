//! What the Redis sink's tests share: a deterministic log, a read model that a double apply or a
//! lost write would show, and its fold.

#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::time::Duration;

use factum::subscription::{BatchFailure, BatchHandler};
use factum::{
    AppendRequest, EventId, EventStore, InMemoryStore, LogPosition, NewEvent, RawValue,
    RecordedEvent, StreamId,
};
use factum_redis::redis::AsyncCommands as _;
use factum_redis::{RedisKeyspace, RedisTx};

pub const LIMIT: Duration = Duration::from_secs(60);

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime")
}

/// The id of event `i` of the test log: the same in every process.
pub fn event_id(i: usize) -> EventId {
    EventId::from_uuid(uuid::Uuid::new_v5(
        &uuid::Uuid::NAMESPACE_OID,
        format!("factum-redis-test-event-{i}").as_bytes(),
    ))
}

/// The amount event `i` adds to its stream's total.
pub fn amount(i: usize) -> i64 {
    (i as i64 % 7) + 1
}

/// A log of `events` events over `streams` streams, appended in batches of up to 3, in the same
/// order with the same ids (so the same positions) in every process. Payloads are ~300 bytes.
pub async fn test_log(events: usize, streams: usize) -> InMemoryStore {
    let store = InMemoryStore::new();
    let mut i = 0;
    while i < events {
        let stream = StreamId::new(format!("account-{}", i % streams)).expect("stream id");
        let n = (events - i).min(1 + i % 3);
        let batch = (i..i + n)
            .map(|j| NewEvent {
                event_id: event_id(j),
                event_type: "account.credited".into(),
                schema_version: 1,
                payload: RawValue::from_string(format!(
                    r#"{{"amount":{},"reference":"{}","note":"{}"}}"#,
                    amount(j),
                    event_id(j),
                    "x".repeat(220)
                ))
                .expect("json"),
                metadata: Default::default(),
            })
            .collect();
        store
            .append(AppendRequest::new(stream, batch))
            .await
            .expect("append");
        i += n;
    }
    store
}

pub async fn all_events(store: &InMemoryStore) -> Vec<RecordedEvent> {
    store
        .read_all(LogPosition::START, usize::MAX, &Default::default())
        .await
        .expect("read")
}

pub fn amount_of(event: &RecordedEvent) -> Result<i64, String> {
    let payload: serde_json::Value =
        serde_json::from_str(event.payload.get()).map_err(|e| e.to_string())?;
    payload["amount"]
        .as_i64()
        .ok_or_else(|| format!("event {} has no amount", event.event_id))
}

/// The read model: per stream a total (read, added to, written back: a double apply or a lost
/// write changes it) in the hash `{ns}:totals`, and every applied event id in order in the list
/// `{ns}:applied`.
#[derive(Default)]
pub struct Ledger {
    /// Says "factum-child: batch" on stdout at the start of each batch (for the crash tests).
    pub announce: bool,
}

impl Ledger {
    pub async fn apply(tx: &mut RedisTx, events: &[RecordedEvent]) -> Result<(), BatchFailure> {
        let totals = tx.key("totals");
        let applied = tx.key("applied");
        let mut running: BTreeMap<String, i64> = BTreeMap::new();
        for (i, event) in events.iter().enumerate() {
            let amount = amount_of(event).map_err(|e| BatchFailure::at(i, e))?;
            let stream = event.stream_id.as_str().to_owned();
            let current = match running.get(&stream) {
                Some(v) => *v,
                None => {
                    // A real read per event: the batch takes a while, so a kill lands inside it.
                    let stored: Option<i64> = tx
                        .query(factum_redis::redis::cmd("HGET").arg(&totals).arg(&stream))
                        .await
                        .map_err(|e| BatchFailure::at(i, e))?;
                    stored.unwrap_or(0)
                }
            };
            running.insert(stream.clone(), current + amount);
            tx.pipe().hset(&totals, &stream, current + amount);
            tx.pipe().rpush(&applied, event.event_id.to_string());
        }
        Ok(())
    }
}

impl BatchHandler<RedisTx> for Ledger {
    async fn handle_batch(
        &mut self,
        tx: &mut RedisTx,
        events: &[RecordedEvent],
    ) -> Result<(), BatchFailure> {
        if self.announce {
            println!("factum-child: batch");
        }
        Self::apply(tx, events).await
    }
}

/// The read model as stored.
#[derive(Debug, PartialEq, Eq)]
pub struct ReadModel {
    pub totals: BTreeMap<String, i64>,
    pub applied: Vec<String>,
}

pub async fn read_model(keyspace: &RedisKeyspace) -> ReadModel {
    let mut conn = keyspace.connection();
    let totals: BTreeMap<String, i64> = conn
        .hgetall(keyspace.key("totals"))
        .await
        .expect("read totals");
    let applied: Vec<String> = conn
        .lrange(keyspace.key("applied"), 0, -1)
        .await
        .expect("read applied");
    ReadModel { totals, applied }
}

/// What the read model must be after applying `events`, each once, in order.
pub fn fold<'a>(events: impl IntoIterator<Item = &'a RecordedEvent>) -> ReadModel {
    let mut totals = BTreeMap::new();
    let mut applied = Vec::new();
    for event in events {
        *totals
            .entry(event.stream_id.as_str().to_owned())
            .or_insert(0) += amount_of(event).expect("amount");
        applied.push(event.event_id.to_string());
    }
    ReadModel { totals, applied }
}
