//! The checkout saga survives its process: a runtime killed with `kill -9` between persisting a
//! decision and dispatching it, or while a timeout is pending, and restarted (after the deadline)
//! dispatches each command and fires each timeout exactly once. And two runtime instances on one
//! database handle each event once and fire each timeout once.
//!
//! The runtime under test is this test binary itself, re-executed as a child process running the
//! ignored test `child` (see [`spawn`]).

mod support;

use std::process::Stdio;
use std::time::Duration;

use checkout::{CheckoutChange, OrderDetails};
use chrono::{DateTime, Utc};
use factum::saga::TestClock;
use factum::subscription::{Lease, NoLease, StartFrom, Subscription};
use factum::{CommandId, EventId};
use factum_postgres::PostgresStore;
use factum_postgres::subscription::{PgCheckpoints, PgLease};
use factum_testkit::postgres::TestDatabase;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout};

use support::*;

const T0: &str = "2026-01-01T12:00:00Z";
const PREFIX: &str = "saga-child: ";

fn at(minutes: i64) -> DateTime<Utc> {
    T0.parse::<DateTime<Utc>>().expect("a time") + chrono::Duration::minutes(minutes)
}

/// A child process running the checkout runtime on database `url` with its clock at `now`:
/// `persist` only feeds the saga from the log (decisions stored, nothing dispatched), `full`
/// also dispatches and fires. Returns it with the lines it reports.
fn spawn(
    url: &str,
    mode: &str,
    now: DateTime<Utc>,
) -> (Child, tokio::io::Lines<BufReader<ChildStdout>>) {
    let mut child = tokio::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("SAGA_CHILD_URL", url)
        .env("SAGA_CHILD_MODE", mode)
        .env("SAGA_CHILD_NOW", now.to_rfc3339())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the child runtime");
    let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    (child, lines)
}

/// The next report of the child.
async fn report(lines: &mut tokio::io::Lines<BufReader<ChildStdout>>) -> String {
    let next = async {
        while let Some(line) = lines.next_line().await.expect("read the child") {
            // The test harness may have started the line ("test child ... ").
            if let Some(at) = line.find(PREFIX) {
                return line[at + PREFIX.len()..].to_owned();
            }
        }
        panic!("the child ended without reporting");
    };
    tokio::time::timeout(PATIENCE, next)
        .await
        .expect("the child reports in time")
}

/// `kill -9`.
async fn kill9(child: &mut Child) {
    child.start_kill().expect("SIGKILL");
    let status = child.wait().await.expect("wait for the child");
    assert!(!status.success(), "killed, not exited: {status}");
}

/// The child: runs only when re-executed by a test with `SAGA_CHILD_URL` set.
#[test]
#[ignore = "the child process of the restart tests, run by them"]
fn child() {
    let Ok(url) = std::env::var("SAGA_CHILD_URL") else {
        return;
    };
    let mode = std::env::var("SAGA_CHILD_MODE").expect("SAGA_CHILD_MODE");
    let now: DateTime<Utc> = std::env::var("SAGA_CHILD_NOW")
        .expect("SAGA_CHILD_NOW")
        .parse()
        .expect("SAGA_CHILD_NOW is a time");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let store = PostgresStore::connect(&url).await.expect("connect");
        let checkout = checkout_runtime(&store, TestClock::new(now));
        let mut feed = Subscription::with_checkpoints(
            checkout.name(),
            store.clone(),
            PgCheckpoints::new(&store),
        )
        .filter(checkout.filter());
        feed.catch_up(checkout.clone())
            .await
            .expect("feed the saga");
        if mode == "persist" {
            println!("{PREFIX}persisted");
            std::future::pending::<()>().await;
        }
        let done = checkout.tick().await.expect("tick");
        println!(
            "{PREFIX}ticked dispatched={} fired={}",
            done.dispatched, done.fired
        );
        let never = std::future::pending::<()>;
        let (fed, ran) = tokio::join!(
            feed.run(checkout.clone(), never()),
            checkout.run(PgLease::new(&store), never())
        );
        panic!("the child's runtime stopped: {fed:?} {ran:?}");
    });
}

