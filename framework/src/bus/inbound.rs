//! Inbound consumers: events from other services, handled once each through an inbox.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::{BoxError, Error};
use crate::ids::EventId;
use crate::subscription::{BatchHandler, RETRY_MAX, RETRY_MIN, retries_after};

use super::{Bus, BusConsumer, BusMessage, ConsumerConfig, Delivery, MessageDecodeError};

/// A message an inbound consumer could not handle: it did not decode, or its handler kept
/// failing. Kept in the receiving service's database with everything needed to try it again.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ParkedMessage {
    /// Its id in the dead-letter queue (set by the inbox when parked).
    pub id: u64,
    /// The consumer that parked it.
    pub consumer: String,
    /// The subject it arrived on.
    pub subject: String,
    /// Its message id (the publishing service's event id), if it had one.
    pub message_id: Option<String>,
    /// Its headers, as received.
    pub headers: Vec<(String, String)>,
    /// Its body, as received.
    pub body: Vec<u8>,
    /// Why it was parked, rendered with its causes.
    pub error: String,
    /// How many times the handler was tried (0 when it did not decode).
    pub attempts: u32,
    /// When it was parked.
    pub parked_at: DateTime<Utc>,
}

impl ParkedMessage {
    /// A parked message from its parts; `id` is assigned when the inbox parks it.
    pub fn new(
        consumer: impl Into<String>,
        delivery: &Delivery,
        error: String,
        attempts: u32,
    ) -> Self {
        Self {
            id: 0,
            consumer: consumer.into(),
            subject: delivery.subject.clone(),
            message_id: delivery.message_id().map(str::to_owned),
            headers: delivery.headers.clone(),
            body: delivery.body.clone(),
            error,
            attempts,
            parked_at: Utc::now(),
        }
    }

    /// A parked message as read back from storage.
    #[allow(clippy::too_many_arguments)]
    pub fn stored(
        id: u64,
        consumer: String,
        subject: String,
        message_id: Option<String>,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        error: String,
        attempts: u32,
        parked_at: DateTime<Utc>,
    ) -> Self {
        Self {
            id,
            consumer,
            subject,
            message_id,
            headers,
            body,
            error,
            attempts,
            parked_at,
        }
    }

    /// Decodes the message again (e.g. after the code that reads it was fixed).
    pub fn decode(&self) -> Result<BusMessage, MessageDecodeError> {
        BusMessage::decode(&self.subject, &self.headers, &self.body)
    }
}

/// The receiving service's inbox: units of work in which an inbound message's event id is
/// recorded together with the handler's effects, so each message has its effect once however
/// often it arrives. The part of the inbound consumer a backend supplies, like the
/// [`TransactionalCheckpoint`](crate::subscription::TransactionalCheckpoint) of the log's
/// consumers.
///
/// * [`InMemoryInbox`]: in one process; its unit of work is not a transaction, so the handler's
///   effect must itself be idempotent by event id (a command with an id derived from the event,
///   which the store dedupes) for exactly-once effects.
/// * `factum_postgres::PgInbox`: a PostgreSQL transaction that inserts the inbox row first; a
///   handler writing on it (a read model, `PostgresStore::in_transaction` for commands) commits
///   with it or not at all.
pub trait Inbox: Send + Sync {
    /// The unit of work the handler writes in.
    type Tx: Send;

    /// Opens a unit of work recording `message`'s event id for `consumer`, or `None` when the
    /// inbox already holds it (the message was handled before: acknowledge it and move on).
    fn begin(
        &self,
        consumer: &str,
        message: &BusMessage,
    ) -> impl Future<Output = Result<Option<Self::Tx>, Error>> + Send;

    /// Commits the unit of work: the event id and the handler's effects.
    fn commit(&self, tx: Self::Tx) -> impl Future<Output = Result<(), Error>> + Send;

    /// Abandons the unit of work (nothing of it is kept, where the backend can undo it).
    fn rollback(&self, tx: Self::Tx) -> impl Future<Output = ()> + Send;

    /// Parks a message in the dead-letter queue; returns its id there. A message parked again
    /// (same consumer and message id) keeps one dead letter, with the latest error.
    fn park(&self, parked: ParkedMessage) -> impl Future<Output = Result<u64, Error>> + Send;

