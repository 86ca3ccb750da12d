#![doc = include_str!("../README.md")]

mod checkpoint;
mod error;
mod inbox;
mod keyspace;
mod tx;

pub use checkpoint::RedisCheckpoints;
pub use error::SinkError;
pub use inbox::RedisInbox;
pub use keyspace::RedisKeyspace;
pub use tx::RedisTx;

/// The Redis client this crate is built on, for writing commands into a [`RedisTx`] and reading
/// the read model with the same version.
pub use redis;

#[doc(hidden)]
pub use tx::__set_before_exec_hook;

/// The book's "Read models in Redis" chapter, compiled so it cannot drift from the code.
#[cfg(doctest)]
#[doc = include_str!("../../docs/src/read-models-redis.md")]
mod read_models_redis_chapter {}
