//! [`Shredder`]: encrypts personal fields on append, decrypts them on read.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use chacha20poly1305::aead::{Aead as _, AeadCore as _, KeyInit as _, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde_json::{Map, Value, json};

use super::keys::{DynKeyStore, KeyLookup, KeyStore, SubjectKey, forgotten_error};
use super::{ENCRYPTED_KEY, FORGOTTEN_KEY, PLAINTEXT_KEY, SubjectId, marker, mentions};
use crate::error::Error;
use crate::event::{NewEvent, RecordedEvent};
use crate::ids::EventId;

const NONCE_LEN: usize = 24;
const AAD_PREFIX: &[u8] = b"factum.personal.v1\0";

/// How a [`Shredder`] caches keys.
///
/// ```
/// use std::time::Duration;
/// use factum::personal::ShredderOptions;
///
/// let options = ShredderOptions::default().cache_capacity(50_000).max_staleness(Duration::from_secs(10));
/// assert_eq!(options.staleness(), Duration::from_secs(10));
/// ```
#[derive(Clone, Copy, Debug)]
pub struct ShredderOptions {
    capacity: usize,
    max_staleness: Duration,
}

impl Default for ShredderOptions {
    /// 10,000 keys, re-read after 30 seconds.
    fn default() -> Self {
        Self {
            capacity: 10_000,
            max_staleness: Duration::from_secs(30),
        }
    }
}

impl ShredderOptions {
    /// Keeps about `keys` keys in memory (minimum 2).
    #[must_use]
    pub fn cache_capacity(mut self, keys: usize) -> Self {
        self.capacity = keys.max(2);
        self
    }

    /// Re-reads a cached key from the key store once it is older than `staleness`: the bound on
    /// how long this process may still decrypt a subject that *another* process forgot (one that
    /// this process forgets itself is dropped at once). `Duration::ZERO` reads the key store on
    /// every use.
    #[must_use]
    pub fn max_staleness(mut self, staleness: Duration) -> Self {
        self.max_staleness = staleness;
        self
    }

    /// The bound set with [`max_staleness`](Self::max_staleness).
    pub fn staleness(&self) -> Duration {
        self.max_staleness
    }
}

/// Encrypts the personal fields of events on their way into a store and decrypts them on their
/// way out; forgets subjects.
///
/// Give one to the store (`InMemoryStore::with_shredder`, `PostgresStore::with_shredder`): every
/// read of the store (aggregate loads, subscriptions, projections, replays, rebuilds) then sees
/// plaintext, or the placeholder of a forgotten subject, and every append stores ciphertext.
/// Give it to a [`Repository`](crate::Repository) with a state cache too
/// ([`Repository::with_shredder`](crate::Repository::with_shredder)), so cached states holding
/// personal data are dropped when a subject is forgotten. Clones share the key cache.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// use factum::personal::{InMemoryKeyStore, Shredder, SubjectId};
/// use factum::{EventId, EventMetadata, NewEvent, RawValue, RecordedEvent};
///
/// let shredder = Shredder::new(InMemoryKeyStore::new());
/// let payload = r#"{"email":{"factum:personal":{"subject":"c-7","value":"ada@example.com"}}}"#;
/// let mut events = vec![NewEvent {
///     event_id: EventId::new(),
///     event_type: "customer.registered".into(),
///     schema_version: 1,
///     payload: RawValue::from_string(payload.into()).unwrap(),
///     metadata: EventMetadata::default(),
/// }];
/// let subjects = shredder.seal(&mut events).await?;
/// assert_eq!(subjects, [SubjectId::new("c-7").unwrap()]);
/// assert!(!events[0].payload.get().contains("ada@example.com"));
/// # Ok::<(), factum::Error>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct Shredder {
    inner: Arc<Inner>,
}

struct Inner {
    keys: Arc<dyn DynKeyStore>,
    options: ShredderOptions,
    cache: Mutex<Cache>,
    /// Bumped whenever this process learns that a subject was forgotten.
    generation: AtomicU64,
}

impl std::fmt::Debug for Shredder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shredder")
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

/// A cached lookup: a key, or `None` for a forgotten subject (final, never re-read).
struct Cached {
    key: Option<SubjectKey>,
    fetched: Instant,
}

/// Two generations, as the repository's state cache: bounded, roughly least recently used.
#[derive(Default)]
struct Cache {
    young: HashMap<SubjectId, Cached>,
    old: HashMap<SubjectId, Cached>,
}

impl Cache {
    fn get(&self, subject: &SubjectId) -> Option<&Cached> {
        self.young.get(subject).or_else(|| self.old.get(subject))
    }

