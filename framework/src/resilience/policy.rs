//! Retry policies: how often and how patiently each kind of operation is retried.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

use super::Operation;

/// How one kind of operation is retried: exponential backoff with full jitter, bounded by a
/// number of attempts and by the time spent.
///
/// The delay before retry *n* is drawn uniformly from `[0, min(max_delay, initial_delay ×
/// factor^(n-1))]` ("full jitter"), so clients that failed together do not retry together. The
/// exponential ceilings come from [`backon`]'s `ExponentialBuilder`; the jitter is applied on top
/// because backon's own jitter adds up to one extra delay (`[d, 2d)`) instead of spreading over
/// `[0, d]`.
///
/// ```
/// use std::time::Duration;
/// use factum::resilience::RetryPolicy;
///
/// let policy = RetryPolicy::new()
///     .with_max_attempts(4)
///     .with_initial_delay(Duration::from_millis(125))
///     .with_max_delay(Duration::from_millis(400));
/// // Three retries after the first attempt, each waiting at most 125, 250, then 400 ms.
/// let ceilings: Vec<_> = policy.ceilings().collect();
/// assert_eq!(ceilings, [125, 250, 400].map(Duration::from_millis));
/// for (delay, ceiling) in policy.backoff().zip(ceilings) {
///     assert!(delay <= ceiling);
/// }
/// ```
#[derive(Clone, Copy, PartialEq, Debug)]
pub struct RetryPolicy {
    max_attempts: u32,
    initial_delay: Duration,
    max_delay: Duration,
    factor: f32,
    max_elapsed: Option<Duration>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self::new()
    }
}

impl RetryPolicy {
    /// 4 attempts, delays from 50 ms doubling up to 2 s, at most 10 s in all.
    pub const fn new() -> Self {
        Self {
            max_attempts: 4,
            initial_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(2),
            factor: 2.0,
            max_elapsed: Some(Duration::from_secs(10)),
        }
    }

    /// One attempt, no retry.
    pub const fn no_retry() -> Self {
        Self::new().with_max_attempts(1)
    }

    /// The number of attempts including the first (at least 1; 0 is taken as 1).
    #[must_use]
    pub const fn with_max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = if attempts == 0 { 1 } else { attempts };
        self
    }

    /// The ceiling of the first retry's delay.
    #[must_use]
    pub const fn with_initial_delay(mut self, delay: Duration) -> Self {
        self.initial_delay = delay;
        self
    }

    /// The largest ceiling any delay can have.
    #[must_use]
    pub const fn with_max_delay(mut self, delay: Duration) -> Self {
        self.max_delay = delay;
        self
    }

    /// How much the ceiling grows per retry (2.0 doubles it; values below 1.0 are taken as 1.0).
    #[must_use]
    pub const fn with_factor(mut self, factor: f32) -> Self {
        self.factor = if factor < 1.0 { 1.0 } else { factor };
        self
    }

    /// The longest time from the first attempt after which no retry starts (`None`: no limit
    /// but the attempts). A retry whose delay would end past it is not made.
    #[must_use]
    pub const fn with_max_elapsed(mut self, max_elapsed: Option<Duration>) -> Self {
        self.max_elapsed = max_elapsed;
        self
    }

    /// The number of attempts including the first.
    pub const fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The ceiling of the first retry's delay.
    pub const fn initial_delay(&self) -> Duration {
        self.initial_delay
    }

    /// The largest delay ceiling.
    pub const fn max_delay(&self) -> Duration {
        self.max_delay
    }

    /// The growth factor of the ceilings.
    pub const fn factor(&self) -> f32 {
        self.factor
    }

    /// The time limit from the first attempt, if any.
    pub const fn max_elapsed(&self) -> Option<Duration> {
        self.max_elapsed
    }

    /// The delay ceilings before each retry, without jitter: `max_attempts - 1` of them.
    pub fn ceilings(&self) -> ExponentialBackoff {
        ExponentialBuilder::new()
            .with_min_delay(self.initial_delay)
            .with_max_delay(self.max_delay)
            .with_factor(self.factor)
            .with_max_times(self.max_attempts.saturating_sub(1) as usize)
            .build()
    }

    /// The jittered delays before each retry: a [`backon::Backoff`], `max_attempts - 1` long.
    pub fn backoff(&self) -> FullJitter {
        FullJitter {
            ceilings: self.ceilings(),
            rng: fastrand::Rng::new(),
        }
    }
}

/// A [`backon::Backoff`] whose delays are drawn uniformly from `[0, ceiling]`, the ceilings
/// coming from an inner exponential backoff. Made by [`RetryPolicy::backoff`].
#[derive(Debug)]
pub struct FullJitter {
    ceilings: ExponentialBackoff,
    rng: fastrand::Rng,
}

impl Iterator for FullJitter {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let ceiling = self.ceilings.next()?;
        Some(ceiling.mul_f64(self.rng.f64()))
    }
}

/// A [`RetryPolicy`] per kind of [`Operation`].
///
/// ```
/// use std::time::Duration;
/// use factum::resilience::{Operation, RetryPolicies, RetryPolicy};
///
/// let policies = RetryPolicies::default()
///     .with(Operation::Append, RetryPolicy::new().with_max_attempts(8))
///     .with(Operation::Read, RetryPolicy::no_retry());
/// assert_eq!(policies.get(Operation::Append).max_attempts(), 8);
/// assert_eq!(policies.get(Operation::Read).max_attempts(), 1);
/// ```
#[derive(Clone, PartialEq, Debug)]
pub struct RetryPolicies {
    append: RetryPolicy,
    read: RetryPolicy,
    snapshot: RetryPolicy,
    subscription_poll: RetryPolicy,
    broker_publish: RetryPolicy,
}

