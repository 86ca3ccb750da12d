//! Resilience: retry with backoff and jitter under a budget, and a circuit breaker.
//!
//! Failures are classified once, by the backend, into an [`ErrorKind`]; this module acts on the
//! class and never looks inside the error:
//!
//! | kind | what happens |
//! | --- | --- |
//! | [`Transient`](ErrorKind::Transient) | retried with backoff, within the policy and the retry budget |
//! | [`UnknownOutcome`](ErrorKind::UnknownOutcome) | idempotent operations (appends, snapshot saves) are re-run unchanged, which settles the outcome; others return it |
//! | [`Unavailable`](ErrorKind::Unavailable) (an open circuit) | returned at once: fail fast, don't retry |
//! | [`Conflict`](ErrorKind::Conflict), [`Permanent`](ErrorKind::Permanent), [`InvalidArgument`](ErrorKind::InvalidArgument), [`BadData`](ErrorKind::BadData) | returned at once |
//!
//! The pieces, one [`Resilience`] per dependency:
//! * [`RetryPolicy`] per [`Operation`] ([`RetryPolicies`]): exponential backoff with full jitter
//!   (delays from [`backon`]), max attempts, max elapsed time;
//! * [`RetryBudget`]: retries limited to a fraction of recent calls plus a minimum rate, shared by
//!   every operation on the dependency, so a struggling database gets no retry storm;
//! * [`CircuitBreaker`]: after repeated infrastructure failures, calls fail fast with
//!   [`Error::Unavailable`] naming the dependency and when the next trial is;
//! * [`Resilient`]: wraps any [`EventStore`](crate::EventStore) /
//!   [`SnapshotStore`](crate::SnapshotStore) and applies all of the above to every call.
//!
//! ```
//! use factum::resilience::{Resilient, Resilience, RetryPolicy, Operation};
//! use factum::InMemoryStore;
//!
//! let resilience = Resilience::new("postgres")
//!     .with_policy(Operation::Append, RetryPolicy::new().with_max_attempts(6));
//! let store = Resilient::with_resilience(InMemoryStore::new(), resilience);
//! // Use `store` wherever an EventStore goes; watch it for fallbacks:
//! assert!(!store.resilience().health().circuit_open);
//! ```
//!
//! Every retry, give-up and breaker transition emits a `tracing` event and a [`metrics`]
//! counter or gauge; see [`telemetry`] for the names. The book chapter "Failure handling"
//! describes all of it for users.

use std::future::Future;
use std::time::Duration;

use backon::Retryable;
use tokio::time::Instant;

use crate::error::{Error, ErrorKind};
use crate::ids::StreamId;

mod breaker;
mod budget;
mod policy;
mod store;
pub mod telemetry;

pub use breaker::{
    CircuitBreaker, CircuitBreakerConfig, CircuitState, Permit, is_infrastructure_failure,
};
pub use budget::RetryBudget;
pub use policy::{FullJitter, RetryPolicies, RetryPolicy};
pub use store::Resilient;
pub use telemetry::describe_metrics;

/// The book chapter's code, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../../docs/src/failure-handling.md")]
mod failure_handling_chapter {}

/// A kind of operation on a dependency; each has its own [`RetryPolicy`] and is a label value in
/// metrics.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[non_exhaustive]
pub enum Operation {
    /// Appending events.
    Append,
    /// Reading a stream or the global log.
    Read,
    /// Saving or loading a snapshot.
    Snapshot,
    /// A consumer's bookkeeping: saving and loading its checkpoint, parking and listing its dead
    /// letters. (Its poll of the global log is a [`Read`](Self::Read).)
    SubscriptionPoll,
    /// Publishing to a message broker.
    BrokerPublish,
}

impl Operation {
    /// The label value: `append`, `read`, `snapshot`, `subscription_poll`, `broker_publish`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Operation::Append => "append",
            Operation::Read => "read",
            Operation::Snapshot => "snapshot",
            Operation::SubscriptionPoll => "subscription_poll",
            Operation::BrokerPublish => "broker_publish",
        }
    }
}

/// A snapshot of a dependency's health, for deciding on a fallback (e.g. serving the last good
/// read model while the event store is down) or for a health endpoint.
#[derive(Clone, PartialEq, Debug)]
#[non_exhaustive]
pub struct Health {
    /// The dependency's name.
    pub dependency: &'static str,
    /// The circuit breaker's state.
    pub circuit: CircuitState,
    /// True unless the circuit is closed.
    pub circuit_open: bool,
    /// How long calls will keep failing fast, if they do.
    pub retry_after: Option<Duration>,
    /// Retries the budget allows right now.
    pub retry_budget: f64,
}

