//! The runtime on the in-memory store: typed rejections, retries with durable backoff, parking
//! and retrying a parked instance, timeouts on the test clock.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use factum::resilience::RetryPolicy;
use factum::saga::{
    Clock, Decisions, Executed, InMemorySagaStore, Input, Saga, SagaOptions, SagaRuntime,
    SentCommand, Target, TestClock,
};
use factum::subscription::Subscription;
use factum::{
    Aggregate, BoxError, BoxFuture, Command, Envelope, Error, Event, InMemoryStore, Repository,
    StreamId,
};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Command)]
struct Charge {
    #[command(id)]
    card: String,
    amount: u64,
}

#[derive(Debug, Serialize, Deserialize, Event)]
#[event(name = "card.charged")]
struct Charged {
    amount: u64,
}

#[derive(Debug, PartialEq, thiserror::Error)]
enum CardError {
    #[error("declined")]
    Declined,
}

#[derive(Default, Aggregate)]
#[aggregate(type = "card", command = Charge, event = Charged, error = CardError)]
struct Card;

impl Card {
    fn decide(&self, command: &Charge) -> Result<Vec<Charged>, CardError> {
        if command.amount > 100 {
            return Err(CardError::Declined);
        }
        Ok(vec![Charged {
            amount: command.amount,
        }])
    }
    fn evolve(&mut self, _: &Charged) {}
}

#[derive(Debug, Serialize, Deserialize, Event)]
#[event(name = "sale.made")]
struct Sale {
    sale: String,
    amount: u64,
}

#[derive(Debug, PartialEq, Serialize, Deserialize, Event)]
#[event(prefix = "till")]
enum TillChange {
    Charging,
    Declined { reason: String },
    Expired,
}

#[derive(Default)]
struct Till {
    declined: Option<String>,
    expired: bool,
}

impl Saga for Till {
    const NAME: &'static str = "till";
    type Event = Sale;
    type Change = TillChange;
    type Timeout = String;

    fn instance(event: &Envelope<Sale>) -> Option<String> {
        Some(event.event.sale.clone())
    }

    fn react(&self, input: Input<'_, Self>, then: &mut Decisions<Self>) -> Result<(), BoxError> {
        match input {
            Input::Event(sale) => {
                then.record(TillChange::Charging);
                then.send::<Card>(Charge {
                    card: "c1".into(),
                    amount: sale.event.amount,
                })?;
                then.schedule("receipt", Duration::from_secs(60), "print it".into())?;
            }
            Input::Rejected(rejection) => {
                assert_eq!(rejection.error::<Card>(), Some(&CardError::Declined));
                assert_eq!(
                    rejection.command::<Card>().map(|c| c.amount),
                    Some(500),
                    "the typed command comes back"
                );
                then.record(TillChange::Declined {
                    reason: rejection.reason(),
                });
                then.cancel("receipt");
            }
            Input::Timeout(fired) => {
                assert_eq!(
                    (fired.name.as_str(), fired.timeout.as_str()),
                    ("receipt", "print it")
                );
                then.record(TillChange::Expired);
            }
        }
        Ok(())
    }

    fn evolve(&mut self, change: &TillChange) {
        match change {
            TillChange::Charging => {}
            TillChange::Declined { reason } => self.declined = Some(reason.clone()),
            TillChange::Expired => self.expired = true,
        }
    }
}

/// A card target failing transiently while `failing` is above 0.
struct Flaky {
    repository: Repository<Card, InMemoryStore>,
    failing: Arc<AtomicU32>,
}

impl Target<()> for Flaky {
    fn aggregate_type(&self) -> &'static str {
        "card"
    }
    fn execute<'a>(
        &'a self,
        _: &'a mut (),
        command: &'a SentCommand,
    ) -> BoxFuture<'a, Result<Executed, Error>> {
        Box::pin(async move {
            if self
                .failing
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(Error::transient("charge", "the card network timed out"));
            }
            Executed::of(
                self.repository
                    .execute_with(command.decode::<Card>()?, &command.context)
                    .await,
            )
        })
    }
}

async fn sell(store: &InMemoryStore, sale: &str, amount: u64) {
    let event = factum::NewEvent::encode(
        &Sale {
            sale: sale.into(),
            amount,
        },
        factum::EventMetadata::default(),
    )
    .expect("encodes");
    factum::EventStore::append(
        store,
        factum::AppendRequest::new(
            StreamId::new(format!("sale-{sale}")).expect("id"),
            vec![event],
        ),
    )
    .await
    .expect("append");
}

fn setup(
    failing: u32,
) -> (
    InMemoryStore,
    TestClock,
    SagaRuntime<Till, InMemorySagaStore>,
    Arc<AtomicU32>,
) {
    let store = InMemoryStore::new();
    let clock = TestClock::new("2026-01-01T00:00:00Z".parse().expect("time"));
    let failing = Arc::new(AtomicU32::new(failing));
    let runtime = SagaRuntime::<Till, _>::new(InMemorySagaStore::new(store.clone()))
        .clock(clock.clone())
        .target(Flaky {
            repository: Repository::new(store.clone()),
            failing: failing.clone(),
        })
        .options(
            SagaOptions::default().retry(
                RetryPolicy::new()
                    .with_max_attempts(3)
                    .with_initial_delay(Duration::from_secs(10))
                    .with_max_delay(Duration::from_secs(10))
                    .with_max_elapsed(None),
            ),
        );
    (store, clock, runtime, failing)
}

