//! Idempotency: the primitive every retry and replay stands on.
//!
//! Two tools, used together:
//!
//! * **Derived ids.** The events of a command get ids derived from the command's id and their
//!   index ([`EventId::derived`]), and the commands a process manager issues get ids derived from
//!   the event that triggered them ([`CommandId::derived`]). Executing or replaying the same thing
//!   again produces the same ids, and a store never keeps an event id twice.
//! * **Idempotency keys.** An [`AppendRequest`](crate::AppendRequest) may carry an
//!   [`IdempotencyKey`]. The store keeps the key with the batch, atomically, and a repeated
//!   request with the same key stores nothing and returns the original outcome, even after the
//!   stream moved on. A [`Repository`](crate::Repository) uses the command's key
//!   ([`CommandContext::with_idempotency_key`](crate::CommandContext::with_idempotency_key) or
//!   [`idempotent`](crate::CommandContext::idempotent)) so that executing the same command twice,
//!   after an unknown outcome or from two processes at once, stores its events once and returns
//!   the same [`Committed`](crate::Committed).
//!
//! Keys are kept until an explicit retention call removes them (e.g.
//! [`InMemoryStore::expire_idempotency_keys`](crate::InMemoryStore::expire_idempotency_keys)).
//!
//! ```
//! use factum::{CommandId, EventId, IdempotencyKey};
//!
//! let command = CommandId::new();
//! // The same command id always gives the same event ids.
//! assert_eq!(EventId::derived(command, 0), EventId::derived(command, 0));
//! assert_ne!(EventId::derived(command, 0), EventId::derived(command, 1));
//! let key = IdempotencyKey::new("order-7/checkout").unwrap();
//! assert_eq!(key.as_str(), "order-7/checkout");
//! ```

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ids::{CommandId, EventId};

/// The longest [`IdempotencyKey`], in bytes.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 256;

/// Names one logical write, so that repeating it stores nothing twice: a request id from a
/// client, a message id from a broker, a command id.
///
/// Non-empty, at most [`MAX_IDEMPOTENCY_KEY_LEN`] bytes, no control characters. Keys are global
/// to a store (one namespace per PostgreSQL schema): prefix them when several kinds of writer
/// share a store.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct IdempotencyKey(String);

/// Why a string is not a valid [`IdempotencyKey`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "idempotency key {0:?} is invalid: it must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} bytes with no control characters"
)]
pub struct InvalidIdempotencyKey(pub String);

impl IdempotencyKey {
    /// Checks and wraps a key.
    pub fn new(key: impl Into<String>) -> Result<Self, InvalidIdempotencyKey> {
        let key = key.into();
        if key.is_empty()
            || key.len() > MAX_IDEMPOTENCY_KEY_LEN
            || key.chars().any(char::is_control)
        {
            return Err(InvalidIdempotencyKey(key));
        }
        Ok(Self(key))
    }

    /// The key of a command: `"command:{id}"`.
    pub fn for_command(id: CommandId) -> Self {
        Self(format!("command:{id}"))
    }

    /// The key as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdempotencyKey({:?})", self.0)
    }
}

impl<'de> Deserialize<'de> for IdempotencyKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Self::new(String::deserialize(deserializer)?).map_err(serde::de::Error::custom)
    }
}

/// The namespace of factum's name-based ids (UUID v5): fixed forever, since stored ids depend on
/// it.
const NAMESPACE: Uuid = Uuid::from_u128(0x6661_6374_756d_4000_8000_6964_656d_706f);

/// A name-based UUID (v5) of `parent` and `index`, in a namespace per `kind`.
pub(crate) fn derive(kind: &[u8], parent: Uuid, index: u32) -> Uuid {
    let mut name = Vec::with_capacity(kind.len() + 20);
    name.extend_from_slice(kind);
    name.extend_from_slice(parent.as_bytes());
    name.extend_from_slice(&index.to_be_bytes());
    Uuid::new_v5(&NAMESPACE, &name)
}

impl EventId {
    /// The id of the `index`-th event (from 0) a command produces: a name-based UUID (v5) of the
    /// command id and the index, so executing the same command again yields the same ids.
    pub fn derived(command: CommandId, index: u32) -> Self {
        Self::from_uuid(derive(b"event", command.as_uuid(), index))
    }
}

impl CommandId {
    /// The id of the `index`-th command (from 0) issued in reaction to an event: a name-based
    /// UUID (v5) of the event id and the index, so replaying a process manager issues the same
    /// command ids.
    pub fn derived(event: EventId, index: u32) -> Self {
        Self::from_uuid(derive(b"command", event.as_uuid(), index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_ids_are_stable_and_distinct() {
        let command = CommandId::from_uuid(Uuid::from_u128(1));
        assert_eq!(EventId::derived(command, 0), EventId::derived(command, 0));
        assert_ne!(EventId::derived(command, 0), EventId::derived(command, 1));
        assert_ne!(
            EventId::derived(command, 0).as_uuid(),
            CommandId::derived(EventId::from_uuid(command.as_uuid()), 0).as_uuid()
        );
        assert_eq!(EventId::derived(command, 0).as_uuid().get_version_num(), 5);
    }

    #[test]
    fn derivation_is_pinned() {
        // Computed independently (SHA-1 of namespace, "event", the command's bytes and the
        // index, as RFC 9562 v5): a change here would break the idempotency of every command
        // retried across an upgrade.
        let command = CommandId::from_uuid(Uuid::from_u128(1));
        assert_eq!(
            EventId::derived(command, 0).to_string(),
            "56a48c61-c595-54cb-8215-a521d42fb4a6"
        );
    }

    #[test]
    fn keys_are_checked() {
        assert!(IdempotencyKey::new("").is_err());
        assert!(IdempotencyKey::new("a\nb").is_err());
        assert!(IdempotencyKey::new("x".repeat(MAX_IDEMPOTENCY_KEY_LEN + 1)).is_err());
        assert!(IdempotencyKey::new("x".repeat(MAX_IDEMPOTENCY_KEY_LEN)).is_ok());
        let json = serde_json::to_string(&IdempotencyKey::new("k").unwrap()).unwrap();
        assert_eq!(json, "\"k\"");
        assert!(serde_json::from_str::<IdempotencyKey>("\"\"").is_err());
    }
}
