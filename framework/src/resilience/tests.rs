//! Tests of the retry loop: what is retried, bounds, budget, unknown outcomes. Paused time.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use super::telemetry::testing::TestRecorder;
use super::*;
use crate::{ExpectedVersion, StreamVersion, error_chain};

fn stream() -> StreamId {
    StreamId::new("account-1").expect("valid stream id")
}

fn transient(n: u32) -> Error {
    Error::transient("append", format!("connection refused (attempt {n})"))
}

fn unknown(n: u32) -> Error {
    Error::UnknownOutcome {
        operation: "append",
        stream: stream(),
        source: format!("connection reset (attempt {n})").into(),
    }
}

/// Fast, generous policies and budget so that only what a test sets limits retries.
fn resilience() -> Resilience {
    Resilience::new("db")
        .with_policies(RetryPolicies::uniform(
            RetryPolicy::new()
                .with_max_attempts(5)
                .with_initial_delay(Duration::from_millis(100))
                .with_max_delay(Duration::from_secs(1))
                .with_max_elapsed(None),
        ))
        .with_budget(RetryBudget::unlimited())
        .with_breaker_config(CircuitBreakerConfig {
            consecutive_failures: 1000,
            minimum_calls: 1000,
            ..CircuitBreakerConfig::default()
        })
}

/// Runs `resilience.run` (or `run_idempotent`) over a script of results, one per attempt;
/// returns the result and the number of attempts made.
async fn scripted(
    resilience: &Resilience,
    operation: Operation,
    idempotent: bool,
    script: Vec<Result<u32, Error>>,
) -> (Result<u32, Error>, u32) {
    let script = Mutex::new(script.into_iter());
    let attempts = AtomicU32::new(0);
    let call = || {
        attempts.fetch_add(1, Ordering::SeqCst);
        let next = script
            .lock()
            .expect("not poisoned")
            .next()
            .expect("the script has a result for every attempt");
        async move { next }
    };
    let result = if idempotent {
        resilience.run_idempotent(operation, call).await
    } else {
        resilience.run(operation, call).await
    };
    (result, attempts.load(Ordering::SeqCst))
}

