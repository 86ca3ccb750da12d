//! The in-process bus: streams, duplicate windows, durable consumers and redelivery in memory.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::error::Error;

use super::{
    AckFuture, Acker, Bus, BusConsumer, BusMessage, ConsumerConfig, ConsumerInfo, Delivery,
    PublishAck, StreamConfig, subject_matches,
};

/// A [`Bus`] inside one process: for examples, tests and single-binary deployments, with the
/// semantics of JetStream that factum relies on — streams capturing subjects, message-id
/// deduplication within a duplicate window, durable consumers that keep their position, and
/// redelivery of what was not acknowledged within the ack wait. Clones share the same bus.
///
/// Nothing survives the process; time is tokio's, so paused-time tests can move the duplicate
/// window and ack waits.
#[derive(Clone, Debug, Default)]
pub struct InProcessBus {
    inner: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    /// Woken on every publish and nak, for fetches waiting for messages.
    published: Notify,
}

#[derive(Debug, Default)]
struct State {
    streams: Vec<Stream>,
    consumers: HashMap<(String, String), ConsumerState>,
}

#[derive(Debug)]
struct Stream {
    config: StreamConfig,
    /// Stored messages by sequence (from 1).
    messages: BTreeMap<u64, Stored>,
    last_sequence: u64,
    /// Message id → (sequence, stored at), within the duplicate window.
    ids: HashMap<String, (u64, Instant)>,
    /// The ids in the order they were stored, to expire the oldest first.
    id_order: std::collections::VecDeque<(Instant, String)>,
}

#[derive(Clone, Debug)]
struct Stored {
    subject: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    stored_at: Instant,
}

#[derive(Debug)]
struct ConsumerState {
    config: ConsumerConfig,
    /// The last sequence delivered for the first time.
    delivered_up_to: u64,
    /// Delivered, not acknowledged: sequence → (redeliver at, deliveries so far).
    unacked: BTreeMap<u64, (Instant, u64)>,
}

impl InProcessBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many messages stream `name` holds (0 when it does not exist).
    pub fn stored(&self, name: &str) -> usize {
        let state = self.lock();
        state
            .streams
            .iter()
            .find(|s| s.config.name == name)
            .map_or(0, |s| s.messages.len())
    }

    /// Publishes a message as given — subject, headers, body — as a publisher that is not factum
    /// would (or a broken one): what consumers must cope with. Deduplicated by its
    /// `Nats-Msg-Id` header like any message; returns the acknowledgement.
    pub fn publish_raw(
        &self,
        subject: &str,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    ) -> Result<PublishAck, Error> {
        let now = Instant::now();
        let ack = {
            let mut state = self.lock();
            let stream = state
                .streams
                .iter_mut()
                .find(|s| s.config.subjects.iter().any(|p| subject_matches(p, subject)))
                .ok_or_else(|| {
                    Error::permanent(
                        "publish",
                        format!("no stream captures subject {subject:?}: create one first (Bus::ensure_stream)"),
                    )
                })?;
            stream.store(now, subject, headers, body)
        };
        self.inner.published.notify_waiters();
        Ok(ack)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl Stream {
    /// Stores a message unless its id was stored within the duplicate window.
    fn store(
        &mut self,
        now: Instant,
        subject: &str,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    ) -> PublishAck {
        self.expire(now);
        let id = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(super::headers::MESSAGE_ID))
            .map(|(_, v)| v.clone());
        if let Some(&(sequence, _)) = id.as_ref().and_then(|id| self.ids.get(id)) {
            return PublishAck::new(sequence, true);
        }
        self.last_sequence += 1;
        let sequence = self.last_sequence;
        if let Some(id) = id {
            self.id_order.push_back((now, id.clone()));
            self.ids.insert(id, (sequence, now));
        }
        self.messages.insert(
            sequence,
            Stored {
                subject: subject.to_owned(),
                headers,
                body,
                stored_at: now,
            },
        );
        PublishAck::new(sequence, false)
    }

    fn expire(&mut self, now: Instant) {
        let window = self.config.duplicate_window;
        while let Some((at, _)) = self.id_order.front() {
            if now.saturating_duration_since(*at) < window {
                break;
            }
            let (_, id) = self.id_order.pop_front().expect("looked at");
            self.ids.remove(&id);
        }
        if let Some(age) = self.config.max_age {
            while let Some(entry) = self.messages.first_entry() {
                if now.saturating_duration_since(entry.get().stored_at) < age {
                    break;
                }
                entry.remove();
            }
        }
        if let Some(max) = self.config.max_messages {
            while self.messages.len() as u64 > max {
                self.messages.pop_first();
            }
        }
    }
}

