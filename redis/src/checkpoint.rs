//! [`RedisCheckpoints`]: the consumer loop's transactional checkpoint in Redis.

use chrono::{DateTime, Utc};
use factum::subscription::{
    BatchHandler, Begun, CheckpointStore, DeadLetterStore, ParkedEvent, TransactionalCheckpoint,
};
use factum::{
    Error, EventId, EventMetadata, GlobalPosition, LogPosition, RawValue, RecordedEvent, StreamId,
    StreamVersion,
};
use redis::{AsyncCommands as _, Value};
use serde::{Deserialize, Serialize};

use crate::error::{corrupt, to_error};
use crate::{RedisKeyspace, RedisTx};

/// Redis's [`TransactionalCheckpoint`]: a consumer's checkpoint is a key
/// (`{namespace}:factum:checkpoint:{consumer}`, holding `commit:global`), and each unit of work
/// is a [`RedisTx`] on a dedicated connection that `WATCH`es it from `begin` and applies the
/// handler's buffered writes, the parked events and the checkpoint move in one `MULTI`/`EXEC`.
///
/// So a handler writing through the [`RedisTx`] applies each event **exactly once**:
/// * a crash before `EXEC` leaves nothing (Redis discards a `MULTI` whose connection closed),
///   and the batch is handled again from the unchanged checkpoint;
/// * after `EXEC`, the writes and the checkpoint stand together (in memory, in an RDB snapshot
///   and in the AOF alike: a Redis restart never finds one without the other);
/// * a second instance that moved the checkpoint first makes `begin` report
///   [`Begun::Moved`], or makes `EXEC` apply nothing (the commit fails with a transient
///   [`SinkError::Moved`](crate::SinkError::Moved) and the consumer resumes from the stored
///   checkpoint): two instances may run without a lease and still apply nothing twice.
///
/// It is also a plain [`CheckpointStore`] (for a consumer whose effects are elsewhere).
///
/// Parked events go to the hash `{namespace}:factum:parked:{consumer}` (event id → the event
/// and the error, as JSON), in the same `MULTI`/`EXEC` as the checkpoint that moves past them.
/// It is also the consumer's [`DeadLetterStore`], and [`retry_parked`](Self::retry_parked)
/// applies a parked event again once the handler is fixed.
///
/// ```no_run
/// use factum::subscription::{BatchFailure, BatchHandler, Subscription};
/// use factum::{InMemoryStore, RecordedEvent};
/// use factum_redis::{RedisCheckpoints, RedisKeyspace, RedisTx};
///
/// /// Counts events per stream in the hash `{namespace}:counts`.
/// struct Counts;
///
/// impl BatchHandler<RedisTx> for Counts {
///     async fn handle_batch(&mut self, tx: &mut RedisTx, events: &[RecordedEvent]) -> Result<(), BatchFailure> {
///         let key = tx.key("counts");
///         for event in events {
///             tx.pipe().hincr(&key, event.stream_id.as_str(), 1);
///         }
///         Ok(())
///     }
/// }
///
/// # async fn run(store: InMemoryStore) -> Result<(), factum::Error> {
/// let keyspace = RedisKeyspace::connect("redis://127.0.0.1:6379", "reports").await?;
/// let mut subscription = Subscription::with_checkpoints("counts", store, RedisCheckpoints::new(&keyspace));
/// subscription.run(Counts, std::future::pending::<()>()).await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct RedisCheckpoints {
    keyspace: RedisKeyspace,
}

impl RedisCheckpoints {
    /// Checkpoints, units of work and dead letters in `keyspace`.
    pub fn new(keyspace: &RedisKeyspace) -> Self {
        Self {
            keyspace: keyspace.clone(),
        }
    }

    /// The keyspace.
    pub fn keyspace(&self) -> &RedisKeyspace {
        &self.keyspace
    }

    /// The key of consumer `name`'s checkpoint.
    pub fn checkpoint_key(&self, name: &str) -> String {
        self.keyspace.factum_key("checkpoint", name)
    }

    /// The key of consumer `name`'s parked events (a hash by event id).
    pub fn parked_key(&self, name: &str) -> String {
        self.keyspace.factum_key("parked", name)
    }

