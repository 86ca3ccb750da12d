//! The NATS JetStream bus for [factum](https://docs.rs/factum): services publish their public
//! events to JetStream through factum's [`Relay`](factum::bus::Relay) and consume other services'
//! events once each through an [`InboundConsumer`](factum::bus::InboundConsumer).
//!
//! [`JetStreamBus`] implements [`Bus`]:
//! * streams are created from a [`StreamConfig`] (file storage), or verified against an existing
//!   stream's subjects, duplicate window and retention — never changed silently;
//! * a published batch is sent pipelined (every message first, then every acknowledgement
//!   awaited), with the event id as `Nats-Msg-Id`, so JetStream drops a repeat within the
//!   stream's duplicate window and says so (`duplicate` in the acknowledgement);
//! * consumers are durable pull consumers with explicit acknowledgements.
//!
//! Lost connections, timeouts and a JetStream that is not ready are
//! [transient](factum::ErrorKind::Transient): the relay and the inbound consumers wait them out
//! while the client reconnects (for ever, by default). A subject no stream captures, or a
//! rejected configuration, is permanent.
//!
//! ```no_run
//! # async fn run() -> Result<(), factum::Error> {
//! use factum::bus::{Bus, ServiceName, StreamConfig};
//! use factum_nats::JetStreamBus;
//!
//! let bus = JetStreamBus::connect("nats://127.0.0.1:4222").await?;
//! let orders = ServiceName::new("orders")?;
//! bus.ensure_stream(&StreamConfig::for_service(&orders)).await?;
//! # Ok(()) }
//! ```
//!
//! Works with nats-server 2.9 and later. A consumer takes at most one filter subject (several
//! need nats-server 2.10's `filter_subjects`, which this crate does not use yet).

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer::pull, stream};
use factum::Error;
use factum::bus::{
    AckFuture, Acker, Bus, BusConsumer, BusMessage, ConsumerConfig, ConsumerInfo, Delivery,
    PublishAck, StreamConfig,
};
use futures_util::StreamExt;

/// [`Bus`] over NATS JetStream. Cheap to clone (clones share the connection).
#[derive(Clone, Debug)]
pub struct JetStreamBus {
    client: async_nats::Client,
    context: jetstream::Context,
}

impl JetStreamBus {
    /// Connects to the NATS server at `url` (e.g. `nats://127.0.0.1:4222`), reconnecting for
    /// ever when the connection is lost.
    ///
    /// The first connection must succeed: an unreachable server is a transient error here.
    pub async fn connect(url: &str) -> Result<Self, Error> {
        let client = async_nats::ConnectOptions::new()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(5))
            .connect(url)
            .await
            .map_err(|e| Error::transient("connect to NATS", e))?;
        Ok(Self::new(client))
    }

    /// A bus on an existing client (its options, credentials and TLS are the caller's).
    pub fn new(client: async_nats::Client) -> Self {
        let context = jetstream::new(client.clone());
        Self { client, context }
    }

    /// The NATS client.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// Whether the client is connected now (it reconnects by itself when not).
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }
}

fn transient(
    operation: &'static str,
    error: impl std::error::Error + Send + Sync + 'static,
) -> Error {
    Error::transient(operation, error)
}

fn to_config(config: &StreamConfig) -> stream::Config {
    stream::Config {
        name: config.name.clone(),
        subjects: config.subjects.clone(),
        duplicate_window: config.duplicate_window,
        max_age: config.max_age.unwrap_or(Duration::ZERO),
        max_messages: config
            .max_messages
            .map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX)),
        storage: stream::StorageType::File,
        ..Default::default()
    }
}

fn from_config(config: &stream::Config) -> StreamConfig {
    let mut found = StreamConfig::new(&config.name, config.subjects.clone())
        .duplicate_window(config.duplicate_window);
    if config.max_age > Duration::ZERO {
        found = found.max_age(config.max_age);
    }
    if config.max_messages > 0 {
        found = found.max_messages(u64::try_from(config.max_messages).unwrap_or(0));
    }
    found
}

fn header_map(message: &BusMessage) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in message.headers() {
        headers.insert(name, value.as_str());
    }
    headers
}

impl Bus for JetStreamBus {
    type Consumer = JetStreamConsumer;

    async fn ensure_stream(&self, config: &StreamConfig) -> Result<(), Error> {
        match self.context.get_stream(&config.name).await {
            Ok(mut existing) => {
                let info = existing
                    .info()
                    .await
                    .map_err(|e| transient("read stream info", e))?;
                match config.mismatch(&from_config(&info.config)) {
                    Some(error) => Err(error),
                    None => Ok(()),
                }
            }
            Err(error) => {
                use async_nats::jetstream::context::GetStreamErrorKind;
                match error.kind() {
                    GetStreamErrorKind::JetStream(e)
                        if e.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND =>
                    {
                        self.context
                            .create_stream(to_config(config))
                            .await
                            .map(|_| ())
                            .map_err(|e| {
                                use async_nats::jetstream::context::CreateStreamErrorKind as K;
                                match e.kind() {
                                    K::TimedOut | K::JetStreamUnavailable => {
                                        transient("create stream", e)
                                    }
                                    _ => Error::permanent("create stream", e),
                                }
                            })
                    }
                    GetStreamErrorKind::JetStream(_) => Err(Error::permanent("get stream", error)),
                    _ => Err(transient("get stream", error)),
                }
            }
        }
    }

