//! Point-in-time state: an aggregate rebuilt as of a stream version or a time.

use factum::{
    Aggregate, Command, Error, Event, EventStore, InMemoryStore, Repository, SnapshotPolicy,
    StreamVersion,
};
use futures_util::TryStreamExt;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Event)]
#[event(prefix = "counter")]
enum CounterEvent {
    Added { amount: u64 },
}

struct Add {
    id: &'static str,
    amount: u64,
}

impl Command for Add {
    fn command_name(&self) -> &'static str {
        "Add"
    }
    fn aggregate_id(&self) -> String {
        self.id.to_owned()
    }
}

/// The sum of the amounts added, and how many additions.
#[derive(Default, Debug, PartialEq, Serialize, Deserialize)]
struct Counter {
    total: u64,
    additions: u64,
}

impl Aggregate for Counter {
    const TYPE: &'static str = "counter";
    type Command = Add;
    type Event = CounterEvent;
    type Error = std::convert::Infallible;

    fn decide(&self, command: &Add) -> Result<Vec<CounterEvent>, Self::Error> {
        Ok(vec![CounterEvent::Added {
            amount: command.amount,
        }])
    }

    fn evolve(&mut self, event: &CounterEvent) {
        let CounterEvent::Added { amount } = event;
        self.total += amount;
        self.additions += 1;
    }
}

impl factum::Snapshot for Counter {
    const SNAPSHOT_VERSION: u32 = 1;
}

async fn counter_with_amounts(repository: &Repository<Counter, InMemoryStore>, amounts: &[u64]) {
    for &amount in amounts {
        repository
            .execute(Add { id: "c1", amount })
            .await
            .expect("execute");
    }
}

#[tokio::test]
async fn load_at_a_version_replays_exactly_that_many_events_and_skips_later_snapshots() {
    let store = InMemoryStore::new();
    let repository = Repository::<Counter, _>::new(store.clone())
        .with_snapshots(store.clone(), SnapshotPolicy::every(2));
    counter_with_amounts(&repository, &[1, 10, 100, 1000, 10000]).await;

    let at = |v| repository.load_at("c1", StreamVersion::new(v));
    let initial = at(0).await.expect("version 0");
    assert_eq!(initial.state, Counter::default());
    assert_eq!(initial.version, StreamVersion::INITIAL);
    // The latest snapshot is at version 4: version 1 and 3 must not use it.
    for (version, total) in [(1, 1), (3, 111), (4, 1111), (5, 11111)] {
        let loaded = at(version).await.expect("load_at");
        assert_eq!(loaded.version, StreamVersion::new(version));
        assert_eq!(loaded.state.total, total, "at version {version}");
        assert_eq!(loaded.state.additions, version);
    }
    let err = at(6).await.expect_err("no version 6");
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    assert_eq!(
        repository.load("c1").await.expect("load").state.total,
        11111
    );
}

#[tokio::test]
async fn load_as_of_a_time_replays_the_events_recorded_until_then() {
    let store = InMemoryStore::new();
    let repository = Repository::<Counter, _>::new(store.clone());
    counter_with_amounts(&repository, &[1, 10, 100]).await;
    let recorded: Vec<_> = store
        .read_stream(
            &Repository::<Counter, InMemoryStore>::stream_id("c1").expect("id"),
            StreamVersion::INITIAL,
        )
        .try_collect()
        .await
        .expect("read");
    assert_eq!(recorded.len(), 3);

    let before = recorded[0].recorded_at - chrono::Duration::milliseconds(1);
    let loaded = repository.load_as_of("c1", before).await.expect("as of");
    assert_eq!(loaded.version, StreamVersion::INITIAL);
    assert_eq!(loaded.state, Counter::default());

    for (i, event) in recorded.iter().enumerate() {
        // Everything recorded at or before this event's time (ties included).
        let expected: Vec<_> = recorded
            .iter()
            .filter(|e| e.recorded_at <= event.recorded_at)
            .collect();
        assert!(expected.len() > i);
        let loaded = repository
            .load_as_of("c1", event.recorded_at)
            .await
            .expect("as of");
        assert_eq!(loaded.version, expected.last().expect("one").stream_version);
        let total: u64 = [1, 10, 100][..expected.len()].iter().sum();
        assert_eq!(loaded.state.total, total);
    }
    let later = repository
        .load_as_of("c1", chrono::Utc::now())
        .await
        .expect("as of");
    assert_eq!(later.version, StreamVersion::new(3));
}