    /// Applies parked event `event_id` of consumer `name` again with `handler` (after it was
    /// fixed), in one unit of work with its removal from the dead letters; the checkpoint does
    /// not move. `Ok(false)` when it is not parked (any more); an error (it stays parked) when
    /// the handler still fails on it.
    pub async fn retry_parked<H: BatchHandler<RedisTx>>(
        &self,
        name: &str,
        event_id: EventId,
        mut handler: H,
    ) -> Result<bool, Error> {
        let key = self.parked_key(name);
        let field = event_id.to_string();
        let (mut tx, stored) = RedisTx::begin(
            &self.keyspace,
            &key,
            redis::cmd("HGET").arg(&key).arg(&field).to_owned(),
            format!("parked event {field} of {name:?}"),
        )
        .await?;
        let Value::BulkString(bytes) = stored else {
            tx.abandon().await;
            return Ok(false);
        };
        let parked = decode_parked(&key, &bytes)?;
        let event = &parked.event;
        if let Err(source) = handler.handle_one(&mut tx, event).await {
            tx.abandon().await;
            return Err(Error::Handler {
                subscription: name.to_owned(),
                stream: event.stream_id.clone(),
                version: event.stream_version,
                event_type: event.event_type.clone(),
                event_id: event.event_id,
                position: event.position,
                attempts: 1,
                source,
            });
        }
        let unpark = redis::cmd("HDEL").arg(&key).arg(&field).to_owned();
        tx.exec(vec![unpark], "retry a parked event in Redis")
            .await?;
        Ok(true)
    }
}

fn encode_position(position: LogPosition) -> String {
    format!("{}:{}", position.commit, position.global.get())
}

fn decode_position(key: &str, bytes: &[u8]) -> Result<LogPosition, Error> {
    let parsed = std::str::from_utf8(bytes).ok().and_then(|text| {
        let (commit, global) = text.split_once(':')?;
        Some(LogPosition::new(
            commit.parse().ok()?,
            GlobalPosition::new(global.parse().ok()?),
        ))
    });
    parsed.ok_or_else(|| corrupt(key, bytes, "a checkpoint `commit:global`"))
}

fn stored_position(key: &str, value: Value) -> Result<Option<LogPosition>, Error> {
    match value {
        Value::Nil => Ok(None),
        Value::BulkString(bytes) => decode_position(key, &bytes).map(Some),
        Value::SimpleString(text) => decode_position(key, text.as_bytes()).map(Some),
        other => Err(corrupt(
            key,
            format!("{other:?}").as_bytes(),
            "a checkpoint",
        )),
    }
}

impl TransactionalCheckpoint for RedisCheckpoints {
    type Tx = RedisTx;

    async fn load(&self, name: &str) -> Result<Option<LogPosition>, Error> {
        let key = self.checkpoint_key(name);
        let value: Value = self
            .keyspace
            .connection()
            .get(&key)
            .await
            .map_err(|e| to_error(e, "load a checkpoint from Redis"))?;
        stored_position(&key, value)
    }

    async fn reset(&self, name: &str, position: LogPosition) -> Result<(), Error> {
        self.keyspace
            .connection()
            .set::<_, _, ()>(self.checkpoint_key(name), encode_position(position))
            .await
            .map_err(|e| to_error(e, "save a checkpoint in Redis"))
    }

    async fn begin(&self, name: &str, expected: LogPosition) -> Result<Begun<RedisTx>, Error> {
        let key = self.checkpoint_key(name);
        let (tx, stored) = RedisTx::begin(
            &self.keyspace,
            &key,
            redis::cmd("GET").arg(&key).to_owned(),
            format!("checkpoint {key:?}"),
        )
        .await?;
        match stored_position(&key, stored) {
            // A checkpoint deleted by hand is recreated at `expected` by the commit (and the
            // WATCH still catches another instance creating it meanwhile).
            Ok(None) => Ok(Begun::Ready(tx)),
            Ok(Some(stored)) if stored == expected => Ok(Begun::Ready(tx)),
            Ok(Some(stored)) => {
                tx.abandon().await;
                Ok(Begun::Moved(stored))
            }
            Err(error) => {
                tx.abandon().await;
                Err(error)
            }
        }
    }

    async fn park(&self, tx: &mut RedisTx, parked: ParkedEvent) -> Result<(), Error> {
        let key = self.parked_key(&parked.subscription);
        let json = encode_parked(&parked)?;
        tx.push_internal(
            redis::cmd("HSET")
                .arg(&key)
                .arg(parked.event.event_id.to_string())
                .arg(json)
                .to_owned(),
        );
        Ok(())
    }

