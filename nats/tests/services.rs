//! Two services with their own PostgreSQL databases, talking only through the bus: the bank's
//! relay publishes its account events, the audit service's inbound consumer applies each once.
//! On the in-process bus and on NATS JetStream, with the broker, the relay and the consumer
//! killed (kill -9) mid-stream.

mod support;

use std::process::Stdio;
use std::time::Duration;

use factum::bus::{Bus, InProcessBus, Inbox};
use factum::subscription::{StartFrom, TransactionalCheckpoint};
use factum::{EventStore, LogPosition};
use factum_nats::JetStreamBus;
use factum_postgres::subscription::PgCheckpoints;
use factum_testkit::nats::NatsServer;
use factum_testkit::postgres::TestDatabase;
use support::*;
use tokio::io::{AsyncBufReadExt, BufReader};

const LIMIT: Duration = Duration::from_secs(60);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Two services, each on a database of its own.
struct Services {
    bank_db: TestDatabase,
    audit_db: TestDatabase,
    bank: factum_postgres::PostgresStore,
    audit: factum_postgres::PostgresStore,
}

async fn services() -> Services {
    let bank_db = TestDatabase::create().await;
    let audit_db = TestDatabase::create().await;
    let bank = bank_store(bank_db.pool());
    let audit = audit_store(audit_db.pool());
    bank.migrate().await.expect("migrate the bank");
    audit.migrate().await.expect("migrate the audit service");
    create_read_model(&audit).await;
    Services {
        bank_db,
        audit_db,
        bank,
        audit,
    }
}

/// The scenario both buses run: activity in the bank, relayed and applied once; then the relay
/// rewound to the beginning and run again, which changes nothing on the receiving side.
async fn relay_and_consume<B: Bus + Clone + 'static>(bus: B, window: Duration) -> (u64, u64)
where
    B::Consumer: 'static,
{
    let s = services().await;
    bus.ensure_stream(&stream(window)).await.expect("stream");
    bank_activity(&s.bank, 5, 35, 0).await;
    let sent = fold_of_bank(&s.bank)
        .await
        .values()
        .map(|(_, n)| *n as u64)
        .sum::<u64>();
    assert_eq!(sent, 40);

    let (mut relay, mut subscription, relay_status) = relay(&s.bank, bus.clone(), 16);
    subscription.catch_up(&mut relay).await.expect("relay");
    assert_eq!(
        relay_status.borrow().published,
        sent,
        "{:?}",
        *relay_status.borrow()
    );

    let mut running = spawn_auditor(&s.audit, bus.clone(), Duration::from_secs(30));
    until(&mut running.status, LIMIT, "every event handled", |s| {
        s.handled == sent
    })
    .await;
    assert_exactly_once(&s.bank, &s.audit).await;

    // The relay rewound: everything is published again.
    PgCheckpoints::new(&s.bank)
        .reset(&relay.name(), LogPosition::START)
        .await
        .expect("rewind the relay");
    let (mut again, mut subscription) = {
        let (relay, subscription, _) = support::relay(&s.bank, bus.clone(), 16);
        (relay, subscription.start_from(StartFrom::Checkpoint))
    };
    let again_status = again.status();
    subscription
        .catch_up(&mut again)
        .await
        .expect("relay again");
    let republished = again_status.borrow().clone();
    assert_eq!(
        republished.published + republished.duplicates,
        sent,
        "{republished:?}"
    );

    // Whatever the broker let through, the inbox drops.
    let final_status = until(&mut running.status, LIMIT, "the repeats seen", |s| {
        s.handled + s.duplicates == sent + republished.published
    })
    .await;
    assert_eq!(
        final_status.handled, sent,
        "no repeat had an effect: {final_status:?}"
    );
    assert_eq!(final_status.parked, 0);
    running.stop().await;
    let inbox_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM factum.inbox")
        .fetch_one(s.audit.pool())
        .await
        .expect("count the inbox");
    assert_eq!(inbox_rows as u64, sent, "one inbox row per event");
    let inbox = factum_postgres::PgInbox::new(&s.audit);
    assert!(inbox.parked(CONSUMER).await.expect("parked").is_empty());
    assert_exactly_once(&s.bank, &s.audit).await;
    drop((s.bank_db, s.audit_db));
    (republished.published, republished.duplicates)
}

#[test]
fn end_to_end_on_the_in_process_bus() {
    runtime().block_on(async {
        // No duplicate window: every repeat reaches the inbox, which drops it.
        let (published, duplicates) = relay_and_consume(InProcessBus::new(), Duration::ZERO).await;
        assert_eq!((published, duplicates), (40, 0));
    });
}