/// Retry policies, a retry budget and a circuit breaker for one dependency, applied around any
/// call with [`run`](Self::run) or [`run_idempotent`](Self::run_idempotent).
///
/// Clones share the budget and the breaker: give every component that talks to the same
/// dependency (the event store, a subscription's poller, a relay) a clone, so that they fail fast
/// together and share one retry budget.
///
/// ```
/// use std::sync::atomic::{AtomicU32, Ordering};
/// use factum::resilience::{Operation, Resilience};
/// use factum::Error;
///
/// # tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap().block_on(async {
/// let broker = Resilience::new("nats");
/// let calls = AtomicU32::new(0);
/// let published = broker
///     .run_idempotent(Operation::BrokerPublish, || async {
///         // Publishing with the event id as the message id is idempotent (broker dedupe).
///         if calls.fetch_add(1, Ordering::SeqCst) == 0 {
///             Err(Error::transient("publish", "broker restarting"))
///         } else {
///             Ok("ack")
///         }
///     })
///     .await?;
/// assert_eq!(published, "ack");
/// assert_eq!(calls.load(Ordering::SeqCst), 2);
/// # Ok::<(), Error>(())
/// # }).unwrap();
/// ```
#[derive(Clone, Debug)]
pub struct Resilience {
    dependency: &'static str,
    policies: RetryPolicies,
    budget: RetryBudget,
    breaker: CircuitBreaker,
}

impl Resilience {
    /// The defaults for `dependency` (its name in errors, logs and metrics):
    /// [`RetryPolicies::default`], [`RetryBudget::default`], [`CircuitBreakerConfig::default`].
    pub fn new(dependency: &'static str) -> Self {
        Self {
            dependency,
            policies: RetryPolicies::default(),
            budget: RetryBudget::default(),
            breaker: CircuitBreaker::new(dependency, CircuitBreakerConfig::default()),
        }
    }

    /// Replaces every retry policy.
    #[must_use]
    pub fn with_policies(mut self, policies: RetryPolicies) -> Self {
        self.policies = policies;
        self
    }

    /// Replaces one operation's retry policy.
    #[must_use]
    pub fn with_policy(mut self, operation: Operation, policy: RetryPolicy) -> Self {
        self.policies = self.policies.with(operation, policy);
        self
    }

    /// Replaces the retry budget (pass a clone of another's to share it).
    #[must_use]
    pub fn with_budget(mut self, budget: RetryBudget) -> Self {
        self.budget = budget;
        self
    }

    /// Replaces the circuit breaker by a new, closed one with this configuration.
    #[must_use]
    pub fn with_breaker_config(mut self, config: CircuitBreakerConfig) -> Self {
        self.breaker = CircuitBreaker::new(self.dependency, config);
        self
    }

    /// The dependency's name.
    pub fn dependency(&self) -> &'static str {
        self.dependency
    }

    /// The retry policies.
    pub fn policies(&self) -> &RetryPolicies {
        &self.policies
    }

    /// The retry budget.
    pub fn budget(&self) -> &RetryBudget {
        &self.budget
    }

    /// The circuit breaker.
    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }

    /// True unless the circuit is closed: a hook for fallbacks.
    pub fn is_open(&self) -> bool {
        self.breaker.is_open()
    }

    /// The dependency's health now.
    pub fn health(&self) -> Health {
        let circuit = self.breaker.state();
        Health {
            dependency: self.dependency,
            circuit,
            circuit_open: circuit != CircuitState::Closed,
            retry_after: self.breaker.retry_after(),
            retry_budget: self.budget.available(),
        }
    }

    /// Runs `call` through the circuit breaker, retrying [transient](ErrorKind::Transient)
    /// failures with `operation`'s policy under the retry budget. Any other error, including
    /// an unknown outcome, is returned at once: use this for operations that are not safe to
    /// repeat. When retries run out, the last error is returned.
    pub async fn run<T, F, Fut>(&self, operation: Operation, call: F) -> Result<T, Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        self.execute(operation, false, call).await
    }

    /// Like [`run`](Self::run), but also re-runs `call` after an
    /// [unknown outcome](ErrorKind::UnknownOutcome): for operations that are safe to repeat
    /// (appending the same event ids, publishing with a dedupe id), where repeating *is* the
    /// reconcile step.
    ///
    /// If an attempt had an unknown outcome and no later attempt succeeds, the error is an
    /// [`Error::UnknownOutcome`] (with the last error as its source), never a transient or
    /// unavailable error that would suggest nothing happened.
    pub async fn run_idempotent<T, F, Fut>(&self, operation: Operation, call: F) -> Result<T, Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        self.execute(operation, true, call).await
    }

    async fn execute<T, F, Fut>(
        &self,
        operation: Operation,
        idempotent: bool,
        mut call: F,
    ) -> Result<T, Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        self.budget.deposit();
        let mut gate = RetryGate::new(self, operation);
        // Where an unknown outcome happened: what to report if nothing settles it.
        let mut unknown: Option<(&'static str, StreamId)> = None;
        let result = (|| {
            // The breaker is asked before `call` makes the call's future: an open circuit
            // refuses it without doing any of its work.
            let attempt = self.breaker.try_acquire().map(|permit| (permit, call()));
            async move {
                let (permit, call) = attempt?;
                let result = call.await;
                permit.record(&result);
                result
            }
        })
        .retry(self.policies.get(operation).backoff())
        .sleep(tokio::time::sleep)
        .when(|e| {
            if let Error::UnknownOutcome {
                operation, stream, ..
            } = e
            {
                unknown = Some((operation, stream.clone()));
            }
            match e.kind() {
                ErrorKind::Transient => true,
                ErrorKind::UnknownOutcome => idempotent,
                _ => false,
            }
        })
        .adjust(|e, next| gate.allow(e, next))
        .await;
        let error = match result {
            Ok(value) => return Ok(value),
            Err(error) => error,
        };
        if matches!(error, Error::Unavailable { .. }) && gate.retries > 0 {
            telemetry::give_up(
                operation,
                self.dependency,
                "circuit_open",
                gate.retries,
                &error,
            );
        }
        match unknown {
            Some((operation, stream))
                if is_infrastructure_failure(&error)
                    || matches!(error, Error::Unavailable { .. }) =>
            {
                if matches!(error, Error::UnknownOutcome { .. }) {
                    Err(error)
                } else {
                    Err(Error::UnknownOutcome {
                        operation,
                        stream,
                        source: Box::new(Unsettled::from(error)),
                    })
                }
            }
            _ => Err(error),
        }
    }
}

