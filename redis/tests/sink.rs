//! The Redis sink on a real Redis: exactly-once application with concurrent instances, moved
//! checkpoints, parking and retrying, and failures Redis reports.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use factum::subscription::{
    BatchFailure, BatchHandler, Begun, DeadLetterStore, ParkedEvent, Subscription,
    TransactionalCheckpoint,
};
use factum::{GlobalPosition, LogPosition, RecordedEvent};
use factum_redis::redis::AsyncCommands as _;
use factum_redis::{RedisCheckpoints, RedisKeyspace, RedisTx, SinkError};
use support::*;

async fn keyspace(label: &str) -> RedisKeyspace {
    RedisKeyspace::connect(
        &factum_testkit::redis::shared_url(),
        &factum_testkit::redis::namespace(label),
    )
    .await
    .expect("connect to Redis")
}

/// The sink's checkpoints, counting how often the checkpoint was found moved (at `begin`) or
/// moved under a unit of work (at `EXEC`).
#[derive(Clone)]
struct Counting {
    inner: RedisCheckpoints,
    moved_at_begin: Arc<AtomicU64>,
    moved_at_exec: Arc<AtomicU64>,
}

impl TransactionalCheckpoint for Counting {
    type Tx = RedisTx;

    async fn load(&self, name: &str) -> Result<Option<LogPosition>, factum::Error> {
        self.inner.load(name).await
    }

    async fn reset(&self, name: &str, position: LogPosition) -> Result<(), factum::Error> {
        self.inner.reset(name, position).await
    }

    async fn begin(
        &self,
        name: &str,
        expected: LogPosition,
    ) -> Result<Begun<RedisTx>, factum::Error> {
        let begun = self.inner.begin(name, expected).await?;
        if matches!(begun, Begun::Moved(_)) {
            self.moved_at_begin.fetch_add(1, Ordering::SeqCst);
        }
        Ok(begun)
    }

    async fn park(&self, tx: &mut RedisTx, parked: ParkedEvent) -> Result<(), factum::Error> {
        TransactionalCheckpoint::park(&self.inner, tx, parked).await
    }

    async fn commit(
        &self,
        tx: RedisTx,
        name: &str,
        position: LogPosition,
    ) -> Result<(), factum::Error> {
        let result = self.inner.commit(tx, name, position).await;
        if let Err(error) = &result
            && sink_error(error).is_some_and(|e| matches!(e, SinkError::Moved { .. }))
        {
            self.moved_at_exec.fetch_add(1, Ordering::SeqCst);
        }
        result
    }

    async fn rollback(&self, tx: RedisTx) {
        self.inner.rollback(tx).await;
    }
}

fn sink_error(error: &factum::Error) -> Option<&SinkError> {
    std::error::Error::source(error)?.downcast_ref::<SinkError>()
}

/// Three instances of one consumer, no lease, on a multi-threaded runtime, race through the same
/// log: each event is applied once (the read model equals the fold, the applied list holds each
/// id once, in log order), and the races really happened (checkpoints found moved).
#[test]
fn concurrent_instances_apply_each_event_exactly_once() {
    runtime().block_on(async {
        let store = test_log(600, 12).await;
        let events = all_events(&store).await;
        // Races are likely but not certain in one round: run rounds until one had them.
        for round in 0..5 {
            let keyspace = keyspace("concurrent").await;
            let checkpoints = Counting {
                inner: RedisCheckpoints::new(&keyspace),
                moved_at_begin: Arc::default(),
                moved_at_exec: Arc::default(),
            };
            let mut tasks = Vec::new();
            for _ in 0..3 {
                let store = store.clone();
                let checkpoints = checkpoints.clone();
                tasks.push(tokio::spawn(async move {
                    let mut subscription =
                        Subscription::with_checkpoints("ledger", store, checkpoints).batch_size(7);
                    subscription.catch_up(Ledger::default()).await
                }));
            }
            for task in tasks {
                task.await.expect("instance").expect("catch up");
            }
            assert_eq!(read_model(&keyspace).await, fold(&events), "round {round}");
            assert_eq!(
                checkpoints.inner.load("ledger").await.expect("load"),
                Some(store.head())
            );
            let races = checkpoints.moved_at_begin.load(Ordering::SeqCst)
                + checkpoints.moved_at_exec.load(Ordering::SeqCst);
            if races > 0 {
                eprintln!(
                    "figures: round {round}: checkpoint found moved {} times at begin, {} at EXEC",
                    checkpoints.moved_at_begin.load(Ordering::SeqCst),
                    checkpoints.moved_at_exec.load(Ordering::SeqCst)
                );
                return;
            }
        }
        panic!("in 5 rounds, three instances never raced: the test proves nothing");
    });
}

