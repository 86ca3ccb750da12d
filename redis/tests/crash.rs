//! Crash loops: a consumer writing a Redis read model runs in a child process (this test binary,
//! started again) that is killed with SIGKILL — between `MULTI` and `EXEC`, and at random points
//! of its batches, again and again — and restarted. After every kill the read model equals the
//! fold of the events up to the stored checkpoint, and in the end the fold of all events: no
//! event applied twice, none lost. The inbound path too: a consumer of JetStream killed between
//! `EXEC` and the acknowledgement.

mod support;

use std::process::Stdio;
use std::time::Duration;

use factum::bus::{
    Bus, BusMessage, ConsumerConfig, InboundConsumer, InboundOptions, ServiceName, StreamConfig,
};
use factum::subscription::{Subscription, TransactionalCheckpoint};
use factum::{LogPosition, RecordedEvent};
use factum_nats::JetStreamBus;
use factum_redis::redis::AsyncCommands as _;
use factum_redis::{RedisCheckpoints, RedisInbox, RedisKeyspace};
use factum_testkit::nats::NatsServer;
use factum_testkit::redis::RedisServer;
use support::*;
use tokio::io::{AsyncBufReadExt, BufReader};

const EVENTS: usize = 400;
const STREAMS: usize = 8;
const BATCH: usize = 20;
const NAME: &str = "ledger";

type Lines = tokio::io::Lines<BufReader<tokio::process::ChildStdout>>;

/// The child side: the ledger consumer over the test log, on the Redis and namespace the parent
/// names. With `FACTUM_CHILD_PAUSE_AT=k` it stops for ever in its k-th commit, after `MULTI`
/// and the queued commands were sent and before `EXEC`, and says so.
#[test]
fn child_process() {
    let Ok(role) = std::env::var("FACTUM_CHILD") else {
        return; // Only when a crash test starts this binary as its child.
    };
    let url = std::env::var("FACTUM_CHILD_REDIS").expect("Redis url");
    let namespace = std::env::var("FACTUM_CHILD_NAMESPACE").expect("namespace");
    if let Some(k) = std::env::var("FACTUM_CHILD_PAUSE_AT")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        let commits = std::sync::atomic::AtomicUsize::new(0);
        factum_redis::__set_before_exec_hook(move || {
            if commits.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == k {
                println!("factum-child: between MULTI and EXEC");
                loop {
                    std::thread::park();
                }
            }
        });
    }
    runtime().block_on(async move {
        let keyspace = RedisKeyspace::connect(&url, &namespace)
            .await
            .expect("connect");
        match role.as_str() {
            "sink" => {
                let store = test_log(EVENTS, STREAMS).await;
                let mut subscription =
                    Subscription::with_checkpoints(NAME, store, RedisCheckpoints::new(&keyspace))
                        .batch_size(BATCH);
                subscription
                    .catch_up(Ledger { announce: true })
                    .await
                    .expect("catch up");
                println!("factum-child: done");
            }
            "inbound" => {
                let nats = std::env::var("FACTUM_CHILD_NATS").expect("NATS url");
                let stall_after: usize = std::env::var("FACTUM_CHILD_STALL_AFTER")
                    .expect("stall after")
                    .parse()
                    .expect("a number");
                let bus = JetStreamBus::connect(&nats).await.expect("connect");
                let inbox = StallAfterExec {
                    inner: RedisInbox::new(&keyspace),
                    stall_after,
                    committed: Default::default(),
                };
                InboundConsumer::new(bus, inbox, inbound_config())
                    .options(inbound_options())
                    .run(Ledger::default(), std::future::pending())
                    .await
                    .expect("consumer");
            }
            other => panic!("unknown child role {other}"),
        }
    });
}