fn timed_out(changes: &[CheckoutChange]) -> usize {
    changes
        .iter()
        .filter(|c| matches!(c, CheckoutChange::TimedOut))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_fires_exactly_once_after_the_runtime_is_killed_and_restarted_past_its_deadline()
{
    let db = TestDatabase::create().await;
    let store = db.patient_store();
    place(&store, order("t-1", "street")).await;

    // Before the deadline: the stock is reserved, the payment requested, the timeout pending.
    let (mut first, mut lines) = spawn(db.url(), "full", at(0));
    assert_eq!(report(&mut lines).await, "ticked dispatched=1 fired=0");
    eventually!(
        "the payment request",
        checkout_changes(&store, "t-1")
            .await
            .iter()
            .any(|c| matches!(c, CheckoutChange::PaymentRequested(_)))
            .then_some(())
    );
    let runtime = checkout_runtime(&store, TestClock::new(at(0)));
    let [timeout] = &runtime.timeouts("t-1").await.expect("timeouts")[..] else {
        panic!("one pending timeout");
    };
    assert_eq!(timeout.due_at, at(15));
    kill9(&mut first).await;
    assert_eq!(count(&store, "order-t-1", "order.cancelled").await, 0);

    // Restarted after the deadline: it fires, and its compensation runs.
    let (mut second, mut lines) = spawn(db.url(), "full", at(16));
    assert_eq!(
        report(&mut lines).await,
        "ticked dispatched=2 fired=1",
        "fired, then released the stock and cancelled the order"
    );
    kill9(&mut second).await;

    // Restarted again: nothing fires twice.
    let (mut third, mut lines) = spawn(db.url(), "full", at(17));
    assert_eq!(report(&mut lines).await, "ticked dispatched=0 fired=0");
    kill9(&mut third).await;

    assert_eq!(timed_out(&checkout_changes(&store, "t-1").await), 1);
    assert_eq!(count(&store, "order-t-1", "order.cancelled").await, 1);
    assert_eq!(count(&store, "stock-lamp", "stock.reserved").await, 1);
    assert_eq!(count(&store, "stock-lamp", "stock.released").await, 1);
    assert!(runtime.timeouts("t-1").await.expect("timeouts").is_empty());
    assert!(runtime.pending("t-1").await.expect("pending").is_empty());
    let view = shop_view(&store).await;
    assert_eq!(view.orders["t-1"], "cancelled: no payment in time");
    assert_eq!(view.reserved["lamp"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_persisting_a_decision_and_dispatching_it_dispatches_it_once_after_the_restart()
 {
    let db = TestDatabase::create().await;
    let store = db.patient_store();
    place(&store, order("c-1", "street")).await;
    let placed = stream(&store, "order-c-1").await.remove(0);

    // The decision is stored: the command queued with an id derived from the event, and the
    // timeout; nothing dispatched. Then the process dies.
    let (mut first, mut lines) = spawn(db.url(), "persist", at(0));
    assert_eq!(report(&mut lines).await, "persisted");
    kill9(&mut first).await;
    let runtime = checkout_runtime(&store, TestClock::new(at(0)));
    let [queued] = &runtime.pending("c-1").await.expect("pending")[..] else {
        panic!("one queued command");
    };
    let reserve_id = CommandId::derived(EventId::from_uuid(placed.event_id.as_uuid()), 0);
    assert_eq!(queued.command.context.command_id, reserve_id);
    assert_eq!(queued.command.target, "stock");
    assert_eq!(count(&store, "stock-lamp", "stock.reserved").await, 0);

    // After the restart it is dispatched, once.
    let (mut second, mut lines) = spawn(db.url(), "full", at(0));
    assert_eq!(report(&mut lines).await, "ticked dispatched=1 fired=0");
    kill9(&mut second).await;
    let (mut third, mut lines) = spawn(db.url(), "full", at(0));
    assert_eq!(report(&mut lines).await, "ticked dispatched=0 fired=0");
    kill9(&mut third).await;

    // A replay of the log from the start decides nothing again.
    let mut replay =
        Subscription::with_checkpoints(runtime.name(), store.clone(), PgCheckpoints::new(&store))
            .filter(runtime.filter())
            .start_from(StartFrom::Beginning);
    replay.catch_up(runtime.clone()).await.expect("replay");
    assert_eq!(runtime.tick().await.expect("tick").dispatched, 0);

    let reserved = stream(&store, "stock-lamp").await;
    assert_eq!(
        reserved.len(),
        1,
        "the target stream has the command's event once"
    );
    assert_eq!(
        reserved[0].metadata.causation_id,
        Some(reserve_id.into()),
        "caused by the derived command id"
    );
    assert_eq!(
        reserved[0].metadata.correlation_id, placed.metadata.correlation_id,
        "in the order's workflow"
    );
    let started = checkout_changes(&store, "c-1")
        .await
        .iter()
        .filter(|c| matches!(c, CheckoutChange::Started(_)))
        .count();
    assert_eq!(started, 1);
}

fn numbered(i: usize) -> OrderDetails {
    OrderDetails {
        sku: format!("lamp{i}"),
        ..order(&format!("n-{i}"), "street")
    }
}

/// Two runtime instances (feeds with checkpoint transactions and the lease; dispatch loops
/// leased with `lease`) on one database, on a multi-threaded runtime.
async fn two_instances_handle_each_event_and_timeout_once<L: Lease + Clone>(
    lease: impl Fn(&PostgresStore) -> L,
) {
    const ORDERS: usize = 12;
    let db = TestDatabase::create().await;
    let store = db.patient_store();
    let clock = TestClock::new(at(0));
    let (a, b) = (
        checkout_runtime(&store, clock.clone()),
        checkout_runtime(&store, clock.clone()),
    );
    let feed = |runtime: &factum::saga::SagaRuntime<_, _>| {
        Subscription::with_checkpoints(runtime.name(), store.clone(), PgCheckpoints::new(&store))
            .filter(runtime.filter())
            .lease(PgLease::new(&store))
    };
    let (mut feed_a, mut feed_b) = (feed(&a), feed(&b));
    let never = std::future::pending::<()>;
    let (lease_a, lease_b) = (lease(&store), lease(&store));
    let instances = async {
        tokio::try_join!(
            async { feed_a.run(a.clone(), never()).await.map(|_| ()) },
            async { feed_b.run(b.clone(), never()).await.map(|_| ()) },
            a.run(lease_a, never()),
            b.run(lease_b, never()),
        )
    };
    let scenario = async {
        let placing = (0..ORDERS).map(|i| place(&store, numbered(i)));
        futures_util::future::join_all(placing).await;
        for i in 0..ORDERS {
            eventually!(
                format!("order {i} awaiting payment"),
                checkout_changes(&store, &format!("n-{i}"))
                    .await
                    .iter()
                    .any(|c| matches!(c, CheckoutChange::PaymentRequested(_)))
                    .then_some(())
            );
        }
        clock.advance(Duration::from_secs(16 * 60));
        for i in 0..ORDERS {
            eventually!(
                format!("order {i} cancelled"),
                (count(&store, &format!("order-n-{i}"), "order.cancelled").await == 1
                    && count(&store, &format!("stock-lamp{i}"), "stock.released").await == 1)
                    .then_some(())
            );
        }
    };
    tokio::select! {
        stopped = instances => panic!("an instance stopped: {stopped:?}"),
        () = scenario => {}
    }

    for i in 0..ORDERS {
        let changes = checkout_changes(&store, &format!("n-{i}")).await;
        let kinds: Vec<&str> = changes
            .iter()
            .map(|c| factum::Event::event_type(c))
            .collect();
        assert_eq!(
            kinds,
            [
                "checkout.started",
                "checkout.stock_reserved",
                "checkout.payment_requested",
                "checkout.timed_out"
            ],
            "order {i}: each input reacted to once"
        );
        assert_eq!(
            count(&store, &format!("stock-lamp{i}"), "stock.reserved").await,
            1
        );
        assert_eq!(
            count(&store, &format!("order-n-{i}"), "order.cancelled").await,
            1
        );
    }
    let (sa, sb) = (a.status().borrow().clone(), b.status().borrow().clone());
    assert_eq!(
        sa.fired + sb.fired,
        ORDERS as u64,
        "each timeout fired once: {sa:?} {sb:?}"
    );
    // Per order: the placement, the reservation, the timeout.
    assert_eq!(sa.reacted + sb.reacted, 3 * ORDERS as u64, "{sa:?} {sb:?}");
    // Per order: reserve, release, cancel.
    assert_eq!(
        sa.dispatched + sb.dispatched,
        3 * ORDERS as u64,
        "{sa:?} {sb:?}"
    );
    eprintln!(
        "instance a: reacted {} fired {} dispatched {}; instance b: reacted {} fired {} dispatched {}",
        sa.reacted, sa.fired, sa.dispatched, sb.reacted, sb.fired, sb.dispatched
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_runtime_instances_under_the_lease_fire_each_timeout_once_and_handle_each_event_once() {
    two_instances_handle_each_event_and_timeout_once(PgLease::new).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_runtime_instances_dispatching_at_once_still_fire_each_timeout_once() {
    // No lease for the dispatch loops: both claim commands and timeouts concurrently; the
    // instance row lock and the claims keep each to one.
    two_instances_handle_each_event_and_timeout_once(|_| NoLease).await;
}

/// A stock target failing transiently while `failing` is above 0, then executing in the
/// dispatch's transaction.
struct Flaky {
    inner: factum_postgres::saga::PgTarget<checkout::Stock>,
    failing: std::sync::Arc<std::sync::atomic::AtomicU32>,
}

impl factum::saga::Target<factum_postgres::subscription::PgTx> for Flaky {
    fn aggregate_type(&self) -> &'static str {
        "stock"
    }

    fn execute<'a>(
        &'a self,
        tx: &'a mut factum_postgres::subscription::PgTx,
        command: &'a factum::saga::SentCommand,
    ) -> factum::BoxFuture<'a, Result<factum::saga::Executed, factum::Error>> {
        use std::sync::atomic::Ordering;
        if self
            .failing
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Box::pin(async {
                Err(factum::Error::transient(
                    "reserve",
                    "the warehouse did not answer",
                ))
            });
        }
        self.inner.execute(tx, command)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatch_that_keeps_failing_is_retried_with_backoff_then_parked_and_runs_once_retried() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    let db = TestDatabase::create().await;
    let store = db.patient_store();
    let clock = TestClock::new(at(0));
    let failing = Arc::new(AtomicU32::new(100));
    let runtime = factum::saga::SagaRuntime::<checkout::Checkout, _>::new(
        factum_postgres::saga::PgSagaStore::new(&store),
    )
    .clock(clock.clone())
    .target(Flaky {
        inner: factum_postgres::saga::PgTarget::new(&store),
        failing: failing.clone(),
    })
    .options(
        factum::saga::SagaOptions::default().retry(
            factum::resilience::RetryPolicy::new()
                .with_max_attempts(3)
                .with_initial_delay(Duration::from_secs(5))
                .with_max_delay(Duration::from_secs(5))
                .with_max_elapsed(None),
        ),
    );
    place(&store, order("p-1", "street")).await;
    Subscription::with_checkpoints(runtime.name(), store.clone(), PgCheckpoints::new(&store))
        .filter(runtime.filter())
        .catch_up(runtime.clone())
        .await
        .expect("feed");

    // Failed attempts are postponed to a stored time on the runtime's clock.
    assert_eq!(runtime.tick().await.expect("tick").dispatched, 0);
    let [queued] = &runtime.pending("p-1").await.expect("pending")[..] else {
        panic!("one command")
    };
    assert_eq!(queued.attempts, 1);
    assert!(queued.due_at > at(0) && queued.due_at <= at(0) + chrono::Duration::seconds(5));
    assert!(
        queued
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("did not answer"))
    );
    assert_eq!(
        runtime.tick().await.expect("tick").dispatched,
        0,
        "not due yet"
    );
    assert_eq!(failing.load(Ordering::SeqCst), 99);
    for _ in 0..2 {
        clock.advance(Duration::from_secs(6));
        runtime.tick().await.expect("tick");
    }
    let [parked] = &runtime.parked().await.expect("parked")[..] else {
        panic!("one parked instance")
    };
    assert_eq!(parked.key, "p-1");
    assert!(parked.error.contains("did not answer"), "{}", parked.error);
    // (Well before the payment timeout.)
    clock.advance(Duration::from_secs(60));
    assert_eq!(
        runtime.tick().await.expect("tick").dispatched,
        0,
        "parked: it waits"
    );
    assert_eq!(failing.load(Ordering::SeqCst), 97);

    failing.store(0, Ordering::SeqCst);
    assert!(runtime.retry_parked("p-1").await.expect("retry"));
    assert!(
        !runtime.retry_parked("p-1").await.expect("retry"),
        "not parked any more"
    );
    assert_eq!(runtime.tick().await.expect("tick").dispatched, 1);
    assert!(runtime.parked().await.expect("parked").is_empty());
    assert_eq!(count(&store, "stock-lamp", "stock.reserved").await, 1);
}
