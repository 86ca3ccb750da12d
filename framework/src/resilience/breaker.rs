//! The circuit breaker: stop calling a dependency that is down, and say so.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::error::Error;

use super::telemetry;

/// The state of a [`CircuitBreaker`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum CircuitState {
    /// Calls go through; failures are counted.
    Closed,
    /// Calls fail fast with [`Error::Unavailable`] until the cool-down ends.
    Open,
    /// The cool-down ended: one trial call goes through; its success closes the circuit, its
    /// failure opens it again. Other calls fail fast meanwhile.
    HalfOpen,
}

impl CircuitState {
    /// The value of the `factum_circuit_state` gauge: 0 closed, 1 open, 2 half-open.
    pub const fn gauge_value(self) -> f64 {
        match self {
            CircuitState::Closed => 0.0,
            CircuitState::Open => 1.0,
            CircuitState::HalfOpen => 2.0,
        }
    }

    /// `closed`, `open` or `half_open`: the label value in metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half_open",
        }
    }
}

impl fmt::Display for CircuitState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// When a [`CircuitBreaker`] opens and how long it stays open.
///
/// The circuit opens when either `consecutive_failures` calls in a row failed, or at least
/// `minimum_calls` calls were made in the rolling `window` and at least `failure_rate` of them
/// failed. It stays open for `cool_down`, then lets one trial call through.
///
/// ```
/// use std::time::Duration;
/// use factum::resilience::CircuitBreakerConfig;
///
/// let config = CircuitBreakerConfig {
///     consecutive_failures: 3,
///     cool_down: Duration::from_secs(1),
///     ..CircuitBreakerConfig::default()
/// };
/// assert_eq!(config.failure_rate, 0.5);
/// ```
#[derive(Clone, Copy, PartialEq, Debug)]
pub struct CircuitBreakerConfig {
    /// Failures in a row that open the circuit (default 5).
    pub consecutive_failures: u32,
    /// The failure fraction in the window that opens the circuit (default 0.5).
    pub failure_rate: f64,
    /// The fewest calls in the window for the rate to count (default 20).
    pub minimum_calls: u32,
    /// The rolling window the rate is measured over (default 30 s, in 10 buckets).
    pub window: Duration,
    /// How long the circuit stays open before a trial call (default 5 s).
    pub cool_down: Duration,
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            failure_rate: 0.5,
            minimum_calls: 20,
            window: Duration::from_secs(30),
            cool_down: Duration::from_secs(5),
        }
    }
}

/// Whether an error means the dependency itself is failing.
///
/// Only infrastructure failures count: transient errors, unknown outcomes and permanent backend
/// errors. Conflicts, duplicate ids, invalid arguments, decode and encode errors are answers from
/// a working dependency and count as successes; [`Error::Unavailable`] from another breaker
/// counts as neither.
pub fn is_infrastructure_failure(error: &Error) -> bool {
    matches!(
        error,
        Error::Transient { .. } | Error::UnknownOutcome { .. } | Error::Permanent { .. }
    )
}

/// A circuit breaker for one dependency: closed → open after too many failures → half-open
/// after a cool-down → closed after a successful trial (or open again after a failed one).
///
/// Built on `tokio::time`, so it runs in paused time in tests. Clones share the same state.
/// Each transition emits a `tracing` event and the `factum_circuit_transitions_total` and
/// `factum_circuit_state` metrics.
///
/// ```
/// use std::time::Duration;
/// use factum::resilience::{CircuitBreaker, CircuitBreakerConfig, CircuitState};
/// use factum::{Error, ErrorKind};
///
/// # tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap().block_on(async {
/// let breaker = CircuitBreaker::new("postgres", CircuitBreakerConfig {
///     consecutive_failures: 2,
///     ..Default::default()
/// });
/// for _ in 0..2 {
///     let permit = breaker.try_acquire().unwrap();
///     permit.record::<()>(&Err(Error::transient("append", "connection refused")));
/// }
/// assert_eq!(breaker.state(), CircuitState::Open);
/// let err = breaker.try_acquire().unwrap_err();
/// assert_eq!(err.kind(), ErrorKind::Unavailable);
/// # });
/// ```
#[derive(Clone)]
pub struct CircuitBreaker {
    dependency: &'static str,
    config: CircuitBreakerConfig,
    state: Arc<Mutex<Inner>>,
}

