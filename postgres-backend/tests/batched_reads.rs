//! Batched reads: stream reads that queue behind a read statement share the next one, and each
//! still gets exactly its own stream's events, in order.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use factum::{
    AppendRequest, Error, EventId, EventStore, ExpectedVersion, NewEvent, StreamId, StreamVersion,
};
use factum_postgres::{BatchedReads, GroupCommit, PostgresStore, StoreOptions};
use factum_testkit::postgres::TestDatabase;
use futures_util::TryStreamExt;

type Read<'a> = Pin<Box<dyn Future<Output = Result<Vec<(u64, String)>, Error>> + Send + 'a>>;

fn event(payload: String) -> NewEvent {
    NewEvent {
        event_id: EventId::new(),
        event_type: "batched.read".into(),
        schema_version: 1,
        payload: serde_json::value::RawValue::from_string(payload).expect("json"),
        metadata: Default::default(),
    }
}

fn stream(name: &str) -> StreamId {
    StreamId::new(name).expect("id")
}

/// The payload of event `version` of `stream` in these tests (keys in order, as
/// `serde_json::Value` writes them).
fn payload(stream: &StreamId, version: u64) -> String {
    format!(r#"{{"stream":"{stream}","v":{version}}}"#)
}

async fn fill(store: &PostgresStore, stream: &StreamId, events: u64) {
    store
        .append(AppendRequest::new(
            stream.clone(),
            (1..=events).map(|v| event(payload(stream, v))).collect(),
        ))
        .await
        .expect("fill");
}

/// What a stream read returns: each event's version and payload.
async fn read(
    store: &PostgresStore,
    stream: &StreamId,
    after: u64,
) -> Result<Vec<(u64, String)>, Error> {
    store
        .read_stream_payloads(stream, StreamVersion::new(after))
        .map_ok(|e| {
            // In a canonical form (the server stores `jsonb`, which has its own).
            let payload: serde_json::Value = serde_json::from_str(e.payload.get()).expect("json");
            (e.stream_version.get(), payload.to_string())
        })
        .try_collect()
        .await
}

/// What a read of `stream` after `after` must return when it holds `events` events.
fn expected(stream: &StreamId, after: u64, events: u64) -> Vec<(u64, String)> {
    (after + 1..=events)
        .map(|v| (v, payload(stream, v)))
        .collect()
}

/// Polls `read` once: far enough to queue it behind the read statement in flight.
async fn queue(read: &mut Read<'_>) {
    poll_fn(|cx| {
        assert!(
            read.as_mut().poll(cx).is_pending(),
            "the read should wait behind the statement in flight"
        );
        Poll::Ready(())
    })
    .await;
}

/// The statements of this database waiting for a lock: how many, and how many of them are the
/// batched read statement.
async fn lock_waits(db: &TestDatabase) -> (i64, i64) {
    sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE query LIKE '%WITH ORDINALITY%') \
         FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .fetch_one(db.pool())
    .await
    .expect("pg_stat_activity")
}