fn spawn_child(
    role: &str,
    redis: &str,
    namespace: &str,
    env: &[(&str, String)],
) -> (tokio::process::Child, Lines) {
    let mut command = tokio::process::Command::new(std::env::current_exe().expect("test binary"));
    command
        .args([
            "--exact",
            "child_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("FACTUM_CHILD", role)
        .env("FACTUM_CHILD_REDIS", redis)
        .env("FACTUM_CHILD_NAMESPACE", namespace)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    for (name, value) in env {
        command.env(name, value);
    }
    let mut child = command.spawn().expect("start the child");
    let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    (child, lines)
}

/// Reads the child's lines until `wanted` has been seen `times` times.
async fn wait_for_line(lines: &mut Lines, wanted: &str, times: usize) {
    let found = tokio::time::timeout(LIMIT, async {
        let mut seen = 0;
        while let Some(line) = lines.next_line().await.expect("child output") {
            if line.contains(wanted) {
                seen += 1;
                if seen == times {
                    return true;
                }
            }
        }
        false
    })
    .await;
    assert_eq!(
        found,
        Ok(true),
        "the child printed {wanted:?} {times} times"
    );
}

/// The clients of `redis` inside a `MULTI` (flag `x`), with how many commands they queued.
async fn clients_in_multi(keyspace: &RedisKeyspace) -> Vec<u64> {
    let list: String = factum_redis::redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut keyspace.connection())
        .await
        .expect("CLIENT LIST");
    list.lines()
        .filter(|line| {
            line.split(' ').any(|f| {
                f.strip_prefix("flags=")
                    .is_some_and(|flags| flags.contains('x'))
            })
        })
        .filter_map(|line| {
            line.split(' ')
                .find_map(|f| f.strip_prefix("multi="))
                .and_then(|n| n.parse().ok())
        })
        .collect()
}

/// The read model equals the fold of the events up to the stored checkpoint; returns how many
/// events that is.
async fn consistent(keyspace: &RedisKeyspace, events: &[RecordedEvent]) -> usize {
    let checkpoint = RedisCheckpoints::new(keyspace)
        .load(NAME)
        .await
        .expect("load")
        .unwrap_or(LogPosition::START);
    let upto = events
        .iter()
        .take_while(|e| e.position <= checkpoint)
        .count();
    assert_eq!(
        read_model(keyspace).await,
        fold(&events[..upto]),
        "the read model is the fold of the {upto} events up to the checkpoint {checkpoint}"
    );
    upto
}

async fn run_to_the_end(
    server: &str,
    namespace: &str,
    keyspace: &RedisKeyspace,
    events: &[RecordedEvent],
) {
    let (mut child, mut lines) = spawn_child("sink", server, namespace, &[]);
    wait_for_line(&mut lines, "factum-child: done", 1).await;
    let status = child.wait().await.expect("wait");
    assert!(status.success(), "{status:?}");
    assert_eq!(consistent(keyspace, events).await, events.len());
    assert_eq!(read_model(keyspace).await, fold(events));
}

/// Kill -9 between `MULTI` and `EXEC`, five times at different commits: Redis held the queued
/// transaction (seen in `CLIENT LIST`), discarded it with the connection, and the restarted
/// consumer applies that batch once.
#[test]
fn killed_between_multi_and_exec_and_restarted_the_read_model_equals_the_fold() {
    runtime().block_on(async {
        let server = RedisServer::start();
        let namespace = factum_testkit::redis::namespace("crash-exec");
        let keyspace = RedisKeyspace::connect(&server.url(), &namespace)
            .await
            .expect("connect");
        let events = all_events(&test_log(EVENTS, STREAMS).await).await;
        let mut applied = 0;
        for k in [1, 3, 2, 4, 1] {
            let (mut child, mut lines) = spawn_child(
                "sink",
                &server.url(),
                &namespace,
                &[("FACTUM_CHILD_PAUSE_AT", k.to_string())],
            );
            wait_for_line(&mut lines, "factum-child: between MULTI and EXEC", 1).await;
            let in_multi = clients_in_multi(&keyspace).await;
            assert_eq!(
                in_multi.len(),
                1,
                "the child's unit of work is inside MULTI"
            );
            // Its batch's writes (2 per event) and the checkpoint move are queued.
            assert_eq!(in_multi[0], (2 * BATCH + 1) as u64, "queued commands");
            child.kill().await.expect("kill -9 the consumer");
            // Redis drops the connection, and the transaction with it.
            let deadline = tokio::time::Instant::now() + LIMIT;
            while !clients_in_multi(&keyspace).await.is_empty() {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the MULTI outlived its client"
                );
                tokio::task::yield_now().await;
            }
            let now = consistent(&keyspace, &events).await;
            assert_eq!(
                now,
                applied + (k - 1) * BATCH,
                "the k-1 batches before it, not the k-th"
            );
            applied = now;
        }
        assert!(applied < events.len());
        run_to_the_end(&server.url(), &namespace, &keyspace, &events).await;
    });
}

/// Kill -9 at whatever point of a batch the signal lands (reading, queueing, `EXEC`), eight
/// times: after each kill the read model equals the fold up to the checkpoint; at the end, the
/// fold of every event.
#[test]
fn killed_mid_batch_repeatedly_the_read_model_equals_the_fold() {
    runtime().block_on(async {
        let server = RedisServer::start();
        let namespace = factum_testkit::redis::namespace("crash-batch");
        let keyspace = RedisKeyspace::connect(&server.url(), &namespace)
            .await
            .expect("connect");
        let events = all_events(&test_log(EVENTS, STREAMS).await).await;
        let mut progress = Vec::new();
        for k in [2, 1, 3, 1, 2, 1, 2, 1] {
            let (mut child, mut lines) = spawn_child("sink", &server.url(), &namespace, &[]);
            // In its k-th batch (the first one again after a restart).
            wait_for_line(&mut lines, "factum-child: batch", k).await;
            child.kill().await.expect("kill -9 the consumer");
            progress.push(consistent(&keyspace, &events).await);
        }
        assert!(
            progress.windows(2).all(|w| w[0] <= w[1]),
            "the checkpoint never goes back: {progress:?}"
        );
        assert!(*progress.last().expect("kills") > 0, "{progress:?}");
        eprintln!("figures: events applied after each kill: {progress:?}");
        run_to_the_end(&server.url(), &namespace, &keyspace, &events).await;
    });
}

