//! [`RedisInbox`]: the receiving service's inbox and dead-letter queue in Redis.

use std::time::Duration;

use chrono::{DateTime, Utc};
use factum::bus::{BusMessage, Inbox, ParkedMessage};
use factum::{Error, EventId};
use redis::{AsyncCommands as _, Value};
use serde::{Deserialize, Serialize};

use crate::error::{corrupt, to_error};
use crate::{RedisKeyspace, RedisTx};

/// Redis's [`Inbox`]: each inbound message is handled in a [`RedisTx`] that `WATCH`es the
/// message's inbox record (`{namespace}:factum:inbox:{consumer}:{event id}`) from `begin` (which
/// finds a record already there: a duplicate) and sets it in the same `MULTI`/`EXEC` as the
/// handler's writes. So a message's effect is applied once however often it is delivered, and
/// of two instances handling the same message at once, one applies it: the other's `EXEC`
/// applies nothing (a transient [`SinkError::Moved`](crate::SinkError::Moved)) and its next try
/// finds the record.
///
/// Records are kept for ever by default; [`retain_for`](Self::retain_for) gives them a
/// time-to-live instead (Redis expires them; no sweeper to run). Like `PgInbox::expire`: a
/// message whose record expired has an effect again if it is delivered again, so keep records
/// longer than anything can be redelivered or replayed to this service.
///
/// Parked messages go to the hash `{namespace}:factum:inbox-parked:{consumer}` (id → the
/// message as received and the error, as JSON); a message parked again (same consumer and
/// message id) keeps one dead letter, with the latest error.
///
/// ```no_run
/// use factum::bus::{ConsumerConfig, InboundConsumer, InProcessBus};
/// use factum::subscription::{BatchFailure, BatchHandler};
/// use factum::RecordedEvent;
/// use factum_redis::{RedisInbox, RedisKeyspace, RedisTx};
///
/// /// Appends every event's id to a per-stream feed.
/// struct Feed;
///
/// impl BatchHandler<RedisTx> for Feed {
///     async fn handle_batch(&mut self, tx: &mut RedisTx, events: &[RecordedEvent]) -> Result<(), BatchFailure> {
///         for event in events {
///             let key = tx.key(&format!("feed:{}", event.stream_id));
///             tx.pipe().rpush(key, event.event_id.to_string());
///         }
///         Ok(())
///     }
/// }
///
/// # async fn run(bus: InProcessBus) -> Result<(), factum::Error> {
/// let keyspace = RedisKeyspace::connect("redis://127.0.0.1:6379", "notifications").await?;
/// let inbox = RedisInbox::new(&keyspace).retain_for(std::time::Duration::from_secs(30 * 24 * 3600));
/// let mut consumer = InboundConsumer::new(bus, inbox, ConsumerConfig::new("CONTENT", "notifications"));
/// consumer.run(Feed, std::future::pending::<()>()).await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct RedisInbox {
    keyspace: RedisKeyspace,
    retention: Option<Duration>,
}

impl RedisInbox {
    /// The inbox in `keyspace`, keeping records for ever.
    pub fn new(keyspace: &RedisKeyspace) -> Self {
        Self {
            keyspace: keyspace.clone(),
            retention: None,
        }
    }

    /// Keeps each inbox record for `retention` after its message was handled, then lets Redis
    /// expire it.
    #[must_use]
    pub fn retain_for(mut self, retention: Duration) -> Self {
        self.retention = Some(retention);
        self
    }

    /// The keyspace.
    pub fn keyspace(&self) -> &RedisKeyspace {
        &self.keyspace
    }

    /// The key of `consumer`'s record of event `event_id`.
    pub fn record_key(&self, consumer: &str, event_id: EventId) -> String {
        self.keyspace
            .factum_key("inbox", &format!("{consumer}:{event_id}"))
    }

    /// Whether `consumer` has handled the event `event_id`.
    pub async fn contains(&self, consumer: &str, event_id: EventId) -> Result<bool, Error> {
        self.keyspace
            .connection()
            .exists(self.record_key(consumer, event_id))
            .await
            .map_err(|e| to_error(e, "look up the inbox in Redis"))
    }

    fn parked_key(&self, consumer: &str) -> String {
        self.keyspace.factum_key("inbox-parked", consumer)
    }

    fn parked_ids_key(&self, consumer: &str) -> String {
        self.keyspace.factum_key("inbox-parked-ids", consumer)
    }

    fn sequence_key(&self) -> String {
        self.keyspace.factum_key("inbox-parked-sequence", "all")
    }

    async fn letter(
        &self,
        conn: &mut redis::aio::ConnectionManager,
        consumer: &str,
        id: u64,
    ) -> Result<Option<StoredMessage>, Error> {
        let key = self.parked_key(consumer);
        let value: Option<Vec<u8>> = conn
            .hget(&key, id)
            .await
            .map_err(|e| to_error(e, "read a parked message in Redis"))?;
        value.map(|bytes| decode_message(&key, &bytes)).transpose()
    }

    /// The commands that remove dead letter `letter` of `consumer`.
    fn removal(&self, consumer: &str, letter: &StoredMessage) -> Vec<redis::Cmd> {
        let mut out = vec![
            redis::cmd("HDEL")
                .arg(self.parked_key(consumer))
                .arg(letter.id)
                .to_owned(),
        ];
        if let Some(message_id) = &letter.message_id {
            out.push(
                redis::cmd("HDEL")
                    .arg(self.parked_ids_key(consumer))
                    .arg(message_id)
                    .to_owned(),
            );
        }
        out
    }
}

impl Inbox for RedisInbox {
    type Tx = RedisTx;