impl Default for RetryPolicies {
    /// * append: 5 attempts, 50 ms to 2 s, 10 s in all;
    /// * read and snapshot: 4 attempts, 50 ms to 2 s, 10 s in all;
    /// * subscription poll (a consumer's checkpoints and dead letters): 3 attempts, 100 ms to
    ///   1 s, 5 s in all (the consumer loop itself goes on);
    /// * broker publish: 6 attempts, 100 ms to 5 s, 30 s in all.
    fn default() -> Self {
        let base = RetryPolicy::new();
        Self {
            append: base.with_max_attempts(5),
            read: base,
            snapshot: base,
            subscription_poll: base
                .with_max_attempts(3)
                .with_initial_delay(Duration::from_millis(100))
                .with_max_delay(Duration::from_secs(1))
                .with_max_elapsed(Some(Duration::from_secs(5))),
            broker_publish: base
                .with_max_attempts(6)
                .with_initial_delay(Duration::from_millis(100))
                .with_max_delay(Duration::from_secs(5))
                .with_max_elapsed(Some(Duration::from_secs(30))),
        }
    }
}

impl RetryPolicies {
    /// The same policy for every operation.
    pub fn uniform(policy: RetryPolicy) -> Self {
        Self {
            append: policy,
            read: policy,
            snapshot: policy,
            subscription_poll: policy,
            broker_publish: policy,
        }
    }

    /// Replaces one operation's policy.
    #[must_use]
    pub fn with(mut self, operation: Operation, policy: RetryPolicy) -> Self {
        *self.slot(operation) = policy;
        self
    }

    /// The policy of an operation.
    pub fn get(&self, operation: Operation) -> &RetryPolicy {
        match operation {
            Operation::Append => &self.append,
            Operation::Read => &self.read,
            Operation::Snapshot => &self.snapshot,
            Operation::SubscriptionPoll => &self.subscription_poll,
            Operation::BrokerPublish => &self.broker_publish,
        }
    }

    fn slot(&mut self, operation: Operation) -> &mut RetryPolicy {
        match operation {
            Operation::Append => &mut self.append,
            Operation::Read => &mut self.read,
            Operation::Snapshot => &mut self.snapshot,
            Operation::SubscriptionPoll => &mut self.subscription_poll,
            Operation::BrokerPublish => &mut self.broker_publish,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn ceilings_grow_exponentially_up_to_the_cap_and_stop_at_max_attempts() {
        let policy = RetryPolicy::new()
            .with_max_attempts(7)
            .with_initial_delay(ms(10))
            .with_max_delay(ms(100))
            .with_factor(3.0);
        let ceilings: Vec<Duration> = policy.ceilings().collect();
        let expected = [ms(10), ms(30), ms(90), ms(100), ms(100), ms(100)];
        assert_eq!(ceilings.len(), expected.len());
        for (got, want) in ceilings.iter().zip(expected) {
            // backon computes in f32 seconds: equal to the microsecond.
            assert!(
                got.abs_diff(want) < Duration::from_micros(1),
                "{got:?} vs {want:?}"
            );
        }
        assert_eq!(policy.backoff().count(), 6);
    }

    #[test]
    fn no_retry_and_zero_attempts_yield_no_delay() {
        assert_eq!(RetryPolicy::no_retry().backoff().next(), None);
        let zero = RetryPolicy::new().with_max_attempts(0);
        assert_eq!(zero.max_attempts(), 1);
        assert_eq!(zero.backoff().next(), None);
    }

    #[test]
    fn full_jitter_spreads_each_delay_over_zero_to_its_ceiling() {
        let policy = RetryPolicy::new()
            .with_max_attempts(5)
            .with_initial_delay(ms(100))
            .with_max_delay(ms(400));
        let ceilings: Vec<Duration> = policy.ceilings().collect();
        let samples: Vec<Vec<Duration>> = (0..2000).map(|_| policy.backoff().collect()).collect();
        for (i, &ceiling) in ceilings.iter().enumerate() {
            let at_i: Vec<Duration> = samples.iter().map(|s| s[i]).collect();
            assert!(
                at_i.iter().all(|&d| d <= ceiling),
                "retry {i} above {ceiling:?}"
            );
            // Full jitter, not "ceiling plus jitter": both ends of the range are reached.
            let min = at_i.iter().min().copied().unwrap_or_default();
            let max = at_i.iter().max().copied().unwrap_or_default();
            assert!(min < ceiling / 20, "retry {i}: smallest delay {min:?}");
            assert!(max > ceiling * 19 / 20, "retry {i}: largest delay {max:?}");
            let mean = at_i.iter().sum::<Duration>() / at_i.len() as u32;
            assert!(
                mean > ceiling * 4 / 10 && mean < ceiling * 6 / 10,
                "retry {i}: mean {mean:?} of ceiling {ceiling:?}"
            );
        }
    }

    #[test]
    fn policies_are_per_operation() {
        let policies = RetryPolicies::uniform(RetryPolicy::no_retry())
            .with(Operation::Append, RetryPolicy::new());
        assert_eq!(policies.get(Operation::Append), &RetryPolicy::new());
        for op in [
            Operation::Read,
            Operation::Snapshot,
            Operation::SubscriptionPoll,
            Operation::BrokerPublish,
        ] {
            assert_eq!(policies.get(op).max_attempts(), 1);
        }
    }
}