impl Bus for InProcessBus {
    type Consumer = InProcessConsumer;

    async fn ensure_stream(&self, config: &StreamConfig) -> Result<(), Error> {
        let mut state = self.lock();
        if let Some(existing) = state.streams.iter().find(|s| s.config.name == config.name) {
            return match config.mismatch(&existing.config) {
                Some(error) => Err(error),
                None => Ok(()),
            };
        }
        for other in &state.streams {
            for subject in &config.subjects {
                if other
                    .config
                    .subjects
                    .iter()
                    .any(|s| subject_matches(s, subject) || subject_matches(subject, s))
                {
                    return Err(Error::InvalidArgument(format!(
                        "stream {:?} would capture subject {subject:?}, which stream {:?} captures already; give each stream its own subjects",
                        config.name, other.config.name
                    )));
                }
            }
        }
        state.streams.push(Stream {
            config: config.clone(),
            messages: BTreeMap::new(),
            last_sequence: 0,
            ids: HashMap::new(),
            id_order: std::collections::VecDeque::new(),
        });
        Ok(())
    }

    async fn publish(&self, messages: &[BusMessage]) -> Result<Vec<PublishAck>, Error> {
        let now = Instant::now();
        let mut acks = Vec::with_capacity(messages.len());
        {
            let mut state = self.lock();
            for message in messages {
                let stream = state
                    .streams
                    .iter_mut()
                    .find(|s| s.config.subjects.iter().any(|p| subject_matches(p, &message.subject)))
                    .ok_or_else(|| {
                        Error::permanent(
                            "publish",
                            format!(
                                "no stream captures subject {:?}: create one first (Bus::ensure_stream)",
                                message.subject
                            ),
                        )
                    })?;
                let headers = message
                    .headers()
                    .into_iter()
                    .map(|(n, v)| (n.to_owned(), v))
                    .collect();
                acks.push(stream.store(now, &message.subject, headers, message.body().to_vec()));
            }
        }
        self.inner.published.notify_waiters();
        Ok(acks)
    }

    async fn consumer(&self, config: &ConsumerConfig) -> Result<InProcessConsumer, Error> {
        let mut state = self.lock();
        if !state.streams.iter().any(|s| s.config.name == config.stream) {
            return Err(Error::InvalidArgument(format!(
                "consumer {:?} reads stream {:?}, which does not exist: create it first (Bus::ensure_stream)",
                config.durable, config.stream
            )));
        }
        let key = (config.stream.clone(), config.durable.clone());
        match state.consumers.get(&key) {
            Some(existing) if existing.config.filter_subjects != config.filter_subjects => {
                return Err(Error::InvalidArgument(format!(
                    "consumer {:?} exists with filter subjects {:?}, not {:?}",
                    config.durable, existing.config.filter_subjects, config.filter_subjects
                )));
            }
            Some(_) => {}
            None => {
                state.consumers.insert(
                    key.clone(),
                    ConsumerState {
                        config: config.clone(),
                        delivered_up_to: 0,
                        unacked: BTreeMap::new(),
                    },
                );
            }
        }
        Ok(InProcessConsumer {
            bus: self.clone(),
            key,
        })
    }
}

/// A durable consumer of an [`InProcessBus`] stream.
#[derive(Debug)]
pub struct InProcessConsumer {
    bus: InProcessBus,
    key: (String, String),
}