    /// The messages `consumer` parked, oldest first.
    fn parked(
        &self,
        consumer: &str,
    ) -> impl Future<Output = Result<Vec<ParkedMessage>, Error>> + Send;

    /// Removes parked message `id` of `consumer` within `tx` (a retry of it that commits);
    /// returns whether it was there.
    fn unpark(
        &self,
        tx: &mut Self::Tx,
        consumer: &str,
        id: u64,
    ) -> impl Future<Output = Result<bool, Error>> + Send;

    /// Removes parked message `id` of `consumer` without handling it; returns whether it was
    /// there.
    fn discard(&self, consumer: &str, id: u64) -> impl Future<Output = Result<bool, Error>> + Send;
}

/// An [`Inbox`] in memory, for one process; clones share it.
#[derive(Clone, Debug, Default)]
pub struct InMemoryInbox {
    state: Arc<Mutex<InboxState>>,
}

#[derive(Debug, Default)]
struct InboxState {
    handled: HashSet<(String, EventId)>,
    parked: HashMap<String, Vec<ParkedMessage>>,
    next_id: u64,
}

/// The unit of work of an [`InMemoryInbox`]: the event id to record at commit.
#[derive(Debug)]
pub struct InMemoryInboxTx {
    key: (String, EventId),
    unpark: Option<u64>,
}

impl InMemoryInbox {
    /// An empty inbox.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `consumer` has handled the event `event_id`.
    pub fn contains(&self, consumer: &str, event_id: EventId) -> bool {
        self.lock()
            .handled
            .contains(&(consumer.to_owned(), event_id))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, InboxState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Inbox for InMemoryInbox {
    type Tx = InMemoryInboxTx;

    async fn begin(
        &self,
        consumer: &str,
        message: &BusMessage,
    ) -> Result<Option<InMemoryInboxTx>, Error> {
        let key = (consumer.to_owned(), message.event.event_id);
        Ok((!self.lock().handled.contains(&key)).then_some(InMemoryInboxTx { key, unpark: None }))
    }

    async fn commit(&self, tx: InMemoryInboxTx) -> Result<(), Error> {
        let mut state = self.lock();
        if let Some(id) = tx.unpark
            && let Some(list) = state.parked.get_mut(&tx.key.0)
        {
            list.retain(|p| p.id != id);
        }
        state.handled.insert(tx.key);
        Ok(())
    }

    async fn rollback(&self, _tx: InMemoryInboxTx) {}

    async fn park(&self, mut parked: ParkedMessage) -> Result<u64, Error> {
        let mut state = self.lock();
        // Parked again (it arrived again and failed again): one dead letter, the latest error.
        if let Some(id) = &parked.message_id
            && let Some(existing) = state
                .parked
                .get_mut(&parked.consumer)
                .and_then(|l| l.iter_mut().find(|p| p.message_id.as_ref() == Some(id)))
        {
            parked.id = existing.id;
            *existing = parked;
            return Ok(existing.id);
        }
        state.next_id += 1;
        parked.id = state.next_id;
        let id = parked.id;
        state
            .parked
            .entry(parked.consumer.clone())
            .or_default()
            .push(parked);
        Ok(id)
    }

    async fn parked(&self, consumer: &str) -> Result<Vec<ParkedMessage>, Error> {
        Ok(self
            .lock()
            .parked
            .get(consumer)
            .cloned()
            .unwrap_or_default())
    }

    async fn unpark(
        &self,
        tx: &mut InMemoryInboxTx,
        consumer: &str,
        id: u64,
    ) -> Result<bool, Error> {
        let found = self
            .lock()
            .parked
            .get(consumer)
            .is_some_and(|l| l.iter().any(|p| p.id == id));
        if found {
            tx.unpark = Some(id);
        }
        Ok(found)
    }

    async fn discard(&self, consumer: &str, id: u64) -> Result<bool, Error> {
        let mut state = self.lock();
        let Some(list) = state.parked.get_mut(consumer) else {
            return Ok(false);
        };
        let before = list.len();
        list.retain(|p| p.id != id);
        Ok(list.len() < before)
    }
}

/// How an [`InboundConsumer`] runs.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct InboundOptions {
    /// Messages fetched at a time (default 100).
    pub batch_size: usize,
    /// How long a fetch waits for messages (default 1 s); shutdown does not wait for it.
    pub fetch_wait: Duration,
    /// Attempts of the handler on one message before it is parked (default 3).
    pub handler_attempts: u32,
    /// The wait between two attempts (default 100 ms).
    pub handler_backoff: Duration,
    /// Park a message that keeps failing and go on (the default), or stop with an error naming
    /// it (`false`; the message is then delivered again when the consumer restarts).
    pub park_failures: bool,
}

impl Default for InboundOptions {
    fn default() -> Self {
        Self {
            batch_size: 100,
            fetch_wait: Duration::from_secs(1),
            handler_attempts: 3,
            handler_backoff: Duration::from_millis(100),
            park_failures: true,
        }
    }
}

impl InboundOptions {
    /// Sets the batch size.
    #[must_use]
    pub fn batch_size(mut self, size: usize) -> Self {
        self.batch_size = size.max(1);
        self
    }

