//! The retry budget: retries limited to a fraction of recent calls, plus a minimum rate.

use std::sync::{Arc, Mutex, PoisonError};

use tokio::time::Instant;

/// A token bucket shared by every operation on one dependency, so that a struggling dependency
/// sees at most a fixed fraction of extra load from retries, however many callers retry at once.
///
/// * Every call (not retry) deposits `ratio` tokens: with the default 0.2, retries add at most
///   20% to the load once the bucket is drained.
/// * Tokens also trickle in at `min_per_second`, so a service with little traffic can still
///   retry.
/// * Every retry withdraws one token; without a whole token, the retry is not made and the
///   caller gets its last error (counted in `factum_retry_give_ups_total{reason="budget"}`).
/// * The bucket holds at most `capacity` tokens, so only recent calls count.
///
/// It starts with one second's worth of the minimum rate. Clones share the same bucket.
///
/// ```
/// use factum::resilience::RetryBudget;
///
/// let budget = RetryBudget::new(0.5).with_min_per_second(0.0).with_capacity(1.0);
/// assert!(!budget.try_withdraw()); // nothing deposited yet
/// budget.deposit();
/// budget.deposit(); // two calls at ratio 0.5 pay for one retry
/// assert!(budget.try_withdraw());
/// assert!(!budget.try_withdraw());
/// ```
#[derive(Clone, Debug)]
pub struct RetryBudget {
    config: BudgetConfig,
    state: Arc<Mutex<BudgetState>>,
}

#[derive(Clone, Copy, Debug)]
struct BudgetConfig {
    ratio: f64,
    min_per_second: f64,
    capacity: f64,
}

#[derive(Debug)]
struct BudgetState {
    tokens: f64,
    refilled_at: Instant,
}

impl Default for RetryBudget {
    /// Ratio 0.2, 10 retries per second minimum, capacity 100.
    fn default() -> Self {
        Self::new(0.2)
    }
}

impl RetryBudget {
    /// A budget allowing `ratio` retries per call (clamped to 0..=1000), with the default minimum
    /// of 10 retries per second and capacity 100 tokens.
    pub fn new(ratio: f64) -> Self {
        Self::from_config(BudgetConfig {
            ratio: ratio.clamp(0.0, 1000.0),
            min_per_second: 10.0,
            capacity: 100.0,
        })
    }

    /// A budget that never refuses a retry (the retry policies alone bound retries).
    pub fn unlimited() -> Self {
        Self::from_config(BudgetConfig {
            ratio: 0.0,
            min_per_second: f64::INFINITY,
            capacity: f64::INFINITY,
        })
    }

    /// Sets the minimum rate of retries per second, whatever the traffic. Resets the bucket.
    #[must_use]
    pub fn with_min_per_second(self, min_per_second: f64) -> Self {
        Self::from_config(BudgetConfig {
            min_per_second: min_per_second.max(0.0),
            ..self.config
        })
    }

    /// Sets the most tokens the bucket holds (how much credit quiet times build up). Resets the
    /// bucket.
    #[must_use]
    pub fn with_capacity(self, capacity: f64) -> Self {
        Self::from_config(BudgetConfig {
            capacity: capacity.max(0.0),
            ..self.config
        })
    }

    fn from_config(config: BudgetConfig) -> Self {
        Self {
            state: Arc::new(Mutex::new(BudgetState {
                tokens: config.min_per_second.min(config.capacity),
                refilled_at: Instant::now(),
            })),
            config,
        }
    }

    /// Records a call (not a retry): earns `ratio` tokens.
    pub fn deposit(&self) {
        let mut state = self.lock();
        self.refill(&mut state);
        state.tokens = (state.tokens + self.config.ratio).min(self.config.capacity);
    }

    /// Takes one token for a retry; false when the budget is exhausted.
    pub fn try_withdraw(&self) -> bool {
        let mut state = self.lock();
        self.refill(&mut state);
        if state.tokens >= 1.0 {
            state.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// The tokens available now: how many retries may be made before the budget refuses.
    pub fn available(&self) -> f64 {
        let mut state = self.lock();
        self.refill(&mut state);
        state.tokens
    }

    fn refill(&self, state: &mut BudgetState) {
        let now = Instant::now();
        let earned =
            now.duration_since(state.refilled_at).as_secs_f64() * self.config.min_per_second;
        if earned > 0.0 {
            state.tokens = (state.tokens + earned).min(self.config.capacity);
        }
        state.refilled_at = now;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BudgetState> {
        // The state is two numbers, updated together under the lock: never half-written.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retries_are_limited_to_a_fraction_of_calls() {
        let budget = RetryBudget::new(0.25)
            .with_min_per_second(0.0)
            .with_capacity(10.0);
        for _ in 0..8 {
            budget.deposit();
        }
        assert!((budget.available() - 2.0).abs() < 1e-9);
        assert!(budget.try_withdraw());
        assert!(budget.try_withdraw());
        assert!(!budget.try_withdraw(), "8 calls at 0.25 pay for 2 retries");
        // A clone shares the bucket.
        let clone = budget.clone();
        for _ in 0..4 {
            clone.deposit();
        }
        assert!(budget.try_withdraw());
    }

    #[tokio::test(start_paused = true)]
    async fn the_minimum_rate_refills_over_time_up_to_capacity() {
        let budget = RetryBudget::new(0.0)
            .with_min_per_second(2.0)
            .with_capacity(3.0);
        assert!(budget.try_withdraw());
        assert!(budget.try_withdraw());
        assert!(!budget.try_withdraw(), "starts with one second's worth");
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(
            budget.try_withdraw(),
            "2 per second: one token after 500 ms"
        );
        assert!(!budget.try_withdraw());
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(
            (budget.available() - 3.0).abs() < 1e-9,
            "capped at capacity"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn unlimited_never_refuses() {
        let budget = RetryBudget::unlimited();
        assert!((0..10_000).all(|_| budget.try_withdraw()));
    }
}
