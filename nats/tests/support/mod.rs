//! Two services for the end-to-end tests: `bank` (the bank example's accounts, publishing its
//! account events) and `audit` (keeping a balance per account from them, and an event of its own
//! per event received), each with its own PostgreSQL database.

#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::time::Duration;

use bank::{Account, AccountCommand, AccountEvent};
use factum::bus::{
    Bus, ConsumerConfig, InboundConsumer, InboundOptions, InboundStatus, PublicEvents, Relay,
    RelayStatus, ServiceName, StreamConfig,
};
use factum::subscription::{BatchFailure, BatchHandler, Subscription};
use factum::{
    AppendRequest, BoxError, CommandContext, EventFilter, EventId, EventMetadata, EventStore,
    LogPosition, NewEvent, RawValue, RecordedEvent, Repository, StreamId,
};
use factum_postgres::subscription::{PgLease, PgTx};
use factum_postgres::{PgInbox, PostgresStore, StoreOptions};
use factum_testkit::postgres::PATIENT_READ_SETTLE;
use tokio::sync::watch;

pub const BANK: &str = "bank";
pub const AUDIT: &str = "audit";
/// The audit service's durable consumer of the bank's events.
pub const CONSUMER: &str = "audit-from-bank";

pub fn bank() -> ServiceName {
    ServiceName::new(BANK).expect("valid")
}

pub fn audit() -> ServiceName {
    ServiceName::new(AUDIT).expect("valid")
}

/// The bank's store, opened for the bank service.
pub fn bank_store(pool: &sqlx::PgPool) -> PostgresStore {
    PostgresStore::with_options(
        pool.clone(),
        StoreOptions::default()
            .for_service(bank())
            .with_read_settle_timeout(PATIENT_READ_SETTLE),
    )
}

/// The audit service's store, opened for the audit service.
pub fn audit_store(pool: &sqlx::PgPool) -> PostgresStore {
    PostgresStore::with_options(pool.clone(), StoreOptions::default().for_service(audit()))
}

/// The audit service's read model table.
pub async fn create_read_model(store: &PostgresStore) {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS audit_balances \
         (account text PRIMARY KEY, balance bigint NOT NULL, events bigint NOT NULL)",
    )
    .execute(store.pool())
    .await
    .expect("create the read model");
}

/// What the bank publishes: its account events, as stored.
pub fn routes() -> PublicEvents {
    PublicEvents::new(bank())
        .publish_event::<AccountEvent>("account")
        .expect("valid routes")
}

/// The bank's bus stream; `window` is its duplicate window.
pub fn stream(window: Duration) -> StreamConfig {
    StreamConfig::for_service(&bank()).duplicate_window(window)
}

pub fn consumer_config(ack_wait: Duration) -> ConsumerConfig {
    ConsumerConfig::new(stream(Duration::ZERO).name, CONSUMER)
        .filter_subject("bank.account.>")
        .ack_wait(ack_wait)
}

/// Opens `accounts` accounts and makes `deposits` deposits spread over them.
pub async fn bank_activity(store: &PostgresStore, accounts: usize, deposits: usize, first: usize) {
    let repository = Repository::<Account, _>::new(store.clone());
    for i in first..first + accounts {
        repository
            .execute(AccountCommand::Open {
                account: format!("a{i}"),
                owner: format!("owner {i}"),
            })
            .await
            .expect("open");
    }
    for d in 0..deposits {
        repository
            .execute(AccountCommand::Deposit {
                account: format!("a{}", first + d % accounts),
                amount: 1 + d as u64,
            })
            .await
            .expect("deposit");
    }
}

/// The audit read model a fold of the bank's log gives: account stream → (balance, events).
pub async fn fold_of_bank(store: &PostgresStore) -> BTreeMap<String, (i64, i64)> {
    let mut out = BTreeMap::new();
    let mut after = LogPosition::START;
    loop {
        let page = store
            .read_all(
                after,
                1000,
                &EventFilter::all().with_categories(["account"]),
            )
            .await
            .expect("read the bank's log");
        let Some(last) = page.last() else { break };
        after = last.position;
        for event in &page {
            let entry = out
                .entry(event.stream_id.to_string())
                .or_insert((0i64, 0i64));
            entry.0 += delta(event).expect("decodes");
            entry.1 += 1;
        }
    }
    out
}