#[test]
fn end_to_end_on_jetstream() {
    runtime().block_on(async {
        let server = NatsServer::start();
        let bus = JetStreamBus::connect(&server.url()).await.expect("connect");
        // Within JetStream's duplicate window: the broker drops every repeat itself and says so.
        let (published, duplicates) = relay_and_consume(bus, Duration::from_secs(120)).await;
        assert_eq!((published, duplicates), (0, 40));
    });
}

/// Runs relay and consumer as tasks of this process while the bank works and the broker is
/// killed (kill -9) and restarted twice.
#[test]
fn the_broker_killed_and_restarted_mid_stream_loses_and_doubles_nothing() {
    runtime().block_on(async {
        let mut server = NatsServer::start();
        let s = services().await;
        let bus = JetStreamBus::connect(&server.url()).await.expect("connect");
        bus.ensure_stream(&stream(Duration::from_secs(120)))
            .await
            .expect("stream");
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let shutdown = |mut stopped: tokio::sync::watch::Receiver<bool>| async move {
            let _ = stopped.wait_for(|s| *s).await;
        };

        let (mut relay, mut subscription, mut relay_status) = relay(&s.bank, bus.clone(), 8);
        let relay_task = tokio::spawn({
            let stopped = stopped.clone();
            async move {
                subscription
                    .run(&mut relay, shutdown(stopped))
                    .await
                    .expect("relay")
            }
        });
        let (mut consumer, mut status) = consumer(&s.audit, bus.clone(), Duration::from_secs(5));
        let auditor = Auditor {
            store: s.audit.clone(),
        };
        let consumer_task = tokio::spawn({
            let stopped = stopped.clone();
            async move {
                consumer
                    .run(auditor, shutdown(stopped))
                    .await
                    .expect("consumer")
            }
        });

        let mut sent = 0;
        for round in 0..2 {
            bank_activity(&s.bank, 4, 36, round * 4).await;
            sent += 40;
            until(&mut status, LIMIT, "some handled", |st| {
                st.handled >= sent - 30
            })
            .await;
            server.kill();
            // The bank keeps working while the broker is down.
            bank_activity(&s.bank, 2, 8, 100 + round * 2).await;
            sent += 10;
            until(&mut relay_status, LIMIT, "the relay notices", |r| {
                matches!(r.state, factum::bus::RelayState::Retrying(_))
            })
            .await;
            server.restart();
        }
        let done = until(&mut status, LIMIT * 2, "every event handled", |st| {
            st.handled == sent
        })
        .await;
        stop.send(true).expect("stop");
        relay_task.await.expect("relay task");
        consumer_task.await.expect("consumer task");
        assert_eq!(done.parked, 0, "{done:?}");
        assert_exactly_once(&s.bank, &s.audit).await;
    });
}

/// The child side of the crash tests: a relay or a consumer in a process of its own, on the
/// databases and broker the parent names. It never returns when it stalls on purpose: the
/// parent kills it.
#[test]
fn child_process() {
    let Ok(role) = std::env::var("FACTUM_CHILD") else {
        return; // Only when the crash tests start this binary as their child.
    };
    runtime().block_on(async move {
        let nats = std::env::var("FACTUM_CHILD_NATS").expect("NATS url");
        let bus = JetStreamBus::connect(&nats).await.expect("connect");
        match role.as_str() {
            "relay" => {
                let pool = sqlx::PgPool::connect(&std::env::var("FACTUM_CHILD_DB").expect("db"))
                    .await
                    .expect("connect");
                let store = bank_store(&pool);
                let stall_after: Option<usize> = std::env::var("FACTUM_CHILD_STALL_AFTER")
                    .ok()
                    .and_then(|v| v.parse().ok());
                let bus = Stalling::new(bus, stall_after);
                let (mut relay, mut subscription, _) = relay(&store, bus, 10);
                subscription
                    .run(&mut relay, std::future::pending())
                    .await
                    .expect("relay");
            }
            "consumer" => {
                let pool = sqlx::PgPool::connect(&std::env::var("FACTUM_CHILD_DB").expect("db"))
                    .await
                    .expect("connect");
                let store = audit_store(&pool);
                let stall_after: usize = std::env::var("FACTUM_CHILD_STALL_AFTER")
                    .expect("stall after")
                    .parse()
                    .expect("a number");
                let inbox = StallingInbox::new(factum_postgres::PgInbox::new(&store), stall_after);
                let mut consumer = factum::bus::InboundConsumer::new(
                    bus,
                    inbox,
                    consumer_config(Duration::from_secs(2)),
                );
                consumer
                    .run(Auditor { store }, std::future::pending())
                    .await
                    .expect("consumer");
            }
            other => panic!("unknown child role {other}"),
        }
    });
}