    fn put(&mut self, half: usize, subject: SubjectId, cached: Cached) {
        self.old.remove(&subject);
        if self.young.len() >= half && !self.young.contains_key(&subject) {
            self.old = std::mem::take(&mut self.young);
        }
        self.young.insert(subject, cached);
    }
}

/// What a personal field's key lookup found.
enum Found {
    Key(SubjectKey),
    Forgotten,
    Missing,
}

impl Shredder {
    /// A shredder over `keys` with the default [`ShredderOptions`].
    pub fn new(keys: impl KeyStore + 'static) -> Self {
        Self::with_options(keys, ShredderOptions::default())
    }

    /// A shredder over `keys` with `options`.
    pub fn with_options(keys: impl KeyStore + 'static, options: ShredderOptions) -> Self {
        Self {
            inner: Arc::new(Inner {
                keys: Arc::new(keys),
                options,
                cache: Mutex::new(Cache::default()),
                generation: AtomicU64::new(0),
            }),
        }
    }

    /// Its options.
    pub fn options(&self) -> ShredderOptions {
        self.inner.options
    }

    /// How many times this process learnt that a subject was forgotten (by forgetting it, or by
    /// finding its key gone): caches of decrypted data compare it to drop what they hold.
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.inner
            .cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn remember(&self, subject: &SubjectId, key: Option<SubjectKey>) {
        let half = self.inner.options.capacity / 2;
        let mut cache = self.cache();
        let was_key = cache.get(subject).is_some_and(|c| c.key.is_some());
        if key.is_none() && was_key {
            self.inner.generation.fetch_add(1, Ordering::AcqRel);
        }
        cache.put(
            half,
            subject.clone(),
            Cached {
                key,
                fetched: Instant::now(),
            },
        );
    }

    async fn find(&self, subject: &SubjectId) -> Result<Found, Error> {
        if let Some(cached) = self.cache().get(subject) {
            match &cached.key {
                None => return Ok(Found::Forgotten),
                Some(key) if cached.fetched.elapsed() <= self.inner.options.max_staleness => {
                    return Ok(Found::Key(key.clone()));
                }
                Some(_) => {}
            }
        }
        Ok(match self.inner.keys.dyn_key(subject).await? {
            KeyLookup::Key(key) => {
                self.remember(subject, Some(key.clone()));
                Found::Key(key)
            }
            KeyLookup::Forgotten => {
                self.remember(subject, None);
                Found::Forgotten
            }
            KeyLookup::Missing => Found::Missing,
        })
    }

    async fn key_for_write(&self, subject: &SubjectId) -> Result<SubjectKey, Error> {
        match self.find(subject).await? {
            Found::Key(key) => Ok(key),
            Found::Forgotten => Err(forgotten_error(subject)),
            Found::Missing => {
                let key = self
                    .inner
                    .keys
                    .dyn_create_key(subject, SubjectKey::generate()?)
                    .await?;
                self.remember(subject, Some(key.clone()));
                Ok(key)
            }
        }
    }