    async fn begin(&self, consumer: &str, message: &BusMessage) -> Result<Option<RedisTx>, Error> {
        let key = self.record_key(consumer, message.event.event_id);
        let (mut tx, exists) = RedisTx::begin(
            &self.keyspace,
            &key,
            redis::cmd("EXISTS").arg(&key).to_owned(),
            format!("inbox record {key:?}"),
        )
        .await?;
        if matches!(exists, Value::Int(1)) {
            tx.abandon().await;
            return Ok(None);
        }
        let mut record = redis::cmd("SET");
        record.arg(&key).arg(Utc::now().timestamp_millis());
        if let Some(retention) = self.retention {
            record.arg("PX").arg(
                u64::try_from(retention.as_millis())
                    .unwrap_or(u64::MAX)
                    .max(1),
            );
        }
        tx.push_internal(record);
        Ok(Some(tx))
    }

    async fn commit(&self, tx: RedisTx) -> Result<(), Error> {
        tx.exec(Vec::new(), "commit an inbox unit of work in Redis")
            .await
    }

    async fn rollback(&self, tx: RedisTx) {
        tx.abandon().await;
    }

    async fn park(&self, parked: ParkedMessage) -> Result<u64, Error> {
        let mut conn = self.keyspace.connection();
        let fail = |e| to_error(e, "park a message in Redis");
        let ids = self.parked_ids_key(&parked.consumer);
        // Parked again (same message id): the same dead letter, the latest error.
        let existing: Option<u64> = match &parked.message_id {
            Some(message_id) => conn.hget(&ids, message_id).await.map_err(fail)?,
            None => None,
        };
        let id = match existing {
            Some(id) => id,
            None => {
                let id: u64 = conn.incr(self.sequence_key(), 1).await.map_err(fail)?;
                match &parked.message_id {
                    Some(message_id) => {
                        // Of two parks at once, the first id set wins.
                        let set: bool = conn.hset_nx(&ids, message_id, id).await.map_err(fail)?;
                        if set {
                            id
                        } else {
                            conn.hget(&ids, message_id).await.map_err(fail)?
                        }
                    }
                    None => id,
                }
            }
        };
        let json = encode_message(id, &parked)?;
        conn.hset::<_, _, _, ()>(self.parked_key(&parked.consumer), id, json)
            .await
            .map_err(fail)?;
        Ok(id)
    }

    async fn parked(&self, consumer: &str) -> Result<Vec<ParkedMessage>, Error> {
        let key = self.parked_key(consumer);
        let values: Vec<Vec<u8>> = self
            .keyspace
            .connection()
            .hvals(&key)
            .await
            .map_err(|e| to_error(e, "list parked messages in Redis"))?;
        let mut letters = values
            .iter()
            .map(|v| decode_message(&key, v))
            .collect::<Result<Vec<_>, _>>()?;
        letters.sort_by_key(|l| l.id);
        letters
            .into_iter()
            .map(|l| l.into_parked(consumer, &key))
            .collect()
    }

    async fn unpark(&self, tx: &mut RedisTx, consumer: &str, id: u64) -> Result<bool, Error> {
        let mut conn = self.keyspace.connection();
        let Some(letter) = self.letter(&mut conn, consumer, id).await? else {
            return Ok(false);
        };
        for cmd in self.removal(consumer, &letter) {
            tx.push_internal(cmd);
        }
        Ok(true)
    }

    async fn discard(&self, consumer: &str, id: u64) -> Result<bool, Error> {
        let mut conn = self.keyspace.connection();
        let Some(letter) = self.letter(&mut conn, consumer, id).await? else {
            return Ok(false);
        };
        let mut pipe = redis::pipe();
        pipe.atomic();
        for cmd in self.removal(consumer, &letter) {
            pipe.add_command(cmd).ignore();
        }
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(|e| to_error(e, "discard a parked message in Redis"))?;
        Ok(true)
    }
}

/// A parked message as stored; the body in hex (it need not be UTF-8).
#[derive(Serialize, Deserialize)]
struct StoredMessage {
    id: u64,
    subject: String,
    message_id: Option<String>,
    headers: Vec<(String, String)>,
    body_hex: String,
    error: String,
    attempts: u32,
    parked_at: DateTime<Utc>,
}

impl StoredMessage {
    fn into_parked(self, consumer: &str, key: &str) -> Result<ParkedMessage, Error> {
        let body = from_hex(&self.body_hex)
            .ok_or_else(|| corrupt(key, self.body_hex.as_bytes(), "a hex-encoded body"))?;
        Ok(ParkedMessage::stored(
            self.id,
            consumer.to_owned(),
            self.subject,
            self.message_id,
            self.headers,
            body,
            self.error,
            self.attempts,
            self.parked_at,
        ))
    }
}

fn encode_message(id: u64, parked: &ParkedMessage) -> Result<String, Error> {
    serde_json::to_string(&StoredMessage {
        id,
        subject: parked.subject.clone(),
        message_id: parked.message_id.clone(),
        headers: parked.headers.clone(),
        body_hex: to_hex(&parked.body),
        error: parked.error.clone(),
        attempts: parked.attempts,
        parked_at: parked.parked_at,
    })
    .map_err(|e| Error::permanent("encode a parked message", e))
}

fn decode_message(key: &str, bytes: &[u8]) -> Result<StoredMessage, Error> {
    serde_json::from_slice(bytes).map_err(|_| corrupt(key, bytes, "a parked message (JSON)"))
}

fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

fn from_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn hex_round_trips() {
        let bytes = [0u8, 1, 0x7f, 0x80, 0xff];
        assert_eq!(super::from_hex(&super::to_hex(&bytes)).unwrap(), bytes);
        assert!(super::from_hex("abc").is_none());
        assert!(super::from_hex("zz").is_none());
    }
}