    async fn publish(&self, messages: &[BusMessage]) -> Result<Vec<PublishAck>, Error> {
        use async_nats::jetstream::context::PublishErrorKind as K;
        let classify = |e: async_nats::jetstream::context::PublishError| match e.kind() {
            K::StreamNotFound
            | K::MaxPayloadExceeded
            | K::WrongLastMessageId
            | K::WrongLastSequence => Error::permanent("publish", e),
            _ => transient("publish", e),
        };
        // Pipelined: every message goes out before the first acknowledgement is awaited.
        let mut pending = Vec::with_capacity(messages.len());
        for message in messages {
            let ack = self
                .context
                .publish_with_headers(
                    message.subject.clone(),
                    header_map(message),
                    bytes::Bytes::copy_from_slice(message.body()),
                )
                .await
                .map_err(classify)?;
            pending.push(ack);
        }
        let mut acks = Vec::with_capacity(pending.len());
        for ack in pending {
            let ack = ack.await.map_err(classify)?;
            acks.push(PublishAck::new(ack.sequence, ack.duplicate));
        }
        Ok(acks)
    }

    async fn consumer(&self, config: &ConsumerConfig) -> Result<JetStreamConsumer, Error> {
        let filter_subject = match config.filter_subjects.as_slice() {
            [] => String::new(),
            [one] => one.clone(),
            more => {
                return Err(Error::InvalidArgument(format!(
                    "consumer {:?} has {} filter subjects; factum-nats supports one (use a wildcard such as `orders.>`)",
                    config.durable,
                    more.len()
                )));
            }
        };
        let stream = self
            .context
            .get_stream(&config.stream)
            .await
            .map_err(|e| {
                use async_nats::jetstream::context::GetStreamErrorKind;
                match e.kind() {
                    GetStreamErrorKind::JetStream(_) => Error::InvalidArgument(format!(
                        "consumer {:?} reads stream {:?}, which JetStream does not have ({e}): create it first (Bus::ensure_stream)",
                        config.durable, config.stream
                    )),
                    _ => transient("get stream", e),
                }
            })?;
        let consumer = stream
            .get_or_create_consumer(
                &config.durable,
                pull::Config {
                    durable_name: Some(config.durable.clone()),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: config.ack_wait,
                    filter_subject,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| transient("create consumer", e))?;
        Ok(JetStreamConsumer { consumer })
    }
}

/// A durable pull consumer of a JetStream stream.
#[derive(Debug)]
pub struct JetStreamConsumer {
    consumer: jetstream::consumer::Consumer<pull::Config>,
}

impl BusConsumer for JetStreamConsumer {
    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>, Error> {
        // JetStream wants a pull request to expire after at least a millisecond.
        let wait = wait.max(Duration::from_millis(10));
        let mut batch = self
            .consumer
            .fetch()
            .max_messages(max.max(1))
            .expires(wait)
            .messages()
            .await
            .map_err(|e| transient("fetch", e))?;
        let mut out = Vec::new();
        while let Some(message) = batch.next().await {
            let message = message.map_err(|e| Error::transient("fetch", e))?;
            let delivered = message
                .info()
                .map(|i| u64::try_from(i.delivered).unwrap_or(1))
                .unwrap_or(1);
            let (message, acker) = message.split();
            let headers = message
                .headers
                .as_ref()
                .map(|h| {
                    h.iter()
                        .flat_map(|(name, values)| {
                            values
                                .iter()
                                .map(move |v| (name.to_string(), v.as_str().to_owned()))
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push(Delivery::new(
                message.subject.to_string(),
                headers,
                message.payload.to_vec(),
                delivered,
                Box::new(JetStreamAcker { acker }),
            ));
        }
        Ok(out)
    }

    async fn info(&mut self) -> Result<ConsumerInfo, Error> {
        let info = self
            .consumer
            .info()
            .await
            .map_err(|e| transient("consumer info", e))?;
        Ok(ConsumerInfo::new(
            info.num_pending,
            info.num_ack_pending as u64,
            info.num_redelivered as u64,
        ))
    }
}

struct JetStreamAcker {
    acker: jetstream::message::Acker,
}

impl Acker for JetStreamAcker {
    fn ack(self: Box<Self>) -> AckFuture {
        Box::pin(async move {
            // Confirmed by the server: a lost acknowledgement is an error the consumer logs (the
            // message comes again and the inbox drops it), and the consumer's counts are exact.
            self.acker
                .double_ack()
                .await
                .map_err(|e| Error::transient("ack", e))
        })
    }

    fn nak(self: Box<Self>, delay: Duration) -> AckFuture {
        Box::pin(async move {
            self.acker
                .ack_with(jetstream::AckKind::Nak(Some(delay)))
                .await
                .map_err(|e| Error::transient("nak", e))
        })
    }
}

/// The book's chapter on services and boundaries, compiled so it cannot drift from the code.
#[cfg(doctest)]
#[doc = include_str!("../../docs/src/services.md")]
mod services_chapter {}

/// The book's chapter on the event bus, compiled so it cannot drift from the code.
#[cfg(doctest)]
#[doc = include_str!("../../docs/src/bus.md")]
mod bus_chapter {}