/// Starts this test binary as the child `role`, returning it and its stdout lines.
fn spawn_child(
    role: &str,
    db: &str,
    nats: &str,
    stall_after: Option<usize>,
) -> (
    tokio::process::Child,
    tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
) {
    let mut command = tokio::process::Command::new(std::env::current_exe().expect("test binary"));
    command
        .args([
            "--exact",
            "child_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("FACTUM_CHILD", role)
        .env("FACTUM_CHILD_DB", db)
        .env("FACTUM_CHILD_NATS", nats)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    if let Some(n) = stall_after {
        command.env("FACTUM_CHILD_STALL_AFTER", n.to_string());
    }
    let mut child = command.spawn().expect("start the child");
    let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    (child, lines)
}

async fn wait_for_line(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    wanted: &str,
) {
    let found = tokio::time::timeout(LIMIT, async {
        while let Some(line) = lines.next_line().await.expect("child output") {
            if line.contains(wanted) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(found, Ok(true), "the child printed {wanted:?}");
}

/// The relay process is killed (kill -9) in the middle of a batch — some of its messages
/// published, its checkpoint not moved — and started again: it publishes the batch again,
/// JetStream drops what it had, and the audit service applies every event once.
#[test]
fn the_relay_killed_mid_batch_and_restarted_publishes_each_event_once() {
    runtime().block_on(async {
        let server = NatsServer::start();
        let s = services().await;
        let bus = JetStreamBus::connect(&server.url()).await.expect("connect");
        bus.ensure_stream(&stream(Duration::from_secs(120)))
            .await
            .expect("stream");
        bank_activity(&s.bank, 10, 90, 0).await;

        // Stalls after 25 messages: in its third batch of 10, 5 published, no checkpoint.
        let (mut child, mut lines) = spawn_child("relay", s.bank_db.url(), &server.url(), Some(25));
        wait_for_line(&mut lines, "factum-child: stalled").await;
        child.kill().await.expect("kill -9 the relay");
        let checkpoint = PgCheckpoints::new(&s.bank)
            .load("bank.relay")
            .await
            .expect("checkpoint")
            .expect("the first batches were checkpointed");
        let relayed = s
            .bank
            .read_all(LogPosition::START, 1000, &routes().filter())
            .await
            .expect("read")
            .iter()
            .filter(|e| e.position <= checkpoint)
            .count();
        assert_eq!(relayed, 20, "two batches checkpointed, the third not");

        let (_child, _lines) = spawn_child("relay", s.bank_db.url(), &server.url(), None);
        let mut running = spawn_auditor(&s.audit, bus.clone(), Duration::from_secs(30));
        let done = until(&mut running.status, LIMIT, "every event handled", |st| {
            st.handled == 100
        })
        .await;
        running.stop().await;
        assert_eq!(
            done.duplicates, 0,
            "JetStream dropped the republished half batch: {done:?}"
        );
        let info = factum::bus::BusConsumer::info(
            &mut bus
                .consumer(&factum::bus::ConsumerConfig::new("BANK", "count-check"))
                .await
                .expect("a consumer"),
        )
        .await
        .expect("info");
        assert_eq!(info.pending, 100, "the stream holds each event once");
        assert_exactly_once(&s.bank, &s.audit).await;
    });
}

/// The consumer process is killed (kill -9) after it committed a message's effect and before it
/// acknowledged it: JetStream delivers the message again, the inbox drops it.
#[test]
fn the_consumer_killed_between_commit_and_ack_applies_each_event_once() {
    runtime().block_on(async {
        let server = NatsServer::start();
        let s = services().await;
        let bus = JetStreamBus::connect(&server.url()).await.expect("connect");
        bus.ensure_stream(&stream(Duration::from_secs(120)))
            .await
            .expect("stream");
        bank_activity(&s.bank, 5, 25, 0).await;
        let (mut relay, mut subscription, _) = relay(&s.bank, bus.clone(), 50);
        subscription.catch_up(&mut relay).await.expect("relay");

        let (mut child, mut lines) =
            spawn_child("consumer", s.audit_db.url(), &server.url(), Some(7));
        wait_for_line(&mut lines, "factum-child: committed").await;
        child.kill().await.expect("kill -9 the consumer");
        let inbox = factum_postgres::PgInbox::new(&s.audit);
        let handled: i64 = sqlx::query_scalar("SELECT count(*) FROM factum.inbox")
            .fetch_one(s.audit.pool())
            .await
            .expect("count");
        assert_eq!(handled, 7, "seven effects committed before the kill");

        let mut running = spawn_auditor(&s.audit, bus.clone(), Duration::from_secs(2));
        let done = until(&mut running.status, LIMIT, "the rest handled", |st| {
            st.handled == 30 - 7 && st.duplicates >= 1
        })
        .await;
        running.stop().await;
        assert!(
            done.redeliveries >= 1,
            "the unacknowledged message came again: {done:?}"
        );
        assert!(inbox.parked(CONSUMER).await.expect("parked").is_empty());
        assert_exactly_once(&s.bank, &s.audit).await;
    });
}

/// A bus that stops answering (for ever) in the middle of the batch that takes it past
/// `stall_after` messages, after publishing the first part of that batch, and says "stalled".
#[derive(Clone)]
struct Stalling<B> {
    inner: B,
    stall_after: Option<usize>,
    published: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl<B> Stalling<B> {
    fn new(inner: B, stall_after: Option<usize>) -> Self {
        Self {
            inner,
            stall_after,
            published: Default::default(),
        }
    }
}

impl<B: Bus> Bus for Stalling<B> {
    type Consumer = B::Consumer;

    async fn ensure_stream(&self, config: &factum::bus::StreamConfig) -> Result<(), factum::Error> {
        self.inner.ensure_stream(config).await
    }

    async fn publish(
        &self,
        messages: &[factum::bus::BusMessage],
    ) -> Result<Vec<factum::bus::PublishAck>, factum::Error> {
        use std::sync::atomic::Ordering;
        let before = self.published.load(Ordering::SeqCst);
        if let Some(limit) = self.stall_after
            && before + messages.len() > limit
        {
            let part = limit.saturating_sub(before);
            self.inner.publish(&messages[..part]).await?;
            println!("factum-child: stalled");
            std::future::pending::<()>().await;
        }
        let acks = self.inner.publish(messages).await?;
        self.published.fetch_add(messages.len(), Ordering::SeqCst);
        Ok(acks)
    }

    async fn consumer(
        &self,
        config: &factum::bus::ConsumerConfig,
    ) -> Result<B::Consumer, factum::Error> {
        self.inner.consumer(config).await
    }
}

/// An inbox that, once it committed `stall_after` messages, says "committed" and never returns
/// from that commit: the message is committed and not acknowledged when the parent kills it.
struct StallingInbox<I> {
    inner: I,
    stall_after: usize,
    committed: std::sync::atomic::AtomicUsize,
}

impl<I> StallingInbox<I> {
    fn new(inner: I, stall_after: usize) -> Self {
        Self {
            inner,
            stall_after,
            committed: Default::default(),
        }
    }
}

impl<I: Inbox> Inbox for StallingInbox<I> {
    type Tx = I::Tx;

    fn begin(
        &self,
        consumer: &str,
        message: &factum::bus::BusMessage,
    ) -> impl Future<Output = Result<Option<I::Tx>, factum::Error>> + Send {
        self.inner.begin(consumer, message)
    }

    async fn commit(&self, tx: I::Tx) -> Result<(), factum::Error> {
        self.inner.commit(tx).await?;
        let n = self
            .committed
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        if n == self.stall_after {
            println!("factum-child: committed");
            std::future::pending::<()>().await;
        }
        Ok(())
    }

    fn rollback(&self, tx: I::Tx) -> impl Future<Output = ()> + Send {
        self.inner.rollback(tx)
    }

    fn park(
        &self,
        parked: factum::bus::ParkedMessage,
    ) -> impl Future<Output = Result<u64, factum::Error>> + Send {
        self.inner.park(parked)
    }

    fn parked(
        &self,
        consumer: &str,
    ) -> impl Future<Output = Result<Vec<factum::bus::ParkedMessage>, factum::Error>> + Send {
        self.inner.parked(consumer)
    }

    fn unpark(
        &self,
        tx: &mut I::Tx,
        consumer: &str,
        id: u64,
    ) -> impl Future<Output = Result<bool, factum::Error>> + Send {
        self.inner.unpark(tx, consumer, id)
    }

    fn discard(
        &self,
        consumer: &str,
        id: u64,
    ) -> impl Future<Output = Result<bool, factum::Error>> + Send {
        self.inner.discard(consumer, id)
    }
}