/// Waits until the server shows the lock waits `done` accepts (the server is the
/// synchronisation point).
async fn until_server_shows(db: &TestDatabase, what: &str, done: impl Fn((i64, i64)) -> bool) {
    let waiting = async {
        loop {
            if done(lock_waits(db).await) {
                return;
            }
            tokio::task::yield_now().await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .is_err()
    {
        panic!("the server never showed {what}: {:?}", lock_waits(db).await);
    }
}

/// Takes an `ACCESS EXCLUSIVE` lock on the events table in a transaction of its own.
async fn lock_events(db: &TestDatabase) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut tx = db.pool().begin().await.expect("tx");
    sqlx::query("LOCK TABLE factum.events IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await
        .expect("lock the events table");
    tx
}

/// Takes the table lock and runs `first` (a read, which takes the only statement slot) until the
/// server shows it waiting for the lock; returns the lock's transaction and the read's task.
async fn hold_the_slot<T: Send + 'static>(
    db: &TestDatabase,
    first: impl Future<Output = T> + Send + 'static,
) -> (
    sqlx::Transaction<'static, sqlx::Postgres>,
    tokio::task::JoinHandle<T>,
) {
    let lock = lock_events(db).await;
    let first = tokio::spawn(first);
    until_server_shows(db, "the first read waiting", |(all, _)| all == 1).await;
    (lock, first)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_reads_share_one_statement_and_each_gets_its_own_stream() {
    let db = TestDatabase::create().await;
    // One connection, one read statement at a time, and 3 events of a stream per statement.
    // (One connection, so that both read statements are prepared on it before the lock games:
    // preparing is a round trip of its own, which ends the transaction holding the first
    // read's lock, and would let the second lock overtake it.)
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(db.url())
        .await
        .expect("pool");
    let store = PostgresStore::with_options(
        pool,
        StoreOptions::default().with_batched_reads(
            BatchedReads::enabled()
                .with_max_in_flight(1)
                .with_rows_per_stream(3),
        ),
    );
    let (long, short, empty) = (stream("r-long"), stream("r-short"), stream("r-empty"));
    fill(&store, &long, 5).await;
    fill(&store, &short, 2).await;

    // Warm-up: a read alone, and one queued behind it (which runs the batched statement).
    let (lock, first) = hold_the_slot(&db, {
        let (store, short) = (store.clone(), short.clone());
        async move {
            read(&store, &short, 0).await.expect("warm-up read");
        }
    })
    .await;
    let mut warm: Read<'_> = Box::pin(read(&store, &long, 0));
    queue(&mut warm).await;
    lock.commit().await.expect("release");
    first.await.expect("warm-up task");
    assert_eq!(warm.await.expect("a queued read"), expected(&long, 0, 5));

    // A read that takes the only statement slot and waits for the table lock.
    let (first_lock, first) = hold_the_slot(&db, {
        let (store, short) = (store.clone(), short.clone());
        async move { read(&store, &short, 0).await }
    })
    .await;

    // Reads queued behind it: the long stream from the start and from version 3, the short one
    // twice, and a stream with no events.
    let mut queued: Vec<Read<'_>> = vec![
        Box::pin(read(&store, &long, 0)),
        Box::pin(read(&store, &long, 3)),
        Box::pin(read(&store, &short, 0)),
        Box::pin(read(&store, &short, 1)),
        Box::pin(read(&store, &empty, 0)),
    ];
    for read in &mut queued {
        queue(read).await;
    }

    // A second lock request queues behind the first read: once that read is done, it holds the
    // table, so the statement of the queued reads waits where the server shows it.
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let second_lock = tokio::spawn({
        let pool = db.pool().clone();
        async move {
            let mut tx = pool.begin().await.expect("tx");
            sqlx::query("LOCK TABLE factum.events IN ACCESS EXCLUSIVE MODE")
                .execute(&mut *tx)
                .await
                .expect("lock the events table again");
            released.await.expect("release");
            tx.commit().await.expect("release the second lock");
        }
    });
    until_server_shows(&db, "the second lock queued", |(all, _)| all == 2).await;

    let checks = async {
        first_lock.commit().await.expect("release the first lock");
        let first = first.await.expect("task").expect("the first read");
        assert_eq!(first, expected(&short, 0, 2));
        // The five queued reads are one statement: the only one waiting, and a batched one.
        until_server_shows(&db, "one batched statement waiting", |waits| {
            waits == (1, 1)
        })
        .await;
        release.send(()).expect("the lock holder");
    };
    let (outcomes, ()) =
        futures_util::future::join(futures_util::future::join_all(queued), checks).await;
    second_lock.await.expect("lock task");

    let outcomes: Vec<Vec<(u64, String)>> = outcomes
        .into_iter()
        .map(|o| o.expect("a queued read"))
        .collect();
    // The first 3 events of the long stream came with the batch, the rest from a read of its
    // own; the same stream twice in one batch is two reads.
    assert_eq!(
        outcomes,
        [
            expected(&long, 0, 5),
            expected(&long, 3, 5),
            expected(&short, 0, 2),
            expected(&short, 1, 2),
            Vec::new(),
        ]
    );
}

/// 16 writers on a multi-threaded runtime, each appending to its own stream and reading its own
/// and a neighbour's stream back after every append, through batched reads of 2 events per
/// statement (so most reads go on alone after their batch): every read is a gapless prefix of
/// its stream, the writer's own stream exactly what it wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_reads_each_see_their_own_stream_whole_and_in_order() {
    const WRITERS: usize = 16;
    const APPENDS: u64 = 20;
    let db = TestDatabase::create().await;
    let store = db.store_with(
        StoreOptions::default()
            .with_group_commit(GroupCommit::enabled())
            .with_batched_reads(BatchedReads::enabled().with_rows_per_stream(2)),
    );
    let streams: Arc<Vec<StreamId>> =
        Arc::new((0..WRITERS).map(|w| stream(&format!("c-{w}"))).collect());
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (store, streams) = (store.clone(), Arc::clone(&streams));
            tokio::spawn(async move {
                let own = &streams[w];
                let neighbour = &streams[(w + 1) % WRITERS];
                for v in 1..=APPENDS {
                    store
                        .append(
                            AppendRequest::new(own.clone(), vec![event(payload(own, v))])
                                .expected_version(ExpectedVersion::Exact(StreamVersion::new(
                                    v - 1,
                                ))),
                        )
                        .await
                        .expect("append");
                    let (mine, theirs) = futures_util::future::join(
                        read(&store, own, 0),
                        read(&store, neighbour, 0),
                    )
                    .await;
                    assert_eq!(mine.expect("own read"), expected(own, 0, v));
                    let theirs = theirs.expect("neighbour read");
                    assert_eq!(
                        theirs,
                        expected(neighbour, 0, theirs.len() as u64),
                        "a read of {neighbour} is a gapless prefix of it"
                    );
                    // From where it stands too.
                    assert_eq!(
                        read(&store, own, v / 2)
                            .await
                            .expect("read from the middle"),
                        expected(own, v / 2, v)
                    );
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.expect("writer");
    }
    for s in streams.iter() {
        assert_eq!(
            read(&store, s, 0).await.expect("final read"),
            expected(s, 0, APPENDS)
        );
    }
}
