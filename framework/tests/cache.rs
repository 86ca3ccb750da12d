//! `Repository::with_cache`: a cached state saves the load, and never makes a command decide on
//! a state another writer made stale.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use factum::{
    Aggregate, AppendResult, Command, Error, Event, EventFilter, EventStore, EventStream,
    InMemoryStore, LogPosition, RecordedEvent, Repository, StreamId, StreamVersion,
};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default)]
struct Account {
    balance: u64,
}

#[derive(Clone, Debug)]
enum Op {
    Deposit(u64),
    Withdraw(u64),
}

#[derive(Clone, Debug)]
struct Cmd {
    id: &'static str,
    op: Op,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Amount {
    amount: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Event)]
#[event(prefix = "account")]
enum Moved {
    Deposited(Amount),
    Withdrawn(Amount),
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("insufficient funds: {balance} < {amount}")]
struct Insufficient {
    balance: u64,
    amount: u64,
}

impl Command for Cmd {
    fn command_name(&self) -> &'static str {
        "Cmd"
    }
    fn aggregate_id(&self) -> String {
        self.id.to_owned()
    }
}

impl Aggregate for Account {
    const TYPE: &'static str = "account";
    type Command = Cmd;
    type Event = Moved;
    type Error = Insufficient;

    fn decide(&self, command: &Cmd) -> Result<Vec<Moved>, Insufficient> {
        match command.op {
            Op::Deposit(amount) => Ok(vec![Moved::Deposited(Amount { amount })]),
            Op::Withdraw(0) => Ok(Vec::new()),
            Op::Withdraw(amount) if amount > self.balance => Err(Insufficient {
                balance: self.balance,
                amount,
            }),
            Op::Withdraw(amount) => Ok(vec![Moved::Withdrawn(Amount { amount })]),
        }
    }

    fn evolve(&mut self, event: &Moved) {
        match event {
            Moved::Deposited(a) => self.balance += a.amount,
            Moved::Withdrawn(a) => self.balance -= a.amount,
        }
    }
}

/// Counts the stream reads that reach the store.
#[derive(Clone)]
struct CountingReads {
    inner: InMemoryStore,
    reads: Arc<AtomicUsize>,
}

impl EventStore for CountingReads {
    async fn append(&self, request: factum::AppendRequest) -> Result<AppendResult, Error> {
        self.inner.append(request).await
    }

    async fn idempotency_outcome(
        &self,
        key: &factum::IdempotencyKey,
    ) -> Result<Option<AppendResult>, Error> {
        self.inner.idempotency_outcome(key).await
    }

    fn read_stream<'a>(&'a self, stream: &'a StreamId, after: StreamVersion) -> EventStream<'a> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.read_stream(stream, after)
    }

    async fn read_all(
        &self,
        after: LogPosition,
        limit: usize,
        filter: &EventFilter,
    ) -> Result<Vec<RecordedEvent>, Error> {
        self.inner.read_all(after, limit, filter).await
    }
}

fn cmd(id: &'static str, op: Op) -> Cmd {
    Cmd { id, op }
}

fn counting() -> (CountingReads, Arc<AtomicUsize>) {
    let reads = Arc::new(AtomicUsize::new(0));
    (
        CountingReads {
            inner: InMemoryStore::new(),
            reads: reads.clone(),
        },
        reads,
    )
}

#[tokio::test]
async fn a_cached_aggregate_is_loaded_once() {
    let (store, reads) = counting();
    let cached = Repository::<Account, _>::new(store.clone()).with_cache(100);
    for amount in 1..=5 {
        cached
            .execute(cmd("a", Op::Deposit(amount)))
            .await
            .expect("deposit");
    }
    assert_eq!(
        reads.load(Ordering::SeqCst),
        1,
        "only the first command loads"
    );

    let plain = Repository::<Account, _>::new(store);
    plain
        .execute(cmd("b", Op::Deposit(1)))
        .await
        .expect("deposit");
    plain
        .execute(cmd("b", Op::Deposit(1)))
        .await
        .expect("deposit");
    assert_eq!(
        reads.load(Ordering::SeqCst),
        3,
        "without a cache every command loads"
    );
}

#[tokio::test]
async fn a_state_made_stale_by_another_writer_meets_a_conflict_and_decides_again() {
    let store = InMemoryStore::new();
    let cached = Repository::<Account, _>::new(store.clone()).with_cache(100);
    let other = Repository::<Account, _>::new(store.clone());
    cached
        .execute(cmd("a", Op::Deposit(10)))
        .await
        .expect("deposit");
    other
        .execute(cmd("a", Op::Deposit(5)))
        .await
        .expect("deposit elsewhere");

    let done = cached
        .execute(cmd("a", Op::Deposit(1)))
        .await
        .expect("deposit");
    assert_eq!(done.attempts, 2, "the stale cached version conflicts once");
    assert_eq!(done.state.balance, 16);
    assert_eq!(done.version, StreamVersion::new(3));
    assert_eq!(other.load("a").await.expect("load").state.balance, 16);
}