fn inbound_config() -> ConsumerConfig {
    ConsumerConfig::new("CONTENT", "notifications").ack_wait(Duration::from_secs(2))
}

fn inbound_options() -> InboundOptions {
    InboundOptions::default().fetch_wait(Duration::from_millis(200))
}

/// Bus (JetStream) → inbound consumer → Redis inbox: the consumer process is killed (kill -9)
/// after `EXEC` of a message and before its acknowledgement; JetStream delivers it again and the
/// inbox drops it: the read model equals the fold, each event once.
#[test]
fn the_inbound_consumer_killed_between_exec_and_ack_applies_each_message_once() {
    runtime().block_on(async {
        let nats = NatsServer::start();
        let redis = factum_testkit::redis::shared_url();
        let namespace = factum_testkit::redis::namespace("crash-inbound");
        let keyspace = RedisKeyspace::connect(&redis, &namespace)
            .await
            .expect("connect");
        let events = all_events(&test_log(30, 3).await).await;
        let service = ServiceName::new("content").expect("name");
        let bus = JetStreamBus::connect(&nats.url()).await.expect("connect");
        bus.ensure_stream(&StreamConfig::for_service(&service))
            .await
            .expect("stream");
        let messages: Vec<BusMessage> = events
            .iter()
            .map(|e| BusMessage::new("content.account.credited", service.clone(), e.clone()))
            .collect();
        bus.publish(&messages).await.expect("publish");

        let (mut child, mut lines) = spawn_child(
            "inbound",
            &redis,
            &namespace,
            &[
                ("FACTUM_CHILD_NATS", nats.url()),
                ("FACTUM_CHILD_STALL_AFTER", "7".into()),
            ],
        );
        wait_for_line(&mut lines, "factum-child: committed", 1).await;
        child.kill().await.expect("kill -9 the consumer");
        assert_eq!(
            read_model(&keyspace).await,
            fold(&events[..7]),
            "seven applied before the kill"
        );

        let inbox = RedisInbox::new(&keyspace);
        let mut consumer = InboundConsumer::new(bus.clone(), inbox.clone(), inbound_config())
            .options(inbound_options());
        let mut status = consumer.status();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(async move {
            consumer
                .run(Ledger::default(), async {
                    let _ = stopped.await;
                })
                .await
        });
        let done = tokio::time::timeout(
            LIMIT,
            status.wait_for(|s| s.handled == 23 && s.duplicates >= 1),
        )
        .await
        .expect("the rest handled")
        .expect("status")
        .clone();
        let _ = stop.send(());
        running.await.expect("task").expect("consumer");
        assert!(
            done.redeliveries >= 1,
            "the unacknowledged message came again: {done:?}"
        );
        assert_eq!(read_model(&keyspace).await, fold(&events));
        let records: Vec<String> = keyspace
            .connection()
            .keys(format!("{namespace}:factum:inbox:notifications:*"))
            .await
            .expect("keys");
        assert_eq!(records.len(), events.len(), "one inbox record per event");
        drop(nats);
    });
}

/// An inbox that, once it committed `stall_after` messages, says "committed" and never returns
/// from that commit: applied in Redis, not acknowledged, when the parent kills the process.
struct StallAfterExec {
    inner: RedisInbox,
    stall_after: usize,
    committed: std::sync::atomic::AtomicUsize,
}

impl factum::bus::Inbox for StallAfterExec {
    type Tx = factum_redis::RedisTx;

    async fn begin(
        &self,
        consumer: &str,
        message: &BusMessage,
    ) -> Result<Option<Self::Tx>, factum::Error> {
        self.inner.begin(consumer, message).await
    }

    async fn commit(&self, tx: Self::Tx) -> Result<(), factum::Error> {
        self.inner.commit(tx).await?;
        if self
            .committed
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1
            == self.stall_after
        {
            println!("factum-child: committed");
            std::future::pending::<()>().await;
        }
        Ok(())
    }

    async fn rollback(&self, tx: Self::Tx) {
        self.inner.rollback(tx).await;
    }

    async fn park(&self, parked: factum::bus::ParkedMessage) -> Result<u64, factum::Error> {
        self.inner.park(parked).await
    }

    async fn parked(
        &self,
        consumer: &str,
    ) -> Result<Vec<factum::bus::ParkedMessage>, factum::Error> {
        self.inner.parked(consumer).await
    }

    async fn unpark(
        &self,
        tx: &mut Self::Tx,
        consumer: &str,
        id: u64,
    ) -> Result<bool, factum::Error> {
        self.inner.unpark(tx, consumer, id).await
    }

    async fn discard(&self, consumer: &str, id: u64) -> Result<bool, factum::Error> {
        self.inner.discard(consumer, id).await
    }
}