/// `begin` reports a checkpoint that is not where the consumer left it; a checkpoint moved
/// while a unit of work was open makes its commit apply nothing.
#[test]
fn a_moved_checkpoint_is_reported_and_applies_nothing() {
    runtime().block_on(async {
        let keyspace = keyspace("moved").await;
        let checkpoints = RedisCheckpoints::new(&keyspace);
        let at = |g| LogPosition::new(g, GlobalPosition::new(g));
        checkpoints.reset("c", at(5)).await.expect("reset");

        match checkpoints.begin("c", at(3)).await.expect("begin") {
            Begun::Moved(stored) => assert_eq!(stored, at(5)),
            Begun::Ready(_) => panic!("the checkpoint is at 5, not 3"),
        }

        let Begun::Ready(mut tx) = checkpoints.begin("c", at(5)).await.expect("begin") else {
            panic!("the checkpoint is at 5");
        };
        let key = tx.key("written");
        tx.pipe().set(&key, "yes");
        // Another instance moves the checkpoint meanwhile.
        checkpoints.reset("c", at(9)).await.expect("reset");
        let error = checkpoints
            .commit(tx, "c", at(6))
            .await
            .expect_err("the checkpoint moved");
        assert!(error.is_transient(), "{error}");
        assert!(
            matches!(sink_error(&error), Some(SinkError::Moved { .. })),
            "{error:?}"
        );
        let written: Option<String> = keyspace.connection().get(&key).await.expect("get");
        assert_eq!(written, None, "nothing of the unit of work was applied");
        assert_eq!(checkpoints.load("c").await.expect("load"), Some(at(9)));

        // A unit of work that commits moves the checkpoint with its writes.
        let Begun::Ready(mut tx) = checkpoints.begin("c", at(9)).await.expect("begin") else {
            panic!("the checkpoint is at 9");
        };
        tx.pipe().set(&key, "yes");
        checkpoints.commit(tx, "c", at(10)).await.expect("commit");
        let written: Option<String> = keyspace.connection().get(&key).await.expect("get");
        assert_eq!(written.as_deref(), Some("yes"));
        assert_eq!(checkpoints.load("c").await.expect("load"), Some(at(10)));

        // A rolled-back unit of work leaves nothing, and its connection is reusable.
        let Begun::Ready(mut tx) = checkpoints.begin("c", at(10)).await.expect("begin") else {
            panic!("the checkpoint is at 10");
        };
        tx.pipe().set(&key, "rolled back");
        checkpoints.rollback(tx).await;
        let written: Option<String> = keyspace.connection().get(&key).await.expect("get");
        assert_eq!(written.as_deref(), Some("yes"));
        assert_eq!(checkpoints.load("c").await.expect("load"), Some(at(10)));
    });
}

/// A key the handler watches that changes before `EXEC` makes the unit of work apply nothing.
#[test]
fn a_watched_key_that_changes_applies_nothing() {
    runtime().block_on(async {
        let keyspace = keyspace("watch").await;
        let checkpoints = RedisCheckpoints::new(&keyspace);
        checkpoints
            .reset("c", LogPosition::START)
            .await
            .expect("reset");
        let Begun::Ready(mut tx) = checkpoints
            .begin("c", LogPosition::START)
            .await
            .expect("begin")
        else {
            panic!("at the start");
        };
        let guarded = tx.key("guarded");
        tx.watch(&[&guarded]).await.expect("watch");
        let result = tx.key("result");
        tx.pipe().set(result, 1);
        keyspace
            .connection()
            .set::<_, _, ()>(&guarded, "changed")
            .await
            .expect("set");
        let position = LogPosition::new(1, GlobalPosition::new(1));
        let error = checkpoints
            .commit(tx, "c", position)
            .await
            .expect_err("a watched key changed");
        assert!(error.is_transient());
        let result: Option<i64> = keyspace
            .connection()
            .get(keyspace.key("result"))
            .await
            .expect("get");
        assert_eq!(result, None);
        assert_eq!(
            checkpoints.load("c").await.expect("load"),
            Some(LogPosition::START)
        );
    });
}

/// Fails on the events of one stream until told otherwise.
struct Picky {
    refuse: Option<String>,
}

impl BatchHandler<RedisTx> for Picky {
    async fn handle_batch(
        &mut self,
        tx: &mut RedisTx,
        events: &[RecordedEvent],
    ) -> Result<(), BatchFailure> {
        if let Some(refused) = &self.refuse
            && let Some(i) = events.iter().position(|e| e.stream_id.as_str() == refused)
        {
            // The events before it stand in the unit of work.
            Ledger::apply(tx, &events[..i]).await?;
            return Err(BatchFailure::at(i, format!("stream {refused} is refused")));
        }
        Ledger::apply(tx, events).await
    }
}

