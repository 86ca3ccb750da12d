//! realtime-communication's view in **Redis** (`factum-redis`): the open sessions and each user's
//! feed, written by consumers whose unit of work is a [`RedisTx`] — the sessions projection on
//! [`RedisCheckpoints`](factum_redis::RedisCheckpoints) (the writes and the checkpoint in one
//! `MULTI`/`EXEC`), the feeds on [`RedisInbox`](factum_redis::RedisInbox) (the writes and the
//! inbox record in one `MULTI`/`EXEC`) — so a crash never applies an event twice or half.
//!
//! Keys, in the service's keyspace (`{namespace}:...`):
//! * `sessions`: a hash, session id → the session as JSON;
//! * `feed:{user}`: a list of notifications as JSON, oldest first; `feed-users`: the users with
//!   a feed;
//! * live pushes are `PUBLISH`ed on `push:{session}` in the same `MULTI`/`EXEC` as the feed
//!   write, so a session is pushed each notification once, when it is committed.

use std::collections::BTreeMap;

use factum::subscription::{BatchFailure, BatchHandler};
use factum::{BoxError, Error, RecordedEvent};
use factum_redis::redis::{self, AsyncCommands as _};
use factum_redis::{RedisKeyspace, RedisTx};

use crate::realtime::{
    Notification, RealtimeInput, RealtimeView, SessionInfo, SessionsInput, notification, recipients,
};

fn redis_error(operation: &'static str) -> impl Fn(redis::RedisError) -> Error {
    move |e| Error::transient(operation, e)
}

/// The realtime view in Redis; clones share the connection.
#[derive(Clone, Debug)]
pub struct RedisRealtime {
    keyspace: RedisKeyspace,
}

impl RedisRealtime {
    /// The view in `keyspace`.
    pub fn new(keyspace: &RedisKeyspace) -> Self {
        Self {
            keyspace: keyspace.clone(),
        }
    }

    /// The keyspace.
    pub fn keyspace(&self) -> &RedisKeyspace {
        &self.keyspace
    }

    /// The channel a session's live pushes are published on.
    pub fn push_channel(&self, session: &str) -> String {
        self.keyspace.key(&format!("push:{session}"))
    }
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, json: &str) -> Result<T, Error> {
    serde_json::from_str(json).map_err(|e| {
        Error::permanent(
            "read the realtime view",
            format!("{key} holds {json:?}, not the view's JSON: {e}"),
        )
    })
}

impl RealtimeView for RedisRealtime {
    async fn sessions(&self) -> Result<BTreeMap<String, SessionInfo>, Error> {
        let key = self.keyspace.key("sessions");
        let raw: BTreeMap<String, String> = self
            .keyspace
            .connection()
            .hgetall(&key)
            .await
            .map_err(redis_error("read the sessions"))?;
        raw.into_iter()
            .map(|(id, json)| Ok((id, decode(&key, &json)?)))
            .collect()
    }

    async fn feeds(&self) -> Result<BTreeMap<String, Vec<Notification>>, Error> {
        let mut conn = self.keyspace.connection();
        let users: Vec<String> = conn
            .smembers(self.keyspace.key("feed-users"))
            .await
            .map_err(redis_error("read the feeds"))?;
        let mut feeds = BTreeMap::new();
        for user in users {
            let key = self.keyspace.key(&format!("feed:{user}"));
            let raw: Vec<String> = conn
                .lrange(&key, 0, -1)
                .await
                .map_err(redis_error("read a feed"))?;
            let feed = raw
                .iter()
                .map(|json| decode(&key, json))
                .collect::<Result<Vec<Notification>, Error>>()?;
            feeds.insert(user, feed);
        }
        Ok(feeds)
    }

    async fn check(&self) -> factum::health::Check {
        let pong: Result<String, _> = redis::cmd("PING")
            .query_async(&mut self.keyspace.connection())
            .await;
        match pong {
            Ok(_) => factum::health::Check::new("view", true, "redis answers"),
            Err(e) => factum::health::Check::new("view", false, format!("redis: {e}")),
        }
    }
}

/// The sessions projection into Redis (the handler of a subscription of the service's log on
/// `RedisCheckpoints`).
#[derive(Clone, Debug)]
pub struct RedisSessions;

impl BatchHandler<RedisTx> for RedisSessions {
    async fn handle_batch(
        &mut self,
        tx: &mut RedisTx,
        events: &[RecordedEvent],
    ) -> Result<(), BatchFailure> {
        let key = tx.key("sessions");
        for (i, event) in events.iter().enumerate() {
            let envelope = event
                .decode::<SessionsInput>()
                .map_err(|e| BatchFailure::at(i, e))?;
            let id = envelope.stream_id.aggregate_id().to_owned();
            match envelope.event {
                SessionsInput::Opened {
                    user,
                    topics,
                    alerts,
                } => {
                    let json = serde_json::to_string(&SessionInfo {
                        user,
                        topics,
                        alerts,
                    })
                    .map_err(|e| BatchFailure::at(i, e))?;
                    tx.pipe().hset(&key, id, json);
                }
                SessionsInput::Closed => {
                    tx.pipe().hdel(&key, id);
                }
            }
        }
        Ok(())
    }
}

/// The feeds writer into Redis (the handler of the inbound consumers on `RedisInbox`): reads the
/// committed sessions, then adds the notification to each recipient's feed and publishes it to
/// their sessions, all in the inbox's `MULTI`/`EXEC`.
#[derive(Clone, Debug)]
pub struct RedisFeeds;

impl RedisFeeds {
    async fn feed(tx: &mut RedisTx, event: &RecordedEvent) -> Result<(), BoxError> {
        let input = event.decode::<RealtimeInput>()?.event;
        let key = tx.key("sessions");
        let raw: BTreeMap<String, String> = tx.query(redis::cmd("HGETALL").arg(&key)).await?;
        let sessions = raw
            .into_iter()
            .map(|(id, json)| Ok((id, decode(&key, &json)?)))
            .collect::<Result<BTreeMap<String, SessionInfo>, Error>>()?;
        let told = serde_json::to_string(&notification(&input))?;
        for (user, sessions) in recipients(&sessions, &input) {
            let feed = tx.key(&format!("feed:{user}"));
            let users = tx.key("feed-users");
            tx.pipe().rpush(feed, &told).sadd(users, &user);
            for session in sessions {
                let channel = tx.key(&format!("push:{session}"));
                tx.pipe().publish(channel, &told);
            }
        }
        Ok(())
    }
}

impl BatchHandler<RedisTx> for RedisFeeds {
    async fn handle_batch(
        &mut self,
        tx: &mut RedisTx,
        events: &[RecordedEvent],
    ) -> Result<(), BatchFailure> {
        for event in events {
            Self::feed(tx, event)
                .await
                .map_err(BatchFailure::somewhere)?;
        }
        Ok(())
    }
}