    /// Sets the fetch wait.
    #[must_use]
    pub fn fetch_wait(mut self, wait: Duration) -> Self {
        self.fetch_wait = wait;
        self
    }

    /// Sets the handler attempts and the wait between them.
    #[must_use]
    pub fn handler_retries(mut self, attempts: u32, backoff: Duration) -> Self {
        self.handler_attempts = attempts.max(1);
        self.handler_backoff = backoff;
        self
    }

    /// Stops on a message that keeps failing instead of parking it.
    #[must_use]
    pub fn stop_on_failure(mut self) -> Self {
        self.park_failures = false;
        self
    }
}

/// What an inbound consumer is doing.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum InboundState {
    /// Not started yet.
    Starting,
    /// Fetching and handling messages.
    Running,
    /// The bus or the inbox failed in a way that may pass; it tries again with backoff
    /// (100 ms doubling to 10 s). The message says why.
    Retrying(String),
    /// Stopped on request.
    Stopped,
    /// Stopped on an error.
    Failed(String),
}

/// An inbound consumer's health, published as it runs ([`InboundConsumer::status`]).
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub struct InboundStatus {
    /// What it is doing.
    pub state: InboundState,
    /// Messages whose handler's effect it committed.
    pub handled: u64,
    /// Messages the inbox had already handled (redeliveries, re-publishes, replays): acknowledged
    /// with no effect.
    pub duplicates: u64,
    /// Messages parked in the dead-letter queue.
    pub parked: u64,
    /// Deliveries that were redeliveries (delivered more than once by the broker).
    pub redeliveries: u64,
    /// Messages waiting at the broker for this consumer (JetStream's pending count), when last
    /// asked, plus those delivered and not yet acknowledged: its lag in messages.
    pub lag_messages: u64,
    /// When the last handled event was recorded by its publisher.
    pub last_recorded_at: Option<DateTime<Utc>>,
}

/// Feeds the events other services publish to a handler, once each: a durable consumer of the
/// [`Bus`] whose handler's effects commit with the message's event id in the service's [`Inbox`].
///
/// Per message: decode it (a message that does not decode is parked, with its subject, id and
/// error); open the inbox's unit of work (a message the inbox holds already is acknowledged with
/// no effect); hand the event to the handler — any [`BatchHandler`] over the inbox's transaction,
/// e.g. a [`Projector`](crate::subscription::Projector) or a handler that executes a command with
/// a context [caused by](crate::CommandContext::caused_by) the event, so correlation and causation
/// cross the boundary; commit; acknowledge. A handler error is retried
/// ([`InboundOptions::handler_attempts`]), then the message is parked and the consumer goes on. A
/// failure that may pass (the broker restarting, the database unreachable) is waited out, never
/// parked.
///
/// A crash between commit and acknowledgement makes the broker deliver the message again: the
/// inbox drops it. Parked messages can be retried with [`retry_parked`](Self::retry_parked).
///
/// Several instances of one consumer (same durable name) may run: the broker spreads the messages
/// among them and the inbox keeps each effect single (a second instance's inbox insert waits for
/// the first one's transaction, then finds the row). Messages are then handled in parallel, not
/// in stream order; run one instance where a handler needs the order.
pub struct InboundConsumer<B: Bus, I> {
    bus: B,
    inbox: I,
    config: ConsumerConfig,
    options: InboundOptions,
    consumer: Option<B::Consumer>,
    status: watch::Sender<InboundStatus>,
    info_at: Option<Instant>,
}

