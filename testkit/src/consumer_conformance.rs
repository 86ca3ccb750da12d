//! The conformance checks for what a backend keeps for consumers of the log: checkpoints
//! ([`CheckpointStore`]) and dead letters ([`DeadLetterStore`]), directly, through `Arc`, `dyn`
//! and [`Resilient`], and under factum's consumer loop
//! ([`Subscription`]).
//!
//! [`consumer_conformance_tests!`](crate::consumer_conformance_tests) generates one `#[test]` per
//! check. Its factory returns a fresh, empty store and a value to keep alive for the check (a
//! throwaway database; `()` when there is none):
//!
//! ```
//! // In tests/conformance.rs of a backend crate:
//! factum_testkit::consumer_conformance_tests!(|| async { (factum::InMemoryStore::new(), ()) });
//! ```

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use factum::resilience::Resilient;
use factum::subscription::{
    CheckpointStore, DeadLetterStore, DynCheckpointStore, DynDeadLetterStore, EventHandler,
    ParkedEvent, Subscription,
};
use factum::{
    BoxError, EventFilter, EventId, EventStore, GlobalPosition, LogPosition, NewEvent, RawValue,
    RecordedEvent, StreamId,
};

/// What a backend under the consumer checks must be.
pub trait ConsumerBackend:
    EventStore + CheckpointStore + DeadLetterStore + Clone + 'static
{
}
impl<T: EventStore + CheckpointStore + DeadLetterStore + Clone + 'static> ConsumerBackend for T {}

