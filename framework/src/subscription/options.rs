//! The one set of options every consumer of the log takes.

use std::time::Duration;

use crate::store::EventFilter;

use super::{KnownEvents, StartFrom};

/// How a consumer of the log runs: where it starts, what it reads, in which batches, how it
/// polls, retries and parks. Every consumer ([`Subscription`](super::Subscription), the
/// PostgreSQL projection runner and its rebuild) takes these, with the same defaults and the same
/// meaning; their builder methods are shortcuts to them.
///
/// ```
/// use std::time::Duration;
/// use factum::subscription::{ConsumerOptions, StartFrom};
///
/// let options = ConsumerOptions::default()
///     .start_from(StartFrom::Beginning)
///     .batch_size(100)
///     .handler_retries(5, Duration::from_millis(50))
///     .park_failures();
/// assert_eq!(options.batch(), 100);
/// ```
#[derive(Clone, Debug)]
pub struct ConsumerOptions {
    pub(crate) start: StartFrom,
    pub(crate) filter: EventFilter,
    pub(crate) batch_size: usize,
    pub(crate) idle_min: Duration,
    pub(crate) idle_max: Duration,
    pub(crate) standby_poll: Duration,
    pub(crate) handler_attempts: u32,
    pub(crate) handler_backoff: Duration,
    pub(crate) track_head: bool,
    pub(crate) park: bool,
    pub(crate) known: Option<KnownEvents>,
}

impl Default for ConsumerOptions {
    /// Every event, from the checkpoint, batches of 500, idle polling from 10 ms backing off to
    /// 1 s, a standby instance trying the lease every second, 3 handler attempts 100 ms apart,
    /// the head tracked, stop on failure.
    fn default() -> Self {
        Self {
            start: StartFrom::Checkpoint,
            filter: EventFilter::all(),
            batch_size: 500,
            idle_min: Duration::from_millis(10),
            idle_max: Duration::from_secs(1),
            standby_poll: Duration::from_secs(1),
            handler_attempts: 3,
            handler_backoff: Duration::from_millis(100),
            track_head: true,
            park: false,
            known: None,
        }
    }
}

impl ConsumerOptions {
    /// Where to start (default: [`StartFrom::Checkpoint`]). [`StartFrom::Beginning`],
    /// [`StartFrom::After`] and [`StartFrom::Time`] move the stored checkpoint when the consumer starts;
    /// [`StartFrom::Now`] does so only when the consumer has no checkpoint yet (an existing one
    /// is kept). Once stored, later starts of the same consumer value (after a lost lease or a
    /// store failure) resume from the checkpoint.
    #[must_use]
    pub fn start_from(mut self, start: StartFrom) -> Self {
        self.start = start;
        self
    }

    /// Only events passing `filter` are read (filtered at the source). Narrows what the consumer
    /// already reads ([`EventFilter::and`]): a projection's consumer keeps reading only its own
    /// event types.
    #[must_use]
    pub fn filter(mut self, filter: EventFilter) -> Self {
        self.filter = self.filter.and(filter);
        self
    }

    /// Events read per batch, and per unit of work (minimum 1); the checkpoint moves after each.
    #[must_use]
    pub fn batch_size(mut self, size: usize) -> Self {
        self.batch_size = size.max(1);
        self
    }

    /// Polling delay while the log is quiet: starts at `min`, doubles up to `max`, and drops back
    /// to `min` as soon as an event arrives.
    #[must_use]
    pub fn idle_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.idle_min = min;
        self.idle_max = max.max(min);
        self
    }

    /// How often an instance in standby tries to take the lease over.
    #[must_use]
    pub fn standby_poll(mut self, every: Duration) -> Self {
        self.standby_poll = every;
        self
    }

    /// How many times a failing event is handed to the handler (minimum 1), and the pause between
    /// attempts.
    #[must_use]
    pub fn handler_retries(mut self, attempts: u32, backoff: Duration) -> Self {
        self.handler_attempts = attempts.max(1);
        self.handler_backoff = backoff;
        self
    }

    /// Whether to look the head of the log up ([`EventStore::head`](crate::EventStore::head))
    /// each time the consumer falls behind (reads a full batch after being caught up), so
    /// [`SubscriptionStatus::head`](super::SubscriptionStatus::head) and
    /// [`lag_events`](super::SubscriptionStatus::lag_events) are known while it catches up (on
    /// by default; one lookup per fall behind, none while following live). Without it the head
    /// is only learnt from the events handled; the lag in time is reported either way.
    #[must_use]
    pub fn track_head(mut self, on: bool) -> Self {
        self.track_head = on;
        self
    }

    /// Parks events the handler keeps failing on in the dead-letter queue (in the unit of work
    /// that moves the checkpoint past them) and goes on, instead of stopping.
    #[must_use]
    pub fn park_failures(mut self) -> Self {
        self.park = true;
        self
    }

    /// Reads the categories of `known` whole at the source and decides by type in the consumer:
    /// the types of the [filter](Self::filter) go to the handler, other registered types are
    /// passed over, and a type nothing registers stops the consumer (or is parked) like an
    /// undecodable event, instead of being hidden by a filter on types. See [`KnownEvents`].
    #[must_use]
    pub fn known_events(mut self, known: KnownEvents) -> Self {
        self.known = Some(known);
        self
    }

    /// Stops on events the handler keeps failing on (the default), undoing
    /// [`park_failures`](Self::park_failures).
    #[must_use]
    pub fn stop_on_failures(mut self) -> Self {
        self.park = false;
        self
    }

    /// The start mode.
    pub fn start(&self) -> StartFrom {
        self.start
    }

    /// The source filter.
    pub fn event_filter(&self) -> &EventFilter {
        &self.filter
    }

    /// The batch size.
    pub fn batch(&self) -> usize {
        self.batch_size
    }

    /// Whether failing events are parked.
    pub fn parks_failures(&self) -> bool {
        self.park
    }
}