async fn feed(store: &InMemoryStore, runtime: &SagaRuntime<Till, InMemorySagaStore>) {
    Subscription::new(runtime.name(), store.clone())
        .filter(runtime.filter())
        .catch_up(runtime.clone())
        .await
        .expect("feed");
}

#[tokio::test]
async fn a_rejected_command_comes_back_typed_and_the_saga_compensates() {
    let (store, _clock, runtime, _) = setup(0);
    sell(&store, "s1", 500).await;
    feed(&store, &runtime).await;
    let done = runtime.tick().await.expect("tick");
    assert_eq!(done.dispatched, 1);
    let state = runtime.state("s1").await.expect("state").expect("instance");
    assert_eq!(state.declined.as_deref(), Some("declined"));
    assert!(
        runtime.timeouts("s1").await.expect("timeouts").is_empty(),
        "cancelled"
    );
    assert_eq!(runtime.status().borrow().rejected, 1);
}

#[tokio::test]
async fn a_failing_dispatch_is_retried_after_its_backoff_then_parked_and_retried_by_hand() {
    let (store, clock, runtime, failing) = setup(10);
    sell(&store, "s1", 20).await;
    feed(&store, &runtime).await;

    // Attempt 1 fails; the retry is due later on the clock, not now.
    assert_eq!(runtime.tick().await.expect("tick").dispatched, 0);
    let [pending] = &runtime.pending("s1").await.expect("pending")[..] else {
        panic!("one command")
    };
    assert_eq!(pending.attempts, 1);
    assert!(pending.due_at > clock.now());
    assert!(
        pending
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("timed out"))
    );
    assert_eq!(
        runtime.tick().await.expect("tick").dispatched,
        0,
        "not due yet"
    );
    assert_eq!(
        failing.load(Ordering::SeqCst),
        9,
        "no attempt before the backoff"
    );

    // Attempts 2 and 3 fail: the instance is parked.
    clock.advance(Duration::from_secs(11));
    runtime.tick().await.expect("tick");
    clock.advance(Duration::from_secs(11));
    runtime.tick().await.expect("tick");
    let [parked] = &runtime.parked().await.expect("parked")[..] else {
        panic!("one parked instance")
    };
    assert_eq!(parked.key, "s1");
    assert!(parked.error.contains("timed out"), "{}", parked.error);
    clock.advance(Duration::from_secs(3600));
    assert_eq!(
        runtime.tick().await.expect("tick").dispatched,
        0,
        "a parked instance waits"
    );
    assert_eq!(failing.load(Ordering::SeqCst), 7);

    // Fixed, and retried by hand: dispatched once.
    failing.store(0, Ordering::SeqCst);
    assert!(runtime.retry_parked("s1").await.expect("retry"));
    assert_eq!(runtime.tick().await.expect("tick").dispatched, 1);
    assert!(runtime.parked().await.expect("parked").is_empty());
    let charged: Vec<_> =
        futures_util::TryStreamExt::try_collect::<Vec<_>>(factum::EventStore::read_stream(
            &store,
            &StreamId::new("card-c1").expect("id"),
            factum::StreamVersion::INITIAL,
        ))
        .await
        .expect("read");
    assert_eq!(charged.len(), 1);
}

#[tokio::test]
async fn a_timeout_fires_when_the_clock_passes_its_deadline_once() {
    let (store, clock, runtime, _) = setup(0);
    sell(&store, "s1", 20).await;
    feed(&store, &runtime).await;
    let first = runtime.tick().await.expect("tick");
    assert_eq!((first.dispatched, first.fired), (1, 0));
    clock.advance(Duration::from_secs(59));
    assert_eq!(runtime.tick().await.expect("tick").fired, 0);
    clock.advance(Duration::from_secs(1));
    assert_eq!(runtime.tick().await.expect("tick").fired, 1);
    assert_eq!(runtime.tick().await.expect("tick").fired, 0);
    assert!(
        runtime
            .state("s1")
            .await
            .expect("state")
            .expect("instance")
            .expired
    );
}

#[tokio::test]
async fn an_event_handed_over_again_is_reacted_to_once() {
    let (store, _clock, runtime, _) = setup(0);
    sell(&store, "s1", 20).await;
    feed(&store, &runtime).await;
    // A replay from the start: the instance already recorded its reaction to the event.
    Subscription::new(runtime.name(), store.clone())
        .filter(runtime.filter())
        .start_from(factum::subscription::StartFrom::Beginning)
        .catch_up(runtime.clone())
        .await
        .expect("replay");
    assert_eq!(runtime.pending("s1").await.expect("pending").len(), 1);
    assert_eq!(runtime.status().borrow().reacted, 1);
}

#[tokio::test]
async fn a_command_for_a_type_with_no_target_parks_its_instance_naming_the_type() {
    let store = InMemoryStore::new();
    let runtime = SagaRuntime::<Till, _>::new(InMemorySagaStore::new(store.clone()));
    sell(&store, "s1", 20).await;
    feed(&store, &runtime).await;
    runtime.tick().await.expect("tick");
    let [parked] = &runtime.parked().await.expect("parked")[..] else {
        panic!("one parked instance")
    };
    assert!(
        parked.error.contains("`card`, which has no target"),
        "{}",
        parked.error
    );
}