    /// Encrypts the personal fields (in plaintext form) of `events` in place, creating keys for
    /// subjects that have none; returns the subjects, without repeats. Events without personal
    /// fields are left as they are (one substring scan each). Fails for a forgotten subject.
    pub async fn seal(&self, events: &mut [NewEvent]) -> Result<Vec<SubjectId>, Error> {
        let mut subjects = Vec::new();
        for event in events.iter_mut() {
            if !mentions(&event.payload, PLAINTEXT_KEY) {
                continue;
            }
            let mut fields = parse_object(event.payload.get()).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "event {} ({}) has personal fields but its payload is not a JSON object",
                    event.event_id, event.event_type
                ))
            })?;
            for (name, value) in fields.iter_mut() {
                let Some(inner) = marker(value, PLAINTEXT_KEY) else {
                    continue;
                };
                let subject = inner
                    .get("subject")
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        Error::InvalidArgument(format!(
                            "personal field `{name}` of event {} has no subject",
                            event.event_id
                        ))
                    })
                    .and_then(|s| {
                        SubjectId::new(s).map_err(|e| Error::InvalidArgument(e.to_string()))
                    })?;
                let plaintext = serde_json::to_vec(inner.get("value").unwrap_or(&Value::Null))
                    .map_err(|e| Error::permanent("encrypt a personal field", e))?;
                let key = self.key_for_write(&subject).await?;
                let data = encrypt(&key, &aad(event.event_id, name, &subject), &plaintext)?;
                *value = json!({ ENCRYPTED_KEY: { "subject": subject.as_str(), "data": data } });
                if !subjects.contains(&subject) {
                    subjects.push(subject);
                }
            }
            event.payload = serde_json::value::to_raw_value(&fields)
                .map_err(|e| Error::permanent("encrypt a personal field", e))?;
        }
        Ok(subjects)
    }

    /// Decrypts the personal fields of a stored event in place: each becomes its plaintext form,
    /// or the forgotten form when its subject was forgotten. A field that fails to decrypt (a
    /// changed ciphertext, a key that is not the one it was written with) or whose subject has no
    /// key and was never forgotten is an error naming the event and field.
    pub async fn open(&self, event: &mut RecordedEvent) -> Result<(), Error> {
        if !mentions(&event.payload, ENCRYPTED_KEY) {
            return Ok(());
        }
        let Some(mut fields) = parse_object(event.payload.get()) else {
            return Ok(());
        };
        let fail = |name: &str, why: String| {
            Error::permanent(
                "decrypt a personal field",
                format!(
                    "personal field `{name}` of the event in stream `{}` at version {} (id {}, type {:?}) cannot be decrypted: {why}",
                    event.stream_id, event.stream_version, event.event_id, event.event_type
                ),
            )
        };
        let mut changed = false;
        for (name, value) in fields.iter_mut() {
            let Some(inner) = marker(value, ENCRYPTED_KEY) else {
                continue;
            };
            let subject = inner
                .get("subject")
                .and_then(Value::as_str)
                .and_then(|s| SubjectId::new(s).ok())
                .ok_or_else(|| fail(name, "it names no valid subject".into()))?;
            let data = inner.get("data").and_then(Value::as_str).unwrap_or("");
            *value = match self.find(&subject).await? {
                Found::Forgotten => json!({ FORGOTTEN_KEY: { "subject": subject.as_str() } }),
                Found::Missing => {
                    return Err(fail(
                        name,
                        format!(
                            "the key store has no key for subject `{subject}` and did not forget it (a damaged key store, or another service's events?)"
                        ),
                    ));
                }
                Found::Key(key) => {
                    let plaintext = decrypt(&key, &aad(event.event_id, name, &subject), data)
                        .map_err(|why| fail(name, why))?;
                    let plain: Value = serde_json::from_slice(&plaintext)
                        .map_err(|e| fail(name, e.to_string()))?;
                    json!({ PLAINTEXT_KEY: { "subject": subject.as_str(), "value": plain } })
                }
            };
            changed = true;
        }
        if changed {
            event.payload = serde_json::value::to_raw_value(&fields)
                .map_err(|e| Error::permanent("decrypt a personal field", e))?;
        }
        Ok(())
    }

    /// Forgets `subject`: deletes its key from the key store (for good: its personal fields read
    /// as placeholders from now on, in this process at once, in others within
    /// [`ShredderOptions::max_staleness`]). True when it had a key. Stores wrap this in their
    /// `forget_subject`, which also discards snapshots and appends the [`SubjectForgotten`]
    /// marker: call that rather than this.
    ///
    /// [`SubjectForgotten`]: super::SubjectForgotten
    pub async fn forget(&self, subject: &SubjectId) -> Result<bool, Error> {
        let had_key = self.inner.keys.dyn_forget(subject).await?;
        self.remember(subject, None);
        // Whether or not it was cached here, states decrypted before may hold its data.
        self.inner.generation.fetch_add(1, Ordering::AcqRel);
        Ok(had_key)
    }
}

fn parse_object(text: &str) -> Option<Map<String, Value>> {
    serde_json::from_str(text).ok()
}

/// The associated data: the ciphertext is only valid as this field of this event for this
/// subject (moving it to another event or field fails to decrypt).
fn aad(event_id: EventId, field: &str, subject: &SubjectId) -> Vec<u8> {
    let mut aad =
        Vec::with_capacity(AAD_PREFIX.len() + 16 + field.len() + 1 + subject.as_str().len());
    aad.extend_from_slice(AAD_PREFIX);
    aad.extend_from_slice(event_id.as_uuid().as_bytes());
    aad.extend_from_slice(field.as_bytes());
    aad.push(0);
    aad.extend_from_slice(subject.as_str().as_bytes());
    aad
}