/// Generates one `#[test]` per consumer conformance check, each on a fresh store from `$factory`
/// (a closure returning a future of `(store, keep_alive)`).
#[macro_export]
macro_rules! consumer_conformance_tests {
    ($factory:expr) => {
        $crate::__consumer_conformance_tests!(
            $factory;
            checkpoints_start_empty_and_keep_the_last_save,
            checkpoints_are_kept_per_consumer,
            checkpoints_work_through_arc_dyn_and_resilient,
            dead_letters_are_listed_per_consumer_oldest_first_and_unparked_once,
            parking_an_event_again_keeps_one_dead_letter,
            dead_letters_work_through_arc_dyn_and_resilient,
            a_subscription_checkpoints_what_it_handled_and_parks_what_it_cannot,
        );
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __consumer_conformance_tests {
    ($factory:expr; $($check:ident),* $(,)?) => {
        mod consumer_conformance {
            use super::*;
            $(
                #[test]
                fn $check() {
                    $crate::conformance::runtime().block_on(async {
                        let (store, _keep_alive) = ($factory)().await;
                        $crate::consumer_conformance::$check(store).await;
                    });
                }
            )*
        }
    };
}

fn event(event_type: &str) -> NewEvent {
    NewEvent {
        event_id: EventId::new(),
        event_type: event_type.to_owned(),
        schema_version: 1,
        payload: RawValue::from_string("{}".to_owned()).expect("json"),
        metadata: Default::default(),
    }
}

/// Appends `n` events to `stream` and returns them as stored.
async fn stored<S: ConsumerBackend>(store: &S, stream: &str, n: usize) -> Vec<RecordedEvent> {
    let head = store.head().await.expect("head");
    let batch: Vec<NewEvent> = (0..n).map(|_| event("consumer.checked")).collect();
    let ids: Vec<EventId> = batch.iter().map(|e| e.event_id).collect();
    store
        .append(factum::AppendRequest::new(
            StreamId::new(stream).expect("stream id"),
            batch,
        ))
        .await
        .expect("append");
    let events = store
        .read_all(head, 10_000, &EventFilter::all())
        .await
        .expect("read all");
    let events: Vec<RecordedEvent> = events
        .into_iter()
        .filter(|e| ids.contains(&e.event_id))
        .collect();
    assert_eq!(events.len(), n, "the appended events are read back");
    events
}

fn parked(subscription: &str, event: &RecordedEvent, error: &str) -> ParkedEvent {
    ParkedEvent {
        subscription: subscription.to_owned(),
        event: event.clone(),
        error: error.to_owned(),
        attempts: 3,
        parked_at: Utc::now(),
    }
}

/// A consumer never seen has no checkpoint; a saved one is loaded back; a later save replaces
/// it, also with an earlier position (a rewind).
pub async fn checkpoints_start_empty_and_keep_the_last_save<S: ConsumerBackend>(store: S) {
    assert_eq!(store.load_checkpoint("never").await.expect("load"), None);
    let first = LogPosition::new(5, GlobalPosition::new(9));
    store.save_checkpoint("c", first).await.expect("save");
    assert_eq!(store.load_checkpoint("c").await.expect("load"), Some(first));
    let later = LogPosition::new(7, GlobalPosition::new(12));
    store.save_checkpoint("c", later).await.expect("save");
    assert_eq!(store.load_checkpoint("c").await.expect("load"), Some(later));
    store.save_checkpoint("c", first).await.expect("rewind");
    assert_eq!(store.load_checkpoint("c").await.expect("load"), Some(first));
}

/// Each consumer has its own checkpoint.
pub async fn checkpoints_are_kept_per_consumer<S: ConsumerBackend>(store: S) {
    let a = LogPosition::new(1, GlobalPosition::new(1));
    let b = LogPosition::new(2, GlobalPosition::new(2));
    store.save_checkpoint("a", a).await.expect("save");
    store.save_checkpoint("b", b).await.expect("save");
    assert_eq!(store.load_checkpoint("a").await.expect("load"), Some(a));
    assert_eq!(store.load_checkpoint("b").await.expect("load"), Some(b));
}

/// The same checkpoints through `Arc<S>`, `Arc<dyn DynCheckpointStore>` and `Resilient<S>`.
pub async fn checkpoints_work_through_arc_dyn_and_resilient<S: ConsumerBackend>(store: S) {
    let position = LogPosition::new(3, GlobalPosition::new(4));
    let shared = Arc::new(store.clone());
    shared.save_checkpoint("arc", position).await.expect("save");
    let dynamic: Arc<dyn DynCheckpointStore> = Arc::new(store.clone());
    assert_eq!(
        dynamic.load_checkpoint("arc").await.expect("load"),
        Some(position)
    );
    dynamic
        .save_checkpoint("dyn", position)
        .await
        .expect("save");
    let resilient = Resilient::new("backend", store.clone());
    assert_eq!(
        resilient.load_checkpoint("dyn").await.expect("load"),
        Some(position)
    );
    resilient
        .save_checkpoint("resilient", position)
        .await
        .expect("save");
    assert_eq!(
        store.load_checkpoint("resilient").await.expect("load"),
        Some(position)
    );
}

/// Parked events are listed per consumer, oldest first, with the error and attempts as parked;
/// unparking returns one once and removes it.
pub async fn dead_letters_are_listed_per_consumer_oldest_first_and_unparked_once<
    S: ConsumerBackend,
>(
    store: S,
) {
    let events = stored(&store, "dead-1", 3).await;
    store
        .park(parked("p", &events[0], "first: broken"))
        .await
        .expect("park");
    store
        .park(ParkedEvent {
            parked_at: Utc::now() + chrono::Duration::milliseconds(5),
            ..parked("p", &events[2], "second")
        })
        .await
        .expect("park");
    store
        .park(parked("other", &events[1], "elsewhere"))
        .await
        .expect("park");
    let listed = store.parked("p").await.expect("parked");
    let ids: Vec<EventId> = listed.iter().map(|p| p.event.event_id).collect();
    assert_eq!(
        ids,
        [events[0].event_id, events[2].event_id],
        "oldest first"
    );
    assert_eq!(listed[0].error, "first: broken");
    assert_eq!(listed[0].attempts, 3);
    assert_eq!(listed[0].subscription, "p");
    assert_eq!(listed[0].event.stream_id, events[0].stream_id);
    assert_eq!(listed[0].event.position, events[0].position);
    assert!(store.parked("nobody").await.expect("parked").is_empty());

    let back = store
        .unpark("p", events[0].event_id)
        .await
        .expect("unpark")
        .expect("it was parked");
    assert_eq!(back.event.event_id, events[0].event_id);
    assert!(
        store
            .unpark("p", events[0].event_id)
            .await
            .expect("unpark")
            .is_none(),
        "unparked once"
    );
    assert!(
        store
            .unpark("p", events[1].event_id)
            .await
            .expect("unpark")
            .is_none(),
        "another consumer's dead letter is not this one's"
    );
    assert_eq!(store.parked("p").await.expect("parked").len(), 1);
    assert_eq!(store.parked("other").await.expect("parked").len(), 1);
}

/// Parking an event a consumer already parked (a retried park) keeps one dead letter, with the
/// latest error.
pub async fn parking_an_event_again_keeps_one_dead_letter<S: ConsumerBackend>(store: S) {
    let events = stored(&store, "dead-2", 1).await;
    store
        .park(parked("p", &events[0], "first"))
        .await
        .expect("park");
    store
        .park(parked("p", &events[0], "again"))
        .await
        .expect("park again");
    let listed = store.parked("p").await.expect("parked");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].error, "again");
}