#[tokio::test]
async fn a_rejection_on_a_cached_state_is_checked_against_the_store() {
    let store = InMemoryStore::new();
    let cached = Repository::<Account, _>::new(store.clone()).with_cache(100);
    let other = Repository::<Account, _>::new(store.clone());
    cached
        .execute(cmd("a", Op::Deposit(10)))
        .await
        .expect("deposit");
    other
        .execute(cmd("a", Op::Deposit(5)))
        .await
        .expect("deposit elsewhere");

    // The cached state says 10, the store says 15: the withdrawal must not be refused.
    let done = cached
        .execute(cmd("a", Op::Withdraw(15)))
        .await
        .expect("the store's state allows it");
    assert_eq!(done.attempts, 2);
    assert_eq!(done.state.balance, 0);

    // A rejection the store confirms is returned, and the state stays cached.
    let err = cached
        .execute(cmd("a", Op::Withdraw(1)))
        .await
        .expect_err("nothing left");
    assert_eq!(
        err.rejection(),
        Some(&Insufficient {
            balance: 0,
            amount: 1
        })
    );
    // An empty decision on a stale cached state is checked the same way.
    other
        .execute(cmd("a", Op::Deposit(7)))
        .await
        .expect("deposit elsewhere");
    let nothing = cached
        .execute(cmd("a", Op::Withdraw(0)))
        .await
        .expect("nothing to do");
    assert!(nothing.events.is_empty());
    assert_eq!(nothing.version, StreamVersion::new(4));
    assert_eq!(nothing.state.balance, 7);
}

/// Yields to the scheduler before every call reaches the store, so commands running on other
/// threads get in between one command's load and its append.
#[derive(Clone)]
struct Yielding {
    inner: InMemoryStore,
}

impl EventStore for Yielding {
    async fn append(&self, request: factum::AppendRequest) -> Result<AppendResult, Error> {
        tokio::task::yield_now().await;
        self.inner.append(request).await
    }

    async fn idempotency_outcome(
        &self,
        key: &factum::IdempotencyKey,
    ) -> Result<Option<AppendResult>, Error> {
        self.inner.idempotency_outcome(key).await
    }

    fn read_stream<'a>(&'a self, stream: &'a StreamId, after: StreamVersion) -> EventStream<'a> {
        use futures_util::StreamExt as _;
        let events = self.inner.read_stream(stream, after);
        Box::pin(
            futures_util::stream::once(tokio::task::yield_now())
                .filter_map(|()| std::future::ready(None))
                .chain(events),
        )
    }

    async fn read_all(
        &self,
        after: LogPosition,
        limit: usize,
        filter: &EventFilter,
    ) -> Result<Vec<RecordedEvent>, Error> {
        tokio::task::yield_now().await;
        self.inner.read_all(after, limit, filter).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_commands_on_one_cached_aggregate_all_apply() {
    let store = InMemoryStore::new();
    // Two repositories on one store, as two processes would have: their commands race.
    let repositories: Vec<_> = (0..2)
        .map(|_| {
            Arc::new(
                Repository::<Account, _>::new(Yielding {
                    inner: store.clone(),
                })
                .with_cache(100)
                .with_conflict_retries(1000),
            )
        })
        .collect();
    let cached = Arc::clone(&repositories[0]);
    // Deposits of two sizes from 16 tasks on 4 threads: a cache that lost or reordered an
    // update would end with a balance or version other than the store's (checked below).
    let tasks: Vec<_> = (0..16)
        .map(|t| {
            let repository = Arc::clone(&repositories[t % 2]);
            tokio::spawn(async move {
                let mut retried = 0;
                for _ in 0..20 {
                    let op = if t % 4 < 2 {
                        Op::Deposit(3)
                    } else {
                        Op::Deposit(1)
                    };
                    let done = repository.execute(cmd("a", op)).await.expect("deposit");
                    retried += usize::from(done.attempts > 1);
                }
                retried
            })
        })
        .collect();
    let mut retried = 0;
    for task in tasks {
        retried += task.await.expect("task");
    }
    assert!(
        retried > 0,
        "no command ever met one of the other repository: the test did not interleave"
    );
    let loaded = Repository::<Account, _>::new(store)
        .load("a")
        .await
        .expect("load");
    assert_eq!(loaded.state.balance, 8 * 20 * 3 + 8 * 20);
    assert_eq!(loaded.version, StreamVersion::new(320));
    // The cache holds exactly the stored state once it caught up: withdrawing all of it is
    // allowed, one more is not.
    let all = loaded.state.balance;
    let emptied = cached
        .execute(cmd("a", Op::Withdraw(all)))
        .await
        .expect("the cached balance is the stored one");
    assert_eq!(emptied.state.balance, 0);
    cached
        .execute(cmd("a", Op::Withdraw(1)))
        .await
        .expect_err("nothing left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commands_on_one_aggregate_in_one_repository_take_turns_and_never_conflict() {
    let store = InMemoryStore::new();
    for cache in [false, true] {
        let repository = Repository::<Account, _>::new(Yielding {
            inner: store.clone(),
        })
        .with_conflict_retries(0);
        let repository = Arc::new(if cache {
            repository.with_cache(100)
        } else {
            repository
        });
        let id = if cache { "hot-cached" } else { "hot" };
        // 16 tasks on 4 threads, all on one aggregate, with no conflict retries: a command that
        // raced another one of this repository would fail.
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let repository = Arc::clone(&repository);
                tokio::spawn(async move {
                    for _ in 0..20 {
                        let done = repository
                            .execute(cmd(id, Op::Deposit(1)))
                            .await
                            .expect("no conflict within one repository");
                        assert_eq!(done.attempts, 1);
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("task");
        }
        let loaded = Repository::<Account, _>::new(store.clone())
            .load(id)
            .await
            .expect("load");
        assert_eq!(loaded.state.balance, 16 * 20);
        assert_eq!(loaded.version, StreamVersion::new(320));
    }
}