impl<B: Bus, I> std::fmt::Debug for InboundConsumer<B, I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboundConsumer")
            .field("config", &self.config)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// What happened to one delivery.
enum Outcome {
    Handled,
    Duplicate,
    Parked,
    /// Shutdown came while waiting out a failure: left unacknowledged, delivered again later.
    Stopped,
}

/// The consumer's shutdown signal, fused (it can be waited on again after it completed).
type Stop<'a, S> = std::pin::Pin<&'a mut futures_util::future::Fuse<S>>;

/// Waits `wait`, or less when shutdown comes first; true when it did.
async fn pause<S: Future<Output = ()>>(wait: Duration, stop: &mut Stop<'_, S>) -> bool {
    tokio::select! {
        biased;
        () = stop.as_mut() => true,
        () = tokio::time::sleep(wait) => false,
    }
}

impl<B: Bus, I: Inbox> InboundConsumer<B, I> {
    /// A consumer of `bus` per `config` (its durable name is the consumer's name: the key of its
    /// inbox rows and parked messages), recording in `inbox`, with the default options.
    pub fn new(bus: B, inbox: I, config: ConsumerConfig) -> Self {
        let (status, _) = watch::channel(InboundStatus {
            state: InboundState::Starting,
            handled: 0,
            duplicates: 0,
            parked: 0,
            redeliveries: 0,
            lag_messages: 0,
            last_recorded_at: None,
        });
        Self {
            bus,
            inbox,
            config,
            options: InboundOptions::default(),
            consumer: None,
            status,
            info_at: None,
        }
    }

    /// Replaces the options.
    #[must_use]
    pub fn options(mut self, options: InboundOptions) -> Self {
        self.options = options;
        self
    }

    /// The consumer's name (its durable name).
    pub fn name(&self) -> &str {
        &self.config.durable
    }

    /// Its inbox.
    pub fn inbox(&self) -> &I {
        &self.inbox
    }

    /// A live view of its state and counters.
    pub fn status(&self) -> watch::Receiver<InboundStatus> {
        self.status.subscribe()
    }

    /// Fetches and handles messages until `shutdown` completes or a failure that cannot pass
    /// stops it. Shutdown takes effect between messages, while waiting for messages, and while
    /// waiting out a failure (the broker or database down): a message interrupted so is left
    /// unacknowledged and delivered again after the ack wait; the inbox drops it if its effect
    /// had committed.
    pub async fn run<H: BatchHandler<I::Tx>>(
        &mut self,
        mut handler: H,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), Error> {
        let mut shutdown = std::pin::pin!(futures_util::FutureExt::fuse(shutdown));
        let mut wait = RETRY_MIN;
        self.status.send_modify(|s| s.state = InboundState::Running);
        loop {
            let fetched = tokio::select! {
                biased;
                () = &mut shutdown => break,
                fetched = self.fetch() => fetched,
            };
            let deliveries = match fetched {
                Ok(deliveries) => deliveries,
                Err(error) if retries_after(&error) => {
                    self.consumer = None;
                    self.retrying(&error, &mut wait);
                    tokio::select! {
                        biased;
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(wait) => continue,
                    }
                }
                Err(error) => return Err(self.failed(error)),
            };
            wait = RETRY_MIN;
            self.running();
            if deliveries.is_empty() {
                self.refresh_info(true).await;
                continue;
            }
            let mut stopped = false;
            for delivery in deliveries {
                if stopped {
                    break; // the rest is delivered again after the ack wait
                }
                match self.handle(&mut handler, delivery, &mut shutdown).await {
                    Ok(done) => stopped = !done,
                    Err(error) => return Err(self.failed(error)),
                }
            }
            if stopped {
                break;
            }
            self.refresh_info(false).await;
        }
        self.status.send_modify(|s| s.state = InboundState::Stopped);
        Ok(())
    }