impl InProcessConsumer {
    fn take(&self, max: usize) -> Vec<Delivery> {
        let now = Instant::now();
        let mut state = self.bus.lock();
        let State { streams, consumers } = &mut *state;
        let Some(stream) = streams.iter_mut().find(|s| s.config.name == self.key.0) else {
            return Vec::new();
        };
        stream.expire(now);
        let Some(consumer) = consumers.get_mut(&self.key) else {
            return Vec::new();
        };
        let ack_wait = consumer.config.ack_wait;
        let mut out = Vec::new();
        // Redeliveries first, in sequence order.
        let due: Vec<u64> = consumer
            .unacked
            .iter()
            .filter(|(_, (at, _))| *at <= now)
            .map(|(seq, _)| *seq)
            .take(max)
            .collect();
        for sequence in due {
            let Some(stored) = stream.messages.get(&sequence) else {
                consumer.unacked.remove(&sequence);
                continue;
            };
            let entry = consumer.unacked.get_mut(&sequence).expect("listed above");
            entry.0 = now + ack_wait;
            entry.1 += 1;
            out.push(self.delivery(sequence, stored, entry.1));
        }
        let wanted = |subject: &str| {
            consumer.config.filter_subjects.is_empty()
                || consumer
                    .config
                    .filter_subjects
                    .iter()
                    .any(|f| subject_matches(f, subject))
        };
        let after = consumer.delivered_up_to;
        let mut last = after;
        for (&sequence, stored) in stream.messages.range(after + 1..) {
            if out.len() >= max {
                break;
            }
            last = sequence;
            if !wanted(&stored.subject) {
                continue;
            }
            consumer.unacked.insert(sequence, (now + ack_wait, 1));
            out.push(self.delivery(sequence, stored, 1));
        }
        consumer.delivered_up_to = last.max(after);
        out
    }

    fn delivery(&self, sequence: u64, stored: &Stored, delivered: u64) -> Delivery {
        Delivery::new(
            stored.subject.clone(),
            stored.headers.clone(),
            stored.body.clone(),
            delivered,
            Box::new(InProcessAcker {
                bus: self.bus.clone(),
                key: self.key.clone(),
                sequence,
            }),
        )
    }

    /// When the next unacknowledged message is due for redelivery.
    fn next_redelivery(&self) -> Option<Instant> {
        let state = self.bus.lock();
        state
            .consumers
            .get(&self.key)
            .and_then(|c| c.unacked.values().map(|(at, _)| *at).min())
    }
}

impl BusConsumer for InProcessConsumer {
    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>, Error> {
        let deadline = Instant::now() + wait;
        loop {
            // Register for a wake-up before looking, so a publish in between is not missed.
            let published = self.bus.inner.published.notified();
            let got = self.take(max.max(1));
            if !got.is_empty() {
                return Ok(got);
            }
            let until = self
                .next_redelivery()
                .map_or(deadline, |at| at.min(deadline));
            if Instant::now() >= deadline {
                return Ok(Vec::new());
            }
            tokio::select! {
                () = published => {}
                () = tokio::time::sleep_until(until) => {}
            }
        }
    }

    async fn info(&mut self) -> Result<ConsumerInfo, Error> {
        let state = self.bus.lock();
        let Some(consumer) = state.consumers.get(&self.key) else {
            return Ok(ConsumerInfo::default());
        };
        let pending = state
            .streams
            .iter()
            .find(|s| s.config.name == self.key.0)
            .map_or(0, |s| {
                s.messages
                    .range(consumer.delivered_up_to + 1..)
                    .filter(|(_, m)| {
                        consumer.config.filter_subjects.is_empty()
                            || consumer
                                .config
                                .filter_subjects
                                .iter()
                                .any(|f| subject_matches(f, &m.subject))
                    })
                    .count() as u64
            });
        Ok(ConsumerInfo::new(
            pending,
            consumer.unacked.len() as u64,
            consumer.unacked.values().filter(|(_, n)| *n > 1).count() as u64,
        ))
    }
}

struct InProcessAcker {
    bus: InProcessBus,
    key: (String, String),
    sequence: u64,
}

impl Acker for InProcessAcker {
    fn ack(self: Box<Self>) -> AckFuture {
        if let Some(consumer) = self.bus.lock().consumers.get_mut(&self.key) {
            consumer.unacked.remove(&self.sequence);
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn nak(self: Box<Self>, delay: Duration) -> AckFuture {
        if let Some(consumer) = self.bus.lock().consumers.get_mut(&self.key)
            && let Some(entry) = consumer.unacked.get_mut(&self.sequence)
        {
            entry.0 = Instant::now() + delay;
        }
        self.bus.inner.published.notify_waiters();
        Box::pin(std::future::ready(Ok(())))
    }
}