impl fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("dependency", &self.dependency)
            .field("state", &self.state())
            .finish()
    }
}

const BUCKETS: usize = 10;

#[derive(Debug)]
struct Inner {
    state: State,
    consecutive_failures: u32,
    window: Window,
}

#[derive(Clone, Copy, Debug)]
enum State {
    Closed,
    Open { until: Instant },
    HalfOpen { trial_in_flight: bool },
}

impl State {
    fn public(self) -> CircuitState {
        match self {
            State::Closed => CircuitState::Closed,
            State::Open { .. } => CircuitState::Open,
            State::HalfOpen { .. } => CircuitState::HalfOpen,
        }
    }
}

/// Calls and failures in the rolling window, in buckets of `window / BUCKETS`.
#[derive(Debug)]
struct Window {
    origin: Instant,
    bucket_len: Duration,
    buckets: [Bucket; BUCKETS],
}

#[derive(Clone, Copy, Default, Debug)]
struct Bucket {
    epoch: u64,
    calls: u32,
    failures: u32,
}

impl Window {
    fn new(window: Duration) -> Self {
        Self {
            origin: Instant::now(),
            bucket_len: (window / BUCKETS as u32).max(Duration::from_millis(1)),
            buckets: [Bucket::default(); BUCKETS],
        }
    }

    fn epoch(&self, now: Instant) -> u64 {
        // Epochs start at 1, so the zeroed buckets never count as current.
        let elapsed = now.duration_since(self.origin).as_nanos() / self.bucket_len.as_nanos();
        u64::try_from(elapsed).unwrap_or(u64::MAX - 1) + 1
    }

    fn record(&mut self, now: Instant, failure: bool) {
        let epoch = self.epoch(now);
        let bucket = &mut self.buckets[(epoch % BUCKETS as u64) as usize];
        if bucket.epoch != epoch {
            *bucket = Bucket {
                epoch,
                ..Bucket::default()
            };
        }
        bucket.calls += 1;
        bucket.failures += u32::from(failure);
    }

    fn totals(&self, now: Instant) -> (u32, u32) {
        let current = self.epoch(now);
        self.buckets
            .iter()
            .filter(|b| b.epoch + BUCKETS as u64 > current)
            .fold((0, 0), |(c, f), b| (c + b.calls, f + b.failures))
    }

    fn reset(&mut self) {
        self.buckets = [Bucket::default(); BUCKETS];
    }
}

/// Permission for one call through a [`CircuitBreaker`]; report the call's result with
/// [`record`](Permit::record). A permit dropped without a result (a cancelled call) counts as
/// neither success nor failure, and a half-open circuit lets another trial through.
#[must_use = "report the call's result with `Permit::record`"]
#[derive(Debug)]
pub struct Permit {
    breaker: CircuitBreaker,
    trial: bool,
    recorded: bool,
}

impl Permit {
    /// Reports the call's result: only [infrastructure failures](is_infrastructure_failure)
    /// count as failures.
    pub fn record<T>(self, result: &Result<T, Error>) {
        self.record_outcome(result.as_ref().err());
    }

    /// Reports the call's outcome: `None` for a success, `Some(error)` for a failure (which
    /// counts only if it is an [infrastructure failure](is_infrastructure_failure)).
    pub fn record_outcome(mut self, error: Option<&Error>) {
        self.recorded = true;
        if error.is_some_and(|e| matches!(e, Error::Unavailable { .. })) {
            if self.trial {
                self.breaker.release_trial();
            }
            return;
        }
        self.breaker
            .on_result(self.trial, error.is_some_and(is_infrastructure_failure));
    }

    /// True when this is the half-open circuit's trial call.
    pub fn is_trial(&self) -> bool {
        self.trial
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.recorded && self.trial {
            self.breaker.release_trial();
        }
    }
}

