//! The clock sagas read time from: the system's, or one a test moves by hand.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};

/// Where a saga runtime reads the time: when a timeout is due, what [`Decisions::now`] says.
///
/// [`SystemClock`] in production; [`TestClock`] in tests, which only moves when told to, so a
/// test of a 15-minute timeout takes no 15 minutes and no sleep.
///
/// [`Decisions::now`]: super::Decisions::now
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// The current time.
    fn now(&self) -> DateTime<Utc>;
}

/// The system's clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that stands still until moved; clones share the same time.
///
/// ```
/// use std::time::Duration;
/// use factum::saga::{Clock, TestClock};
///
/// let clock = TestClock::new("2026-01-01T12:00:00Z".parse().unwrap());
/// let copy = clock.clone();
/// clock.advance(Duration::from_secs(15 * 60));
/// assert_eq!(copy.now().to_rfc3339(), "2026-01-01T12:15:00+00:00");
/// ```
#[derive(Clone, Debug)]
pub struct TestClock {
    now: Arc<Mutex<DateTime<Utc>>>,
}

impl Default for TestClock {
    /// A clock at the system's current time (then standing still).
    fn default() -> Self {
        Self::new(Utc::now())
    }
}

impl TestClock {
    /// A clock standing at `now`.
    pub fn new(now: DateTime<Utc>) -> Self {
        Self {
            now: Arc::new(Mutex::new(now)),
        }
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let by = chrono::Duration::from_std(by).unwrap_or(chrono::Duration::MAX);
        let mut now = self.now.lock().unwrap_or_else(PoisonError::into_inner);
        *now = now.checked_add_signed(by).unwrap_or(*now);
    }

    /// Sets the clock to `now` (forward or back).
    pub fn set(&self, now: DateTime<Utc>) {
        *self.now.lock().unwrap_or_else(PoisonError::into_inner) = now;
    }
}

impl Clock for TestClock {
    fn now(&self) -> DateTime<Utc> {
        *self.now.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