/// A failing event is parked in Redis in the unit of work that moves the checkpoint past it;
/// the others are applied; retried once the handler is fixed, it is applied and unparked.
#[test]
fn failing_events_are_parked_and_can_be_retried() {
    runtime().block_on(async {
        let keyspace = keyspace("park").await;
        let store = test_log(40, 5).await;
        let events = all_events(&store).await;
        let checkpoints = RedisCheckpoints::new(&keyspace);
        let mut subscription =
            Subscription::with_checkpoints("ledger", store.clone(), checkpoints.clone())
                .batch_size(10)
                .handler_retries(2, std::time::Duration::from_millis(1))
                .park_failures();
        subscription
            .catch_up(Picky {
                refuse: Some("account-3".into()),
            })
            .await
            .expect("catch up");
        let refused: Vec<&RecordedEvent> = events
            .iter()
            .filter(|e| e.stream_id.as_str() == "account-3")
            .collect();
        assert_eq!(
            read_model(&keyspace).await,
            fold(
                events
                    .iter()
                    .filter(|e| e.stream_id.as_str() != "account-3")
            )
        );
        assert_eq!(
            checkpoints.load("ledger").await.expect("load"),
            Some(store.head())
        );
        let parked = checkpoints.parked("ledger").await.expect("parked");
        assert_eq!(
            parked.iter().map(|p| p.event.event_id).collect::<Vec<_>>(),
            refused.iter().map(|e| e.event_id).collect::<Vec<_>>(),
            "each refused event parked once, in log order"
        );
        assert!(parked[0].error.contains("stream account-3 is refused"));
        assert_eq!(parked[0].attempts, 2);
        assert_eq!(parked[0].event.payload.get(), refused[0].payload.get());

        // Fixed: retried, each is applied with its removal from the dead letters.
        for event in &refused {
            let retried = checkpoints
                .retry_parked("ledger", event.event_id, Picky { refuse: None })
                .await
                .expect("retry");
            assert!(retried);
        }
        assert!(
            !checkpoints
                .retry_parked("ledger", refused[0].event_id, Picky { refuse: None })
                .await
                .expect("retry again"),
            "not parked any more"
        );
        assert!(
            checkpoints
                .parked("ledger")
                .await
                .expect("parked")
                .is_empty()
        );
        let model = read_model(&keyspace).await;
        assert_eq!(model.totals, fold(&events).totals);
        assert_eq!(model.applied.len(), events.len());
    });
}

/// Redis refusing a queued command aborts the unit of work whole; a command failing inside
/// `EXEC` is reported as such (Redis applied the rest).
#[test]
fn commands_redis_rejects_are_reported() {
    runtime().block_on(async {
        let keyspace = keyspace("rejects").await;
        let checkpoints = RedisCheckpoints::new(&keyspace);
        checkpoints
            .reset("c", LogPosition::START)
            .await
            .expect("reset");
        let next = LogPosition::new(1, GlobalPosition::new(1));

        let Begun::Ready(mut tx) = checkpoints
            .begin("c", LogPosition::START)
            .await
            .expect("begin")
        else {
            panic!("at the start");
        };
        let a = tx.key("a");
        tx.pipe().set(a, 1);
        tx.pipe().cmd("NO-SUCH-COMMAND").arg("x");
        let error = checkpoints
            .commit(tx, "c", next)
            .await
            .expect_err("refused");
        assert!(!error.is_transient());
        assert!(
            matches!(sink_error(&error), Some(SinkError::Refused { index: 1, .. })),
            "{error:?}"
        );
        let a: Option<i64> = keyspace
            .connection()
            .get(keyspace.key("a"))
            .await
            .expect("get");
        assert_eq!(a, None, "nothing applied");
        assert_eq!(
            checkpoints.load("c").await.expect("load"),
            Some(LogPosition::START)
        );

        keyspace
            .connection()
            .set::<_, _, ()>(keyspace.key("text"), "not a hash")
            .await
            .expect("set");
        let Begun::Ready(mut tx) = checkpoints
            .begin("c", LogPosition::START)
            .await
            .expect("begin")
        else {
            panic!("at the start");
        };
        let text = tx.key("text");
        tx.pipe().hset(text, "field", 1);
        let error = checkpoints
            .commit(tx, "c", next)
            .await
            .expect_err("WRONGTYPE");
        assert!(
            matches!(sink_error(&error), Some(SinkError::FailedInExec { index: 0, command, .. }) if command == "HSET"),
            "{error:?}"
        );
        assert_eq!(
            checkpoints.load("c").await.expect("load"),
            Some(next),
            "Redis does not roll back: the checkpoint moved"
        );
    });
}

