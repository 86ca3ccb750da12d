//! Subscriptions on PostgreSQL: checkpoints survive a restart, writers committing concurrently are
//! all seen once in log order, and poison events are parked in the dead-letter table.

use std::collections::HashSet;
use std::time::Duration;

use factum::subscription::{CheckpointStore, DeadLetterStore, EventHandler, Subscription};
use factum::{
    BoxError, EventId, EventStore, ExpectedVersion, NewEvent, RawValue, RecordedEvent, StreamId,
};
use factum_testkit::postgres::TestDatabase;

fn event(n: u64) -> NewEvent {
    NewEvent {
        event_id: EventId::new(),
        event_type: "ledger.entry".to_owned(),
        schema_version: 1,
        payload: RawValue::from_string(format!(r#"{{"n":{n}}}"#)).expect("json"),
        metadata: Default::default(),
    }
}

#[derive(Default)]
struct Recorder {
    seen: Vec<RecordedEvent>,
    poison: HashSet<EventId>,
}

impl EventHandler for Recorder {
    async fn handle(&mut self, event: &RecordedEvent) -> Result<(), BoxError> {
        if self.poison.contains(&event.event_id) {
            return Err("poisoned".into());
        }
        self.seen.push(event.clone());
        Ok(())
    }
}

/// A store whose reads wait out transactions in flight elsewhere in the (cluster-wide) horizon
/// for longer than the default, so "caught up" means caught up even on a loaded machine.
fn patient_store(db: &TestDatabase) -> factum_postgres::PostgresStore {
    db.store_with(
        factum_postgres::StoreOptions::default().with_read_settle_timeout(Duration::from_secs(10)),
    )
}

async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(120), f)
        .await
        .expect("the test finished in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_are_seen_once_in_order_and_the_checkpoint_survives_a_restart() {
    bounded(async {
        let db = TestDatabase::create().await;
        let store = patient_store(&db);
        let writers: Vec<_> = (0..8)
            .map(|w| {
                let store = store.clone();
                tokio::spawn(async move {
                    let id = StreamId::new(format!("ledger-{w}")).expect("id");
                    let mut ids = Vec::new();
                    for n in 0..25 {
                        let batch = vec![event(n), event(n)];
                        ids.extend(batch.iter().map(|e| e.event_id));
                        store
                            .append(factum::AppendRequest::new(id.clone(), batch))
                            .await
                            .expect("append");
                    }
                    ids
                })
            })
            .collect();
        // A subscription catching up while the writers commit concurrently, repeatedly.
        let mut recorder = Recorder::default();
        let mut subscription = Subscription::new("ledger", store.clone()).batch_size(16);
        let mut written = HashSet::new();
        for writer in writers {
            subscription
                .catch_up(&mut recorder)
                .await
                .expect("catch up");
            written.extend(writer.await.expect("writer"));
        }
        let reached = subscription
            .catch_up(&mut recorder)
            .await
            .expect("catch up");
        assert_eq!(
            recorder.seen.len(),
            written.len(),
            "every event exactly once"
        );
        assert_eq!(
            recorder
                .seen
                .iter()
                .map(|e| e.event_id)
                .collect::<HashSet<_>>(),
            written
        );
        assert!(
            recorder
                .seen
                .windows(2)
                .all(|w| w[0].position < w[1].position)
        );
        assert_eq!(
            store.load_checkpoint("ledger").await.expect("load"),
            Some(reached)
        );

        // A new instance resumes from the stored checkpoint.
        let later = event(99);
        let later_id = later.event_id;
        store
            .append(factum::AppendRequest::new(
                StreamId::new("ledger-x").expect("id"),
                vec![later],
            ))
            .await
            .expect("append");
        let mut restarted = Recorder::default();
        Subscription::new("ledger", store.clone())
            .catch_up(&mut restarted)
            .await
            .expect("catch up");
        assert_eq!(
            restarted
                .seen
                .iter()
                .map(|e| e.event_id)
                .collect::<Vec<_>>(),
            [later_id]
        );
    })
    .await;
}

#[tokio::test]
async fn poison_events_are_parked_in_postgres_and_can_be_unparked() {
    bounded(async {
        let db = TestDatabase::create().await;
        let store = patient_store(&db);
        let id = StreamId::new("ledger-1").expect("id");
        let batch = vec![event(1), event(2), event(3)];
        let poison = batch[1].event_id;
        store
            .append(
                factum::AppendRequest::new(id.clone(), batch)
                    .expected_version(ExpectedVersion::NoStream),
            )
            .await
            .expect("append");
        let mut recorder = Recorder {
            poison: [poison].into_iter().collect(),
            ..Recorder::default()
        };
        Subscription::new("ledger", store.clone())
            .handler_retries(2, Duration::ZERO)
            .park_failures()
            .catch_up(&mut recorder)
            .await
            .expect("the subscription goes on past the poison event");
        assert_eq!(recorder.seen.len(), 2);

        let parked = store.parked("ledger").await.expect("parked");
        assert_eq!(parked.len(), 1);
        assert_eq!(parked[0].event.event_id, poison);
        assert_eq!(parked[0].event.stream_id, id);
        assert_eq!(parked[0].attempts, 2);
        assert!(parked[0].error.contains("poisoned"), "{}", parked[0].error);
        assert!(store.parked("other").await.expect("parked").is_empty());

        let back = store
            .unpark("ledger", poison)
            .await
            .expect("unpark")
            .expect("it was parked");
        assert_eq!(back.event.payload.get(), r#"{"n": 2}"#);
        assert!(store.parked("ledger").await.expect("parked").is_empty());
        assert!(
            store
                .unpark("ledger", poison)
                .await
                .expect("unpark")
                .is_none()
        );
    })
    .await;
}