/// The same dead letters through `Arc<S>`, `Arc<dyn DynDeadLetterStore>` and `Resilient<S>`.
pub async fn dead_letters_work_through_arc_dyn_and_resilient<S: ConsumerBackend>(store: S) {
    let events = stored(&store, "dead-3", 2).await;
    let shared = Arc::new(store.clone());
    shared
        .park(parked("p", &events[0], "via arc"))
        .await
        .expect("park");
    let dynamic: Arc<dyn DynDeadLetterStore> = Arc::new(store.clone());
    dynamic
        .park(parked("p", &events[1], "via dyn"))
        .await
        .expect("park");
    let resilient = Resilient::new("backend", store.clone());
    assert_eq!(resilient.parked("p").await.expect("parked").len(), 2);
    assert!(
        resilient
            .unpark("p", events[0].event_id)
            .await
            .expect("unpark")
            .is_some()
    );
    assert_eq!(dynamic.parked("p").await.expect("parked").len(), 1);
}

/// Fails on the ids in `poison`, records the others.
struct Recorder {
    poison: Vec<EventId>,
    seen: Vec<EventId>,
}

impl EventHandler for Recorder {
    async fn handle(&mut self, event: &RecordedEvent) -> Result<(), BoxError> {
        if self.poison.contains(&event.event_id) {
            return Err("poisoned".into());
        }
        self.seen.push(event.event_id);
        Ok(())
    }
}

/// factum's consumer loop over the backend: every event handled once in log order, the
/// checkpoint at the last one, a failing event parked with the checkpoint past it, and a
/// restart handling only what came later.
pub async fn a_subscription_checkpoints_what_it_handled_and_parks_what_it_cannot<
    S: ConsumerBackend,
>(
    store: S,
) {
    let events = stored(&store, "consumed-1", 5).await;
    let ids: Vec<EventId> = events.iter().map(|e| e.event_id).collect();
    let mut recorder = Recorder {
        poison: vec![ids[2]],
        seen: Vec::new(),
    };
    let mut subscription = Subscription::new("consumer", store.clone())
        .filter(EventFilter::all().with_categories(["consumed"]))
        .batch_size(2)
        .handler_retries(2, Duration::ZERO)
        .park_failures();
    let reached = subscription
        .catch_up(&mut recorder)
        .await
        .expect("catch up");
    assert_eq!(recorder.seen, [ids[0], ids[1], ids[3], ids[4]]);
    assert_eq!(reached, events[4].position);
    assert_eq!(
        store.load_checkpoint("consumer").await.expect("load"),
        Some(reached)
    );
    let parked = store.parked("consumer").await.expect("parked");
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].event.event_id, ids[2]);
    assert_eq!(parked[0].attempts, 2);
    assert!(parked[0].error.contains("poisoned"), "{}", parked[0].error);

    let later = stored(&store, "consumed-2", 1).await;
    let mut restarted = Recorder {
        poison: Vec::new(),
        seen: Vec::new(),
    };
    Subscription::new("consumer", store.clone())
        .filter(EventFilter::all().with_categories(["consumed"]))
        .catch_up(&mut restarted)
        .await
        .expect("catch up");
    assert_eq!(restarted.seen, [later[0].event_id], "only what came later");
}