    /// Handles parked message `id` again with `handler` (after the handler or the publisher was
    /// fixed): on success its effect, its inbox row and its removal from the dead-letter queue
    /// commit together. A message the inbox already holds is removed with no effect. On failure
    /// it stays parked and the error is returned.
    pub async fn retry_parked<H: BatchHandler<I::Tx>>(
        &mut self,
        mut handler: H,
        id: u64,
    ) -> Result<(), Error> {
        let name = self.config.durable.clone();
        let parked = self
            .inbox
            .parked(&name)
            .await?
            .into_iter()
            .find(|p| p.id == id)
            .ok_or_else(|| {
                Error::InvalidArgument(format!("consumer {name:?} has no parked message {id}"))
            })?;
        let message = parked
            .decode()
            .map_err(|e| Error::permanent("retry parked message", e))?;
        let Some(mut tx) = self.inbox.begin(&name, &message).await? else {
            self.inbox.discard(&name, id).await?;
            return Ok(());
        };
        if let Err(error) = handler.handle_one(&mut tx, &message.event).await {
            self.inbox.rollback(tx).await;
            return Err(handler_error(&name, &message, 1, error));
        }
        self.inbox.unpark(&mut tx, &name, id).await?;
        self.inbox.commit(tx).await?;
        self.status.send_modify(|s| s.handled += 1);
        Ok(())
    }

    async fn fetch(&mut self) -> Result<Vec<Delivery>, Error> {
        if self.consumer.is_none() {
            self.consumer = Some(self.bus.consumer(&self.config).await?);
        }
        let consumer = self.consumer.as_mut().expect("set above");
        consumer
            .fetch(self.options.batch_size, self.options.fetch_wait)
            .await
    }

    async fn refresh_info(&mut self, idle: bool) {
        let due = idle
            || self
                .info_at
                .is_none_or(|at| at.elapsed() >= Duration::from_secs(1));
        if !due {
            return;
        }
        if let Some(consumer) = self.consumer.as_mut()
            && let Ok(info) = consumer.info().await
        {
            self.info_at = Some(Instant::now());
            self.status
                .send_modify(|s| s.lag_messages = info.pending + info.ack_pending);
        }
    }

    fn retrying(&self, error: &Error, wait: &mut Duration) {
        tracing::warn!(consumer = %self.config.durable, %error, ?wait, "inbound consumer failed; trying again");
        self.status
            .send_modify(|s| s.state = InboundState::Retrying(error.to_string()));
        *wait = (*wait * 2).min(RETRY_MAX);
    }

    /// Back to running after a failure passed.
    fn running(&self) {
        self.status.send_if_modified(|s| {
            let changed = s.state != InboundState::Running;
            s.state = InboundState::Running;
            changed
        });
    }

    fn failed(&self, error: Error) -> Error {
        self.status
            .send_modify(|s| s.state = InboundState::Failed(error.to_string()));
        error
    }

    /// Handles one delivery; `Ok(false)` when shutdown came while it waited out a failure (the
    /// delivery is left unacknowledged).
    async fn handle<H: BatchHandler<I::Tx>, S: Future<Output = ()>>(
        &mut self,
        handler: &mut H,
        delivery: Delivery,
        stop: &mut Stop<'_, S>,
    ) -> Result<bool, Error> {
        if delivery.delivered > 1 {
            self.status.send_modify(|s| s.redeliveries += 1);
        }
        let name = self.config.durable.clone();
        let message = match delivery.decode() {
            Ok(message) => message,
            Err(error) => {
                tracing::error!(consumer = %name, %error, "parking a message that does not decode");
                let parked = ParkedMessage::new(&name, &delivery, error.to_string(), 0);
                if !self.park(parked, stop).await? {
                    return Ok(false);
                }
                self.ack(delivery).await;
                self.status.send_modify(|s| s.parked += 1);
                return Ok(true);
            }
        };
        let outcome = self.apply(handler, &message, &delivery, stop).await?;
        if matches!(outcome, Outcome::Stopped) {
            return Ok(false);
        }
        self.ack(delivery).await;
        let recorded = message.event.recorded_at;
        self.status.send_modify(|s| match outcome {
            Outcome::Handled => {
                s.handled += 1;
                s.last_recorded_at = Some(recorded);
            }
            Outcome::Duplicate => s.duplicates += 1,
            Outcome::Parked => s.parked += 1,
            Outcome::Stopped => {}
        });
        Ok(true)
    }