/// The audit read model as stored.
pub async fn audit_read_model(store: &PostgresStore) -> BTreeMap<String, (i64, i64)> {
    let rows: Vec<(String, i64, i64)> =
        sqlx::query_as("SELECT account, balance, events FROM audit_balances")
            .fetch_all(store.pool())
            .await
            .expect("read the read model");
    rows.into_iter().map(|(a, b, e)| (a, (b, e))).collect()
}

/// The bank's events the audit service recorded one of its own for, and the number of those
/// events (equal when each was handled once).
pub async fn audit_events(store: &PostgresStore) -> Vec<RecordedEvent> {
    store
        .read_all(
            LogPosition::START,
            100_000,
            &EventFilter::all().with_categories(["audit"]),
        )
        .await
        .expect("read the audit log")
}

fn delta(event: &RecordedEvent) -> Result<i64, factum::Error> {
    Ok(match event.decode::<AccountEvent>()?.event {
        AccountEvent::Deposited(d) => i64::try_from(d.amount).unwrap_or(i64::MAX),
        AccountEvent::Withdrawn(w) => -i64::try_from(w.amount).unwrap_or(i64::MAX),
        _ => 0,
    })
}

/// The audit service's handler: the read model row and an `audit.noted` event of its own, caused
/// by the bank's event, in the inbox's transaction.
#[derive(Clone)]
pub struct Auditor {
    pub store: PostgresStore,
}

impl Auditor {
    async fn apply(&self, tx: &mut PgTx, event: &RecordedEvent) -> Result<(), BoxError> {
        let delta = delta(event)?;
        sqlx::query(
            "INSERT INTO audit_balances (account, balance, events) VALUES ($1, $2, 1) \
             ON CONFLICT (account) DO UPDATE SET balance = audit_balances.balance + EXCLUDED.balance, \
             events = audit_balances.events + 1",
        )
        .bind(event.stream_id.as_str())
        .bind(delta)
        .execute(tx.conn())
        .await?;
        let envelope = event.decode::<AccountEvent>()?;
        let context = CommandContext::caused_by(&envelope);
        let noted = NewEvent {
            event_id: EventId::derived(context.command_id, 0),
            event_type: "audit.noted".into(),
            schema_version: 1,
            payload: RawValue::from_string(format!(r#"{{"delta":{delta}}}"#))?,
            metadata: EventMetadata {
                correlation_id: Some(context.correlation_id),
                causation_id: context.causation_id,
                user: Default::default(),
            },
        };
        let stream = StreamId::for_aggregate("audit", event.stream_id.aggregate_id())?;
        self.store
            .append_in(tx.conn(), AppendRequest::new(stream, vec![noted]))
            .await?;
        Ok(())
    }
}

impl BatchHandler<PgTx> for Auditor {
    async fn handle_batch(
        &mut self,
        tx: &mut PgTx,
        events: &[RecordedEvent],
    ) -> Result<(), BatchFailure> {
        for event in events {
            self.apply(tx, event)
                .await
                .map_err(BatchFailure::somewhere)?;
        }
        Ok(())
    }
}

/// The subscription a relay runs on: plain checkpoints, the PostgreSQL lease.
pub type RelaySubscription =
    Subscription<PostgresStore, factum::subscription::StoreCheckpoints<PostgresStore>, PgLease>;

/// The bank's relay on `bus`, as a leased, checkpointed subscription of its log.
pub fn relay<B: Bus>(
    store: &PostgresStore,
    bus: B,
    batch: usize,
) -> (Relay<B>, RelaySubscription, watch::Receiver<RelayStatus>) {
    let relay = Relay::new(bus, routes());
    let status = relay.status();
    // Plain checkpoints, no transaction: one held open while publishing would hold back the
    // gap-safe horizon of every reader of the cluster.
    let subscription = Subscription::new(relay.name(), store.clone())
        .filter(relay.filter())
        .batch_size(batch)
        .idle_backoff(Duration::from_millis(5), Duration::from_millis(50))
        .lease(PgLease::new(store));
    (relay, subscription, status)
}

/// The audit service's inbound consumer on `bus`.
pub fn consumer<B: Bus>(
    store: &PostgresStore,
    bus: B,
    ack_wait: Duration,
) -> (InboundConsumer<B, PgInbox>, watch::Receiver<InboundStatus>) {
    let consumer = InboundConsumer::new(bus, PgInbox::new(store), consumer_config(ack_wait))
        .options(InboundOptions::default().fetch_wait(Duration::from_millis(200)));
    let status = consumer.status();
    (consumer, status)
}

/// The audit service's consumer running in a task of its own, until stopped.
pub struct RunningConsumer {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
    /// Its status.
    pub status: watch::Receiver<InboundStatus>,
}

/// Starts the audit service's consumer on `bus` (with the `Auditor` handler) in a task.
pub fn spawn_auditor<B: Bus + 'static>(
    audit: &PostgresStore,
    bus: B,
    ack_wait: Duration,
) -> RunningConsumer
where
    B::Consumer: 'static,
{
    let (mut consumer, status) = consumer(audit, bus, ack_wait);
    let auditor = Auditor {
        store: audit.clone(),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        consumer
            .run(auditor, async {
                let _ = stopped.await;
            })
            .await
            .expect("consumer");
    });
    RunningConsumer { stop, task, status }
}