fn encrypt(key: &SubjectKey, aad: &[u8], plaintext: &[u8]) -> Result<String, Error> {
    let cipher = XChaCha20Poly1305::new(key.as_bytes().into());
    let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
    let ciphertext = cipher
        .encrypt(
            &nonce,
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .map_err(|_| Error::permanent("encrypt a personal field", "XChaCha20-Poly1305 failed"))?;
    let mut data = Vec::with_capacity(NONCE_LEN + ciphertext.len());
    data.extend_from_slice(&nonce);
    data.extend_from_slice(&ciphertext);
    Ok(BASE64.encode(data))
}

fn decrypt(key: &SubjectKey, aad: &[u8], data: &str) -> Result<Vec<u8>, String> {
    let data = BASE64
        .decode(data)
        .map_err(|e| format!("its data is not base64 ({e})"))?;
    if data.len() < NONCE_LEN + 16 {
        return Err("its data is too short".into());
    }
    let (nonce, ciphertext) = data.split_at(NONCE_LEN);
    XChaCha20Poly1305::new(key.as_bytes().into())
        .decrypt(XNonce::from_slice(nonce), Payload { msg: ciphertext, aad })
        .map_err(|_| {
            "authentication failed (the ciphertext was changed or moved, or the key is not the one it was written with)".into()
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventMetadata;
    use crate::ids::{GlobalPosition, LogPosition, StreamId, StreamVersion};
    use crate::personal::InMemoryKeyStore;
    use serde_json::value::RawValue;

    fn new_event(payload: &str) -> NewEvent {
        NewEvent {
            event_id: EventId::new(),
            event_type: "customer.registered".into(),
            schema_version: 1,
            payload: RawValue::from_string(payload.into()).unwrap(),
            metadata: EventMetadata::default(),
        }
    }

    fn recorded(event: &NewEvent) -> RecordedEvent {
        RecordedEvent {
            event_id: event.event_id,
            stream_id: StreamId::new("customer-7").unwrap(),
            stream_version: StreamVersion::new(1),
            position: LogPosition::new(1, GlobalPosition::new(1)),
            event_type: event.event_type.clone(),
            schema_version: 1,
            payload: event.payload.clone(),
            metadata: EventMetadata::default(),
            recorded_at: chrono::Utc::now(),
        }
    }

    const PAYLOAD: &str =
        r#"{"id":"7","email":{"factum:personal":{"subject":"c-7","value":"ada@example.com"}}}"#;

    #[tokio::test]
    async fn round_trip_then_forget() {
        let keys = InMemoryKeyStore::new();
        let shredder = Shredder::new(keys.clone());
        let mut events = vec![new_event(PAYLOAD)];
        shredder.seal(&mut events).await.unwrap();
        let stored = events[0].payload.get().to_owned();
        assert!(
            !stored.contains("ada@example.com") && stored.contains(ENCRYPTED_KEY),
            "{stored}"
        );

        let mut read = recorded(&events[0]);
        shredder.open(&mut read).await.unwrap();
        assert!(read.payload.get().contains("ada@example.com"));

        // Another process forgets: this one keeps its cached key for at most `max_staleness`;
        // one that does not cache (staleness zero) sees the forgetting at once.
        let other = Shredder::with_options(
            keys.clone(),
            ShredderOptions::default().max_staleness(Duration::ZERO),
        );
        let reader = Shredder::with_options(
            keys,
            ShredderOptions::default().max_staleness(Duration::ZERO),
        );
        let mut read = recorded(&events[0]);
        reader.open(&mut read).await.unwrap();
        let before = reader.generation();
        other.forget(&SubjectId::new("c-7").unwrap()).await.unwrap();
        let mut read = recorded(&events[0]);
        reader.open(&mut read).await.unwrap();
        assert!(read.payload.get().contains(FORGOTTEN_KEY));
        assert!(!read.payload.get().contains("ada@example.com"));
        assert_eq!(
            reader.generation(),
            before + 1,
            "finding the key gone bumps the generation"
        );
        assert!(
            other.seal(&mut [new_event(PAYLOAD)]).await.is_err(),
            "no new data for a forgotten subject"
        );
    }

    #[tokio::test]
    async fn a_ciphertext_moved_to_another_event_does_not_decrypt() {
        let shredder = Shredder::new(InMemoryKeyStore::new());
        let mut events = vec![new_event(PAYLOAD), new_event(r#"{"id":"8"}"#)];
        shredder.seal(&mut events).await.unwrap();
        let mut moved = recorded(&events[1]);
        moved.payload = events[0].payload.clone();
        let error = shredder.open(&mut moved).await.unwrap_err();
        assert!(
            error.to_string().contains("decrypt")
                || format!("{error:?}").contains("authentication failed"),
            "{error:?}"
        );
    }
}