/// A checkpoint that is not in factum's format stops the consumer with an error naming the key.
#[test]
fn a_corrupt_checkpoint_is_an_error_naming_its_key() {
    runtime().block_on(async {
        let keyspace = keyspace("corrupt").await;
        let checkpoints = RedisCheckpoints::new(&keyspace);
        keyspace
            .connection()
            .set::<_, _, ()>(checkpoints.checkpoint_key("c"), "twelve")
            .await
            .expect("set");
        let error = checkpoints.load("c").await.expect_err("corrupt");
        assert!(
            error.to_string().contains("read a stored value")
                && format!("{error:?}").contains(&checkpoints.checkpoint_key("c")),
            "{error:?}"
        );
    });
}

/// Reads through the unit of work see committed state; transaction control is refused.
#[test]
fn reads_in_a_unit_of_work_see_committed_state() {
    runtime().block_on(async {
        let keyspace = keyspace("reads").await;
        let checkpoints = RedisCheckpoints::new(&keyspace);
        keyspace
            .connection()
            .set::<_, _, ()>(keyspace.key("n"), 41)
            .await
            .expect("set");
        let Begun::Ready(mut tx) = checkpoints
            .begin("c", LogPosition::START)
            .await
            .expect("begin")
        else {
            panic!("no checkpoint yet: ready");
        };
        let key = tx.key("n");
        let n: i64 = tx
            .query(factum_redis::redis::cmd("GET").arg(&key))
            .await
            .expect("get");
        assert_eq!(n, 41);
        tx.pipe().set(&key, n + 1);
        let still: i64 = tx
            .query(factum_redis::redis::cmd("GET").arg(&key))
            .await
            .expect("get");
        assert_eq!(still, 41, "buffered writes are not visible before commit");
        let refused = tx
            .query::<()>(&factum_redis::redis::cmd("MULTI"))
            .await
            .expect_err("MULTI refused");
        assert!(
            refused.to_string().contains("invalid argument"),
            "{refused}"
        );
        checkpoints
            .commit(tx, "c", LogPosition::new(1, GlobalPosition::new(1)))
            .await
            .expect("commit");
        let n: i64 = keyspace.connection().get(&key).await.expect("get");
        assert_eq!(n, 42);
    });
}

/// A second consumer of the same name resumes from the checkpoint the first one left in Redis.
#[test]
fn a_consumer_resumes_from_its_redis_checkpoint() {
    runtime().block_on(async {
        let keyspace = keyspace("resume").await;
        let store = test_log(30, 3).await;
        let events = all_events(&store).await;
        let checkpoints = RedisCheckpoints::new(&keyspace);
        let middle = events[14].position;
        let mut first =
            Subscription::with_checkpoints("ledger", store.clone(), checkpoints.clone())
                .batch_size(5);
        first
            .catch_up_to(Ledger::default(), middle)
            .await
            .expect("first half");
        assert_eq!(read_model(&keyspace).await, fold(&events[..15]));
        let mut second =
            Subscription::with_checkpoints("ledger", store.clone(), checkpoints).batch_size(5);
        second.catch_up(Ledger::default()).await.expect("the rest");
        assert_eq!(read_model(&keyspace).await, fold(&events));
    });
}

/// Redis killed and restarted empty (no persistence): the consumer waits out the lost
/// connections, finds no checkpoint, and rebuilds the read model from the start of the log —
/// consistent again, each event once.
#[test]
fn a_redis_restart_that_lost_everything_is_rebuilt_from_the_start() {
    runtime().block_on(async {
        let mut server = factum_testkit::redis::RedisServer::start();
        let keyspace =
            RedisKeyspace::connect(&server.url(), &factum_testkit::redis::namespace("restart"))
                .await
                .expect("connect");
        let store = test_log(200, 5).await;
        let events = all_events(&store).await;
        let checkpoints = RedisCheckpoints::new(&keyspace);
        let mut subscription =
            Subscription::with_checkpoints("ledger", store.clone(), checkpoints.clone())
                .batch_size(10);
        subscription
            .catch_up_to(Ledger::default(), events[99].position)
            .await
            .expect("the first half");
        assert_eq!(read_model(&keyspace).await, fold(&events[..100]));

        server.kill();
        server.restart();
        subscription
            .catch_up(Ledger::default())
            .await
            .expect("catch up after the restart");
        assert_eq!(read_model(&keyspace).await, fold(&events));
        assert_eq!(
            checkpoints.load("ledger").await.expect("load"),
            Some(store.head())
        );
    });
}
