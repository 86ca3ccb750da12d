//! [`RedisKeyspace`]: a service's part of a Redis server, and the connections to it.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use factum::Error;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Client};

use crate::error::to_error;

/// Idle dedicated connections kept for later units of work.
const MAX_IDLE: usize = 16;

/// A service's keyspace in Redis: every key it writes lives under its namespace
/// (`{namespace}:...`), the keys factum keeps for it (checkpoints, inbox records, dead letters)
/// under `{namespace}:factum:...`. Several services can so share one Redis server (or one
/// database of it) without touching each other's keys. Cheap to clone (clones share the
/// connections).
///
/// It holds a [`ConnectionManager`] (one multiplexed connection that reconnects by itself) for
/// plain commands — reads of the read model ([`connection`](Self::connection)), checkpoint
/// loads — and a small pool of dedicated connections for units of work: `WATCH` and
/// `MULTI`/`EXEC` are state of a connection, so each unit of work has one to itself.
///
/// ```no_run
/// # async fn run() -> Result<(), factum::Error> {
/// use factum_redis::RedisKeyspace;
///
/// let keyspace = RedisKeyspace::connect("redis://127.0.0.1:6379", "notifications").await?;
/// assert_eq!(keyspace.key("feed:alice"), "notifications:feed:alice");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisKeyspace {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    manager: ConnectionManager,
    namespace: String,
    config: AsyncConnectionConfig,
    idle: Mutex<Vec<MultiplexedConnection>>,
}

impl std::fmt::Debug for RedisKeyspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisKeyspace")
            .field("namespace", &self.inner.namespace)
            .field("server", &self.inner.client.get_connection_info().addr())
            .finish_non_exhaustive()
    }
}

impl RedisKeyspace {
    /// Connects to the Redis server at `url` (`redis://host:port/db`, `rediss://` needs a TLS
    /// feature of the `redis` crate) for the keys under `namespace` (e.g. the service's name).
    ///
    /// The first connection must succeed: an unreachable server is a transient error here;
    /// later losses are reconnected.
    pub async fn connect(url: &str, namespace: &str) -> Result<Self, Error> {
        let client = Client::open(url).map_err(|e| {
            Error::InvalidArgument(format!(
                "{url:?} is not a Redis URL the client accepts: {e}"
            ))
        })?;
        Self::new(client, namespace).await
    }

    /// A keyspace on an existing client (its URL, database, credentials are the caller's).
    pub async fn new(client: Client, namespace: &str) -> Result<Self, Error> {
        validate_namespace(namespace)?;
        let manager = client
            .get_connection_manager_with_config(
                ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(5)))
                    .set_response_timeout(Some(Duration::from_secs(10))),
            )
            .await
            .map_err(|e| to_error(e, "connect to Redis"))?;
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                manager,
                namespace: namespace.to_owned(),
                config: AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(5)))
                    .set_response_timeout(Some(Duration::from_secs(10))),
                idle: Mutex::new(Vec::new()),
            }),
        })
    }

    /// The namespace every key lives under.
    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    /// The full key of `name` in this keyspace: `{namespace}:{name}`. Read models should build
    /// every key with it.
    pub fn key(&self, name: &str) -> String {
        format!("{}:{name}", self.inner.namespace)
    }

    /// The shared connection (it reconnects by itself), for reading the read model and for
    /// commands outside units of work. Clones are cheap.
    pub fn connection(&self) -> ConnectionManager {
        self.inner.manager.clone()
    }

    /// The client.
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// A key factum keeps: `{namespace}:factum:{kind}:{name}`.
    pub(crate) fn factum_key(&self, kind: &str, name: &str) -> String {
        format!("{}:factum:{kind}:{name}", self.inner.namespace)
    }

    /// A dedicated connection for a unit of work: an idle one, or a new one.
    pub(crate) async fn dedicated(&self) -> Result<MultiplexedConnection, Error> {
        let idle = self
            .inner
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        match idle {
            Some(conn) => Ok(conn),
            None => self
                .inner
                .client
                .get_multiplexed_async_connection_with_config(&self.inner.config)
                .await
                .map_err(|e| to_error(e, "connect to Redis for a unit of work")),
        }
    }

    /// Forgets the idle dedicated connections (after a failure that closed them all).
    pub(crate) fn drop_idle(&self) {
        self.inner
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// Takes back a dedicated connection in a clean state (no `WATCH`, no `MULTI`).
    pub(crate) fn give_back(&self, conn: MultiplexedConnection) {
        let mut idle = self
            .inner
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if idle.len() < MAX_IDLE {
            idle.push(conn);
        }
    }
}

fn validate_namespace(namespace: &str) -> Result<(), Error> {
    let valid = !namespace.is_empty()
        && namespace.len() <= 128
        && namespace
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
    if valid {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "{namespace:?} is not a keyspace namespace: use 1 to 128 ASCII letters, digits, '-', '_', '.' or ':' (e.g. the service's name)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::validate_namespace;

    #[test]
    fn namespaces_are_plain_names() {
        assert!(validate_namespace("notifications").is_ok());
        assert!(validate_namespace("tenant-1:feeds").is_ok());
        assert!(validate_namespace("").is_err());
        assert!(validate_namespace("has space").is_err());
        assert!(validate_namespace("star*").is_err());
    }
}