    async fn commit(&self, tx: RedisTx, name: &str, position: LogPosition) -> Result<(), Error> {
        let set = redis::cmd("SET")
            .arg(self.checkpoint_key(name))
            .arg(encode_position(position))
            .to_owned();
        tx.exec(vec![set], "commit a unit of work in Redis").await
    }

    async fn rollback(&self, tx: RedisTx) {
        tx.abandon().await;
    }
}

impl CheckpointStore for RedisCheckpoints {
    async fn load_checkpoint(&self, name: &str) -> Result<Option<LogPosition>, Error> {
        TransactionalCheckpoint::load(self, name).await
    }

    async fn save_checkpoint(&self, name: &str, position: LogPosition) -> Result<(), Error> {
        TransactionalCheckpoint::reset(self, name, position).await
    }
}

impl DeadLetterStore for RedisCheckpoints {
    async fn park(&self, parked: ParkedEvent) -> Result<(), Error> {
        let json = encode_parked(&parked)?;
        self.keyspace
            .connection()
            .hset::<_, _, _, ()>(
                self.parked_key(&parked.subscription),
                parked.event.event_id.to_string(),
                json,
            )
            .await
            .map_err(|e| to_error(e, "park an event in Redis"))
    }

    async fn parked(&self, subscription: &str) -> Result<Vec<ParkedEvent>, Error> {
        let key = self.parked_key(subscription);
        let values: Vec<Vec<u8>> = self
            .keyspace
            .connection()
            .hvals(&key)
            .await
            .map_err(|e| to_error(e, "list parked events in Redis"))?;
        let mut parked = values
            .iter()
            .map(|v| decode_parked(&key, v))
            .collect::<Result<Vec<_>, _>>()?;
        parked.sort_by_key(|p| (p.parked_at, p.event.position));
        Ok(parked)
    }

    async fn unpark(
        &self,
        subscription: &str,
        event_id: EventId,
    ) -> Result<Option<ParkedEvent>, Error> {
        let key = self.parked_key(subscription);
        let field = event_id.to_string();
        let mut conn = self.keyspace.connection();
        // HGET and HDEL in one transaction: of two unparks, one gets the event.
        let (value, removed): (Option<Vec<u8>>, u32) = redis::pipe()
            .atomic()
            .hget(&key, &field)
            .hdel(&key, &field)
            .query_async(&mut conn)
            .await
            .map_err(|e| to_error(e, "unpark an event in Redis"))?;
        match value {
            Some(bytes) if removed == 1 => decode_parked(&key, &bytes).map(Some),
            _ => Ok(None),
        }
    }
}

/// A parked event as stored: the event whole (Redis has no events table to join), the error.
#[derive(Serialize, Deserialize)]
struct StoredParked {
    subscription: String,
    error: String,
    attempts: u32,
    parked_at: DateTime<Utc>,
    event_id: EventId,
    stream_id: StreamId,
    stream_version: StreamVersion,
    position: LogPosition,
    event_type: String,
    schema_version: u32,
    payload: Box<RawValue>,
    metadata: EventMetadata,
    recorded_at: DateTime<Utc>,
}

fn encode_parked(parked: &ParkedEvent) -> Result<String, Error> {
    let e = &parked.event;
    serde_json::to_string(&StoredParked {
        subscription: parked.subscription.clone(),
        error: parked.error.clone(),
        attempts: parked.attempts,
        parked_at: parked.parked_at,
        event_id: e.event_id,
        stream_id: e.stream_id.clone(),
        stream_version: e.stream_version,
        position: e.position,
        event_type: e.event_type.clone(),
        schema_version: e.schema_version,
        payload: e.payload.clone(),
        metadata: e.metadata.clone(),
        recorded_at: e.recorded_at,
    })
    .map_err(|e| Error::permanent("encode a parked event", e))
}

fn decode_parked(key: &str, bytes: &[u8]) -> Result<ParkedEvent, Error> {
    let stored: StoredParked =
        serde_json::from_slice(bytes).map_err(|_| corrupt(key, bytes, "a parked event (JSON)"))?;
    Ok(ParkedEvent {
        subscription: stored.subscription,
        error: stored.error,
        attempts: stored.attempts,
        parked_at: stored.parked_at,
        event: RecordedEvent {
            event_id: stored.event_id,
            stream_id: stored.stream_id,
            stream_version: stored.stream_version,
            position: stored.position,
            event_type: stored.event_type,
            schema_version: stored.schema_version,
            payload: stored.payload,
            metadata: stored.metadata,
            recorded_at: stored.recorded_at,
        },
    })
}