impl RunningConsumer {
    /// Stops it and waits for its task.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.expect("consumer task");
    }
}

/// Waits until `status` satisfies `done`, failing after `limit` with the last status.
pub async fn until<T: Clone + std::fmt::Debug>(
    status: &mut watch::Receiver<T>,
    limit: Duration,
    what: &str,
    done: impl Fn(&T) -> bool,
) -> T {
    let reached = match tokio::time::timeout(limit, status.wait_for(|s| done(s))).await {
        Ok(Ok(value)) => Some(value.clone()),
        Ok(Err(_)) => None,
        Err(_) => None,
    };
    reached.unwrap_or_else(|| {
        panic!(
            "{what}: not reached within {limit:?}; last status {:?}",
            *status.borrow()
        )
    })
}

/// Checks what every scenario must end with: the audit read model equals a fold of the bank's
/// log (each event applied exactly once), one audit event per bank event, each caused by it and
/// in its workflow.
pub async fn assert_exactly_once(bank: &PostgresStore, audit: &PostgresStore) {
    let expected = fold_of_bank(bank).await;
    let got = audit_read_model(audit).await;
    assert_eq!(
        got, expected,
        "the audit read model is a fold of the bank's log"
    );
    let sent: usize = expected.values().map(|(_, n)| *n as usize).sum();
    let bank_events: BTreeMap<EventId, RecordedEvent> = {
        let mut all = BTreeMap::new();
        let mut after = LogPosition::START;
        loop {
            let page = bank
                .read_all(
                    after,
                    1000,
                    &EventFilter::all().with_categories(["account"]),
                )
                .await
                .expect("read");
            let Some(last) = page.last() else { break };
            after = last.position;
            all.extend(page.into_iter().map(|e| (e.event_id, e)));
        }
        all
    };
    let noted = audit_events(audit).await;
    assert_eq!(noted.len(), sent, "one audit event per bank event");
    for event in &noted {
        let cause = event
            .metadata
            .causation_id
            .expect("caused by the bank's event");
        let source = bank_events
            .get(&EventId::from_uuid(cause.as_uuid()))
            .expect("the cause is a bank event");
        let workflow = source
            .metadata
            .correlation_id
            .expect("bank events carry a correlation id");
        assert_eq!(
            event.metadata.correlation_id,
            Some(workflow),
            "the correlation id crosses the service boundary"
        );
    }
}