    async fn apply<H: BatchHandler<I::Tx>, S: Future<Output = ()>>(
        &mut self,
        handler: &mut H,
        message: &BusMessage,
        delivery: &Delivery,
        stop: &mut Stop<'_, S>,
    ) -> Result<Outcome, Error> {
        let name = self.config.durable.clone();
        let mut attempts = 0;
        let mut wait = RETRY_MIN;
        loop {
            let begun = match self.inbox.begin(&name, message).await {
                Ok(begun) => begun,
                Err(error) if retries_after(&error) => {
                    self.retrying(&error, &mut wait);
                    if pause(wait, stop).await {
                        return Ok(Outcome::Stopped);
                    }
                    continue;
                }
                Err(error) => return Err(error),
            };
            let Some(mut tx) = begun else {
                return Ok(Outcome::Duplicate);
            };
            match handler.handle_one(&mut tx, &message.event).await {
                Ok(()) => match self.inbox.commit(tx).await {
                    // After an unknown outcome, the next `begin` finds out whether it landed.
                    Ok(()) => {
                        self.running();
                        return Ok(Outcome::Handled);
                    }
                    Err(error) if retries_after(&error) => {
                        self.retrying(&error, &mut wait);
                        if pause(wait, stop).await {
                            return Ok(Outcome::Stopped);
                        }
                    }
                    Err(error) => return Err(error),
                },
                Err(error) => {
                    self.inbox.rollback(tx).await;
                    // A store failure inside the handler that may pass is waited out, not
                    // counted against the message.
                    if let Some(store) = error.downcast_ref::<Error>()
                        && retries_after(store)
                    {
                        self.retrying(store, &mut wait);
                        if pause(wait, stop).await {
                            return Ok(Outcome::Stopped);
                        }
                        continue;
                    }
                    attempts += 1;
                    if attempts < self.options.handler_attempts {
                        if pause(self.options.handler_backoff, stop).await {
                            return Ok(Outcome::Stopped);
                        }
                        continue;
                    }
                    let error = handler_error(&name, message, attempts, error);
                    if !self.options.park_failures {
                        return Err(error);
                    }
                    tracing::error!(consumer = %name, %error, "parking a message that keeps failing");
                    let parked =
                        ParkedMessage::new(&name, delivery, crate::error_chain(&error), attempts);
                    if !self.park(parked, stop).await? {
                        return Ok(Outcome::Stopped);
                    }
                    return Ok(Outcome::Parked);
                }
            }
        }
    }

    /// Parks, waiting out failures that may pass; false when shutdown came first.
    async fn park<S: Future<Output = ()>>(
        &self,
        parked: ParkedMessage,
        stop: &mut Stop<'_, S>,
    ) -> Result<bool, Error> {
        let mut wait = RETRY_MIN;
        loop {
            match self.inbox.park(parked.clone()).await {
                Ok(_) => return Ok(true),
                Err(error) if retries_after(&error) => {
                    self.retrying(&error, &mut wait);
                    if pause(wait, stop).await {
                        return Ok(false);
                    }
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Acknowledges; a failed acknowledgement is only logged: the broker delivers the message
    /// again and the inbox drops it.
    async fn ack(&self, delivery: Delivery) {
        if let Err(error) = delivery.ack().await {
            tracing::warn!(consumer = %self.config.durable, %error, "acknowledgement failed; the inbox will drop the redelivery");
        }
    }
}

fn handler_error(consumer: &str, message: &BusMessage, attempts: u32, source: BoxError) -> Error {
    let event = &message.event;
    Error::Handler {
        subscription: consumer.to_owned(),
        stream: event.stream_id.clone(),
        version: event.stream_version,
        event_type: event.event_type.clone(),
        event_id: event.event_id,
        position: event.position,
        attempts,
        source,
    }
}