#[tokio::test(start_paused = true)]
async fn transient_failures_are_retried_within_the_backoff_ceilings() {
    let recorder = TestRecorder::default();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let resilience = resilience();
    let start = Instant::now();
    let (result, attempts) = scripted(
        &resilience,
        Operation::Append,
        false,
        vec![
            Err(transient(1)),
            Err(transient(2)),
            Err(transient(3)),
            Ok(7),
        ],
    )
    .await;
    assert_eq!(result.expect("succeeds on the 4th attempt"), 7);
    assert_eq!(attempts, 4);
    // Three full-jitter delays, each at most its ceiling (100 + 200 + 400 ms).
    assert!(
        start.elapsed() <= Duration::from_millis(700),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(
        recorder.get("factum_retries_total{operation=append,dependency=db}"),
        3.0
    );
    assert_eq!(recorder.total("factum_retry_give_ups_total"), 0.0);
}

#[tokio::test(start_paused = true)]
async fn only_transient_errors_are_retried() {
    let resilience = resilience();
    let not_retried = [
        Error::Conflict {
            stream: stream(),
            expected: ExpectedVersion::NoStream,
            actual: StreamVersion::new(3),
        },
        Error::permanent("append", "permission denied"),
        Error::InvalidArgument("empty batch".into()),
        Error::Unavailable {
            dependency: "other",
            retry_after: Duration::from_secs(1),
        },
        // Not idempotent: an unknown outcome is the caller's to reconcile.
        unknown(1),
    ];
    for error in not_retried {
        let kind = error.kind();
        let (result, attempts) =
            scripted(&resilience, Operation::Read, false, vec![Err(error)]).await;
        assert_eq!(attempts, 1, "{kind} must not be retried");
        assert_eq!(result.expect_err("fails").kind(), kind);
    }
}

#[tokio::test(start_paused = true)]
async fn giving_up_after_max_attempts_returns_the_last_error() {
    let recorder = TestRecorder::default();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let resilience = resilience().with_policy(
        Operation::Read,
        RetryPolicy::new()
            .with_max_attempts(3)
            .with_max_elapsed(None),
    );
    let (result, attempts) = scripted(
        &resilience,
        Operation::Read,
        false,
        vec![Err(transient(1)), Err(transient(2)), Err(transient(3))],
    )
    .await;
    assert_eq!(attempts, 3);
    let error = result.expect_err("gives up");
    assert!(format!("{:?}", error).contains("attempt 3"), "{error:?}");
    assert_eq!(
        recorder
            .get("factum_retry_give_ups_total{operation=read,dependency=db,reason=max_attempts}"),
        1.0
    );
}

#[tokio::test(start_paused = true)]
async fn no_retry_starts_past_the_max_elapsed_time() {
    let recorder = TestRecorder::default();
    let _guard = metrics::set_default_local_recorder(&recorder);
    // Constant 1 s ceilings and 1.5 s allowed: however the jittered delays fall, retrying stops
    // before the total wait passes 1.5 s, long before 100 attempts.
    let resilience = resilience().with_policy(
        Operation::Append,
        RetryPolicy::new()
            .with_max_attempts(100)
            .with_initial_delay(Duration::from_secs(1))
            .with_max_delay(Duration::from_secs(1))
            .with_max_elapsed(Some(Duration::from_millis(1500))),
    );
    let start = Instant::now();
    let script = (1..=100).map(|n| Err(transient(n))).collect();
    let (result, attempts) = scripted(&resilience, Operation::Append, false, script).await;
    assert!(result.is_err());
    assert!(attempts < 100, "stopped by time, not attempts: {attempts}");
    assert!(start.elapsed() <= Duration::from_millis(1500));
    assert_eq!(
        recorder
            .get("factum_retry_give_ups_total{operation=append,dependency=db,reason=max_elapsed}"),
        1.0
    );
}

#[tokio::test(start_paused = true)]
async fn an_exhausted_budget_stops_retries_across_operations() {
    let recorder = TestRecorder::default();
    let _guard = metrics::set_default_local_recorder(&recorder);
    // Two retries' worth of tokens, refilled at 2 per second, calls earning nothing.
    let budget = RetryBudget::new(0.0)
        .with_min_per_second(2.0)
        .with_capacity(2.0);
    let resilience = resilience().with_budget(budget.clone());
    assert!((budget.available() - 2.0).abs() < 1e-9);

    // A read spends both tokens, then gives up with its last error.
    let (result, attempts) = scripted(
        &resilience,
        Operation::Read,
        false,
        (1..=5).map(|n| Err(transient(n))).collect(),
    )
    .await;
    assert_eq!(attempts, 3, "1 call + 2 retries");
    assert!(format!("{:?}", result.expect_err("gives up")).contains("attempt 3"));
    assert_eq!(
        recorder.get("factum_retry_give_ups_total{operation=read,dependency=db,reason=budget}"),
        1.0
    );

    // An append on the same dependency shares the budget: no retry left right now (the read's
    // backoff took at most 300 ms, refilling at most 0.6 token).
    let (result, attempts) = scripted(
        &resilience,
        Operation::Append,
        false,
        vec![Err(transient(1)), Ok(1)],
    )
    .await;
    assert_eq!(attempts, 1);
    assert!(result.is_err());
    assert_eq!(
        recorder.get("factum_retry_give_ups_total{operation=append,dependency=db,reason=budget}"),
        1.0
    );
    assert!(resilience.health().retry_budget < 1.0);

    // The minimum rate refills it.
    tokio::time::advance(Duration::from_secs(1)).await;
    let (result, attempts) = scripted(
        &resilience,
        Operation::Append,
        false,
        vec![Err(transient(1)), Ok(1)],
    )
    .await;
    assert_eq!((result.expect("retried"), attempts), (1, 2));
}

#[tokio::test(start_paused = true)]
async fn an_open_circuit_fails_fast_without_calling() {
    let resilience = resilience().with_breaker_config(CircuitBreakerConfig {
        consecutive_failures: 2,
        cool_down: Duration::from_secs(30),
        ..CircuitBreakerConfig::default()
    });
    let recorder = TestRecorder::default();
    let _guard = metrics::set_default_local_recorder(&recorder);
    // Two failures open the circuit; the third attempt is refused before the call.
    let start = Instant::now();
    let (result, attempts) = scripted(
        &resilience,
        Operation::Read,
        false,
        (1..=5).map(|n| Err(transient(n))).collect(),
    )
    .await;
    assert_eq!(attempts, 2);
    match result {
        Err(Error::Unavailable {
            dependency,
            retry_after,
        }) => {
            assert_eq!(dependency, "db");
            assert!(retry_after <= Duration::from_secs(30));
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert_eq!(
        recorder
            .get("factum_retry_give_ups_total{operation=read,dependency=db,reason=circuit_open}"),
        1.0
    );
    let after_first = start.elapsed();
    assert!(resilience.is_open());
    let (result, attempts) = scripted(&resilience, Operation::Read, false, vec![Ok(1)]).await;
    assert_eq!(attempts, 0, "not called while open");
    assert_eq!(
        result.expect_err("fails fast").kind(),
        ErrorKind::Unavailable
    );
    assert_eq!(start.elapsed(), after_first, "no waiting when failing fast");
}

#[tokio::test(start_paused = true)]
async fn idempotent_calls_are_repeated_after_an_unknown_outcome() {
    let resilience = resilience();
    let (result, attempts) = scripted(
        &resilience,
        Operation::Append,
        true,
        vec![Err(unknown(1)), Err(transient(2)), Ok(3)],
    )
    .await;
    assert_eq!((result.expect("settled"), attempts), (3, 3));
}

#[tokio::test(start_paused = true)]
async fn an_unsettled_unknown_outcome_stays_an_unknown_outcome() {
    let resilience = resilience().with_policy(
        Operation::Append,
        RetryPolicy::new()
            .with_max_attempts(3)
            .with_max_elapsed(None),
    );
    let (result, attempts) = scripted(
        &resilience,
        Operation::Append,
        true,
        vec![Err(transient(1)), Err(unknown(2)), Err(transient(3))],
    )
    .await;
    assert_eq!(attempts, 3);
    let error = result.expect_err("not settled");
    assert_eq!(error.kind(), ErrorKind::UnknownOutcome, "{error}");
    // The last error is kept as the cause.
    let source = std::error::Error::source(&error).expect("has a source");
    assert!(source.to_string().contains("transient"), "{source}");

    // Nothing in the chain may claim that nothing was stored: the first attempt may have.
    let chain = error_chain(&error);
    assert!(!chain.contains("nothing was stored"), "{chain}");
    assert!(!chain.contains("retrying may succeed"), "{chain}");
    assert!(chain.contains("connection refused (attempt 3)"), "{chain}");

    // A conflict after an unknown outcome is a real answer: nothing of ours was stored.
    let (result, _) = scripted(
        &resilience,
        Operation::Append,
        true,
        vec![
            Err(unknown(1)),
            Err(Error::Conflict {
                stream: stream(),
                expected: ExpectedVersion::NoStream,
                actual: StreamVersion::new(1),
            }),
        ],
    )
    .await;
    assert!(result.expect_err("conflict").is_conflict());
}

#[tokio::test(start_paused = true)]
async fn an_unknown_outcome_ended_by_an_open_circuit_says_neither_nothing_nor_retry() {
    let resilience = resilience().with_breaker_config(CircuitBreakerConfig {
        consecutive_failures: 2,
        cool_down: Duration::from_secs(60),
        ..CircuitBreakerConfig::default()
    });
    let (result, _) = scripted(
        &resilience,
        Operation::Append,
        true,
        vec![Err(unknown(1)), Err(transient(2)), Err(transient(3))],
    )
    .await;
    let error = result.expect_err("not settled");
    assert_eq!(error.kind(), ErrorKind::UnknownOutcome, "{error}");
    let chain = error_chain(&error);
    assert!(!chain.contains("nothing was stored"), "{chain}");
    assert!(chain.contains("unavailable"), "{chain}");
}

#[tokio::test(start_paused = true)]
async fn health_reports_the_circuit_and_the_budget() {
    let resilience = resilience()
        .with_policy(Operation::Read, RetryPolicy::no_retry())
        .with_breaker_config(CircuitBreakerConfig {
            consecutive_failures: 1,
            cool_down: Duration::from_secs(10),
            ..CircuitBreakerConfig::default()
        });
    let health = resilience.health();
    assert_eq!(health.dependency, "db");
    assert_eq!(health.circuit, CircuitState::Closed);
    assert!(!health.circuit_open);
    assert_eq!(health.retry_after, None);
    let _ = scripted(&resilience, Operation::Read, false, vec![Err(transient(1))]).await;
    let health = resilience.health();
    assert_eq!(health.circuit, CircuitState::Open);
    assert!(health.circuit_open);
    assert_eq!(health.retry_after, Some(Duration::from_secs(10)));
}
