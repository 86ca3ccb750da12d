//! factum's consumer conformance suite (checkpoints, dead letters, the consumer loop) against
//! Redis: the events in memory, the checkpoints and dead letters in a fresh Redis namespace.

use factum::subscription::{CheckpointStore, DeadLetterStore, ParkedEvent};
use factum::{
    AppendRequest, AppendResult, Error, EventFilter, EventId, EventStore, EventStream,
    IdempotencyKey, InMemoryStore, LogPosition, RecordedEvent, StreamId, StreamVersion,
};
use factum_redis::{RedisCheckpoints, RedisKeyspace};

/// Events from memory; what consumers keep, in Redis.
#[derive(Clone)]
struct EventsHereConsumersInRedis {
    events: InMemoryStore,
    redis: RedisCheckpoints,
}

impl EventStore for EventsHereConsumersInRedis {
    fn append(
        &self,
        request: AppendRequest,
    ) -> impl Future<Output = Result<AppendResult, Error>> + Send {
        self.events.append(request)
    }

    fn idempotency_outcome(
        &self,
        key: &IdempotencyKey,
    ) -> impl Future<Output = Result<Option<AppendResult>, Error>> + Send {
        self.events.idempotency_outcome(key)
    }

    fn read_stream<'a>(&'a self, stream: &'a StreamId, after: StreamVersion) -> EventStream<'a> {
        self.events.read_stream(stream, after)
    }

    fn read_all(
        &self,
        after: LogPosition,
        limit: usize,
        filter: &EventFilter,
    ) -> impl Future<Output = Result<Vec<RecordedEvent>, Error>> + Send {
        self.events.read_all(after, limit, filter)
    }
}

impl CheckpointStore for EventsHereConsumersInRedis {
    fn load_checkpoint(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<LogPosition>, Error>> + Send {
        self.redis.load_checkpoint(name)
    }

    fn save_checkpoint(
        &self,
        name: &str,
        position: LogPosition,
    ) -> impl Future<Output = Result<(), Error>> + Send {
        self.redis.save_checkpoint(name, position)
    }
}

impl DeadLetterStore for EventsHereConsumersInRedis {
    fn park(&self, parked: ParkedEvent) -> impl Future<Output = Result<(), Error>> + Send {
        DeadLetterStore::park(&self.redis, parked)
    }

    fn parked(
        &self,
        subscription: &str,
    ) -> impl Future<Output = Result<Vec<ParkedEvent>, Error>> + Send {
        self.redis.parked(subscription)
    }

    fn unpark(
        &self,
        subscription: &str,
        event_id: EventId,
    ) -> impl Future<Output = Result<Option<ParkedEvent>, Error>> + Send {
        self.redis.unpark(subscription, event_id)
    }
}

factum_testkit::consumer_conformance_tests!(|| async {
    let keyspace = RedisKeyspace::connect(
        &factum_testkit::redis::shared_url(),
        &factum_testkit::redis::namespace("conformance"),
    )
    .await
    .expect("connect to Redis");
    let store = EventsHereConsumersInRedis {
        events: InMemoryStore::new(),
        redis: RedisCheckpoints::new(&keyspace),
    };
    (store, keyspace)
});