/// The source of an [`Error::UnknownOutcome`] that retries did not settle: what the last attempt
/// ran into, worded for that place. The last attempt's own error would say "nothing was stored"
/// (true of that attempt alone), contradicting the unknown outcome of the earlier one.
#[derive(Debug, thiserror::Error)]
#[error("the retries that would have settled it failed too; the last one {last}")]
struct Unsettled {
    /// What the last attempt ran into, e.g. "failed with a transient backend error".
    last: String,
    /// The backend's error of the last attempt, if any.
    #[source]
    source: Option<crate::BoxError>,
}

impl From<Error> for Unsettled {
    fn from(error: Error) -> Self {
        match error {
            Error::Transient { source, .. } => Self {
                last: "failed with a transient backend error".to_owned(),
                source: Some(source),
            },
            Error::Permanent { source, .. } => Self {
                last: "failed with a permanent backend error".to_owned(),
                source: Some(source),
            },
            Error::Unavailable {
                dependency,
                retry_after,
            } => Self {
                last: format!(
                    "was refused: {dependency} is unavailable (circuit open, next trial in {retry_after:?})"
                ),
                source: None,
            },
            other => Self {
                last: format!("failed ({} error)", other.kind()),
                source: Some(Box::new(other)),
            },
        }
    }
}

/// Decides whether a failed attempt is retried: the backoff's next delay, the elapsed-time limit,
/// the retry budget. Emits the retry and give-up events.
pub(crate) struct RetryGate<'r> {
    resilience: &'r Resilience,
    operation: Operation,
    max_elapsed: Option<Duration>,
    started: Instant,
    retries: u32,
}

impl<'r> RetryGate<'r> {
    pub(crate) fn new(resilience: &'r Resilience, operation: Operation) -> Self {
        Self {
            resilience,
            operation,
            max_elapsed: resilience.policies.get(operation).max_elapsed(),
            started: Instant::now(),
            retries: 0,
        }
    }

    /// The delay before retrying after `error`, given the backoff's `next` delay; `None` to give
    /// up (and return `error`).
    pub(crate) fn allow(&mut self, error: &Error, next: Option<Duration>) -> Option<Duration> {
        let dependency = self.resilience.dependency;
        let Some(delay) = next else {
            telemetry::give_up(
                self.operation,
                dependency,
                "max_attempts",
                self.retries,
                error,
            );
            return None;
        };
        if self
            .max_elapsed
            .is_some_and(|max| self.started.elapsed() + delay > max)
        {
            telemetry::give_up(
                self.operation,
                dependency,
                "max_elapsed",
                self.retries,
                error,
            );
            return None;
        }
        if !self.resilience.budget.try_withdraw() {
            telemetry::give_up(self.operation, dependency, "budget", self.retries, error);
            return None;
        }
        self.retries += 1;
        telemetry::retry(self.operation, dependency, self.retries, delay, error);
        Some(delay)
    }
}

#[cfg(test)]
mod tests;