impl CircuitBreaker {
    /// A closed breaker for `dependency` (the name in errors, logs and metrics, e.g.
    /// `"postgres"`).
    pub fn new(dependency: &'static str, config: CircuitBreakerConfig) -> Self {
        telemetry::circuit_state(dependency, CircuitState::Closed);
        Self {
            dependency,
            state: Arc::new(Mutex::new(Inner {
                state: State::Closed,
                consecutive_failures: 0,
                window: Window::new(config.window),
            })),
            config,
        }
    }

    /// The dependency's name.
    pub fn dependency(&self) -> &'static str {
        self.dependency
    }

    /// The configuration.
    pub fn config(&self) -> &CircuitBreakerConfig {
        &self.config
    }

    /// The current state. An open circuit whose cool-down has passed stays [`Open`]
    /// (reported with a zero [`retry_after`](Self::retry_after)) until a call makes the trial.
    ///
    /// [`Open`]: CircuitState::Open
    pub fn state(&self) -> CircuitState {
        self.lock().state.public()
    }

    /// True unless the circuit is closed: the dependency is (or was just) failing, and an
    /// application may serve a fallback (e.g. its last good read model) instead of calling it.
    pub fn is_open(&self) -> bool {
        self.state() != CircuitState::Closed
    }

    /// How long calls will keep failing fast: `None` when closed, the rest of the cool-down when
    /// open, the cool-down when a half-open trial is in flight (the time a failed trial adds).
    pub fn retry_after(&self) -> Option<Duration> {
        let inner = self.lock();
        match inner.state {
            State::Closed
            | State::HalfOpen {
                trial_in_flight: false,
            } => None,
            State::Open { until } => Some(until.saturating_duration_since(Instant::now())),
            State::HalfOpen {
                trial_in_flight: true,
            } => Some(self.config.cool_down),
        }
    }

    /// Asks to make one call: a [`Permit`] to report its result to, or
    /// [`Error::Unavailable`] when the circuit is open (the call must not be made).
    pub fn try_acquire(&self) -> Result<Permit, Error> {
        let mut inner = self.lock();
        let now = Instant::now();
        let trial = match inner.state {
            State::Closed => false,
            State::Open { until } if now >= until => {
                self.transition(
                    &mut inner,
                    State::HalfOpen {
                        trial_in_flight: true,
                    },
                );
                true
            }
            State::Open { until } => return Err(self.reject(until - now)),
            State::HalfOpen {
                trial_in_flight: false,
            } => {
                inner.state = State::HalfOpen {
                    trial_in_flight: true,
                };
                true
            }
            State::HalfOpen {
                trial_in_flight: true,
            } => return Err(self.reject(self.config.cool_down)),
        };
        Ok(Permit {
            breaker: self.clone(),
            trial,
            recorded: false,
        })
    }

    fn reject(&self, retry_after: Duration) -> Error {
        telemetry::rejected(self.dependency);
        Error::Unavailable {
            dependency: self.dependency,
            retry_after,
        }
    }

    /// Records a failure or success seen outside a permit (e.g. an error in the middle of a
    /// stream of results). Only counts while the circuit is closed.
    pub(crate) fn record_outcome(&self, error: Option<&Error>) {
        if error.is_some_and(|e| matches!(e, Error::Unavailable { .. })) {
            return;
        }
        self.on_result(false, error.is_some_and(is_infrastructure_failure));
    }

    fn on_result(&self, trial: bool, failure: bool) {
        let mut inner = self.lock();
        let now = Instant::now();
        match inner.state {
            State::HalfOpen { .. } if trial => {
                if failure {
                    self.open(&mut inner, now);
                } else {
                    inner.consecutive_failures = 0;
                    inner.window.reset();
                    self.transition(&mut inner, State::Closed);
                }
            }
            State::Closed => {
                inner.window.record(now, failure);
                if !failure {
                    inner.consecutive_failures = 0;
                    return;
                }
                inner.consecutive_failures += 1;
                let (calls, failures) = inner.window.totals(now);
                let rate_exceeded = calls >= self.config.minimum_calls.max(1)
                    && f64::from(failures) >= self.config.failure_rate * f64::from(calls);
                if inner.consecutive_failures >= self.config.consecutive_failures.max(1)
                    || rate_exceeded
                {
                    self.open(&mut inner, now);
                }
            }
            // Results of calls let through before the circuit opened change nothing.
            _ => {}
        }
    }

    fn open(&self, inner: &mut Inner, now: Instant) {
        inner.consecutive_failures = 0;
        inner.window.reset();
        self.transition(
            inner,
            State::Open {
                until: now + self.config.cool_down,
            },
        );
    }

    fn release_trial(&self) {
        let mut inner = self.lock();
        if let State::HalfOpen { .. } = inner.state {
            inner.state = State::HalfOpen {
                trial_in_flight: false,
            };
        }
    }

    fn transition(&self, inner: &mut Inner, to: State) {
        let from = inner.state.public();
        inner.state = to;
        telemetry::transition(self.dependency, from, to.public());
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every update leaves the state consistent before it can panic.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use crate::resilience::telemetry::testing::TestRecorder;
    use crate::{ExpectedVersion, StreamId, StreamVersion};

    const COOL_DOWN: Duration = Duration::from_secs(5);

    fn breaker(consecutive_failures: u32) -> CircuitBreaker {
        CircuitBreaker::new(
            "db",
            CircuitBreakerConfig {
                consecutive_failures,
                failure_rate: 0.5,
                minimum_calls: 10,
                window: Duration::from_secs(10),
                cool_down: COOL_DOWN,
            },
        )
    }

    fn transient() -> Result<(), Error> {
        Err(Error::transient("append", "connection refused"))
    }

    fn call(breaker: &CircuitBreaker, result: Result<(), Error>) {
        breaker
            .try_acquire()
            .expect("the circuit lets the call through")
            .record(&result);
    }

    fn unavailable_for(breaker: &CircuitBreaker) -> Duration {
        match breaker.try_acquire() {
            Err(Error::Unavailable {
                dependency,
                retry_after,
            }) => {
                assert_eq!(dependency, "db");
                retry_after
            }
            other => panic!("expected Unavailable, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn closed_opens_after_consecutive_failures_and_fails_fast() {
        let recorder = TestRecorder::default();
        let _guard = metrics::set_default_local_recorder(&recorder);
        let breaker = breaker(3);
        assert_eq!(recorder.get("factum_circuit_state{dependency=db}"), 0.0);
        call(&breaker, transient());
        call(&breaker, transient());
        call(&breaker, Ok(())); // a success resets the run
        call(&breaker, transient());
        call(&breaker, transient());
        assert_eq!(breaker.state(), CircuitState::Closed);
        call(&breaker, transient());
        assert_eq!(breaker.state(), CircuitState::Open);
        assert!(breaker.is_open());
        assert_eq!(unavailable_for(&breaker), COOL_DOWN);
        assert_eq!(breaker.retry_after(), Some(COOL_DOWN));
        assert_eq!(recorder.get("factum_circuit_state{dependency=db}"), 1.0);
        assert_eq!(
            recorder.get("factum_circuit_transitions_total{dependency=db,from=closed,to=open}"),
            1.0
        );
        assert_eq!(
            recorder.get("factum_circuit_rejected_total{dependency=db}"),
            1.0
        );
    }

    #[tokio::test(start_paused = true)]
    async fn closed_opens_on_the_failure_rate_in_the_window() {
        let breaker = breaker(100);
        // 9 calls, 5 failures: over the rate but under the minimum number of calls.
        for i in 0..9 {
            call(&breaker, if i % 2 == 0 { transient() } else { Ok(()) });
        }
        assert_eq!(breaker.state(), CircuitState::Closed);
        call(&breaker, transient());
        assert_eq!(breaker.state(), CircuitState::Open, "6 of 10 calls failed");
    }

    #[tokio::test(start_paused = true)]
    async fn failures_older_than_the_window_do_not_count() {
        let breaker = breaker(100);
        for _ in 0..8 {
            call(&breaker, transient());
        }
        tokio::time::advance(Duration::from_secs(11)).await;
        for _ in 0..9 {
            call(&breaker, Ok(()));
        }
        call(&breaker, transient());
        assert_eq!(
            breaker.state(),
            CircuitState::Closed,
            "1 failure in 10 recent calls"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn open_lets_one_trial_through_after_the_cool_down_and_a_success_closes() {
        let recorder = TestRecorder::default();
        let _guard = metrics::set_default_local_recorder(&recorder);
        let breaker = breaker(1);
        call(&breaker, transient());
        tokio::time::advance(COOL_DOWN - Duration::from_millis(1)).await;
        assert_eq!(unavailable_for(&breaker), Duration::from_millis(1));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(breaker.retry_after(), Some(Duration::ZERO));

        let trial = breaker.try_acquire().expect("the trial goes through");
        assert!(trial.is_trial());
        assert_eq!(breaker.state(), CircuitState::HalfOpen);
        assert_eq!(recorder.get("factum_circuit_state{dependency=db}"), 2.0);
        // Only one trial at a time.
        assert_eq!(unavailable_for(&breaker), COOL_DOWN);

        trial.record(&Ok(()));
        assert_eq!(breaker.state(), CircuitState::Closed);
        assert!(!breaker.is_open());
        assert_eq!(breaker.retry_after(), None);
        assert_eq!(recorder.get("factum_circuit_state{dependency=db}"), 0.0);
        for (from, to) in [
            ("closed", "open"),
            ("open", "half_open"),
            ("half_open", "closed"),
        ] {
            let key =
                format!("factum_circuit_transitions_total{{dependency=db,from={from},to={to}}}");
            assert_eq!(recorder.get(&key), 1.0, "{key}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_trial_opens_the_circuit_again_for_a_full_cool_down() {
        let recorder = TestRecorder::default();
        let _guard = metrics::set_default_local_recorder(&recorder);
        let breaker = breaker(1);
        call(&breaker, transient());
        tokio::time::advance(COOL_DOWN).await;
        call(&breaker, transient());
        assert_eq!(breaker.state(), CircuitState::Open);
        assert_eq!(unavailable_for(&breaker), COOL_DOWN);
        assert_eq!(
            recorder.get("factum_circuit_transitions_total{dependency=db,from=half_open,to=open}"),
            1.0
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_trial_lets_another_trial_through() {
        let breaker = breaker(1);
        call(&breaker, transient());
        tokio::time::advance(COOL_DOWN).await;
        drop(breaker.try_acquire().expect("trial"));
        assert_eq!(breaker.state(), CircuitState::HalfOpen);
        let second = breaker
            .try_acquire()
            .expect("a new trial after a cancelled one");
        assert!(second.is_trial());
        second.record(&Ok(()));
        assert_eq!(breaker.state(), CircuitState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn only_infrastructure_failures_count() {
        let breaker = breaker(2);
        let stream = StreamId::new("account-1").expect("valid");
        for _ in 0..10 {
            call(
                &breaker,
                Err(Error::Conflict {
                    stream: stream.clone(),
                    expected: ExpectedVersion::NoStream,
                    actual: StreamVersion::new(1),
                }),
            );
            call(&breaker, Err(Error::InvalidArgument("empty batch".into())));
            call(
                &breaker,
                Err(Error::Unavailable {
                    dependency: "other",
                    retry_after: Duration::ZERO,
                }),
            );
        }
        assert_eq!(breaker.state(), CircuitState::Closed);
        call(
            &breaker,
            Err(Error::UnknownOutcome {
                operation: "append",
                stream,
                source: "connection reset".into(),
            }),
        );
        call(&breaker, Err(Error::permanent("read", "permission denied")));
        assert_eq!(breaker.state(), CircuitState::Open);
        assert_eq!(
            breaker.try_acquire().map(|_| ()).expect_err("open").kind(),
            ErrorKind::Unavailable
        );
    }
}
