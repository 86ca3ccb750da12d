//! Subject keys and where they live.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use super::SubjectId;
use crate::error::Error;
use crate::store::BoxFuture;

/// A data subject's 256-bit key. Its `Debug` prints no key material.
#[derive(Clone, PartialEq, Eq)]
pub struct SubjectKey([u8; 32]);

impl SubjectKey {
    /// A fresh random key from the operating system's generator.
    pub fn generate() -> Result<Self, Error> {
        use chacha20poly1305::aead::{KeyInit as _, OsRng};
        let key = chacha20poly1305::XChaCha20Poly1305::generate_key(&mut OsRng);
        Ok(Self(key.into()))
    }

    /// A key from its 32 bytes (e.g. as a key store keeps them).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// A key from a slice, which must be 32 bytes long.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, Error> {
        let bytes: [u8; 32] = bytes.try_into().map_err(|_| {
            Error::InvalidArgument(format!(
                "a subject key is 32 bytes, not {}: the key store holds a damaged key",
                bytes.len()
            ))
        })?;
        Ok(Self(bytes))
    }

    /// The key's bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Debug for SubjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SubjectKey(..)")
    }
}

/// What a [`KeyStore`] holds for a subject.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum KeyLookup {
    /// The subject's key.
    Key(SubjectKey),
    /// The subject was forgotten: its key is deleted for good.
    Forgotten,
    /// The store never had a key for the subject.
    Missing,
}

/// Where subjects' keys live: the service's database
/// (`factum_postgres::PgKeyStore`), memory ([`InMemoryKeyStore`]), or a KMS.
///
/// A key store remembers which subjects it forgot, so that a forgotten subject is told apart from
/// a key that was never there (a damaged or foreign key store, which is an error, not a
/// placeholder), and so that no key is created again for a forgotten subject. Backends implement
/// this trait; [`DynKeyStore`] is its dyn-compatible twin, implemented for every `KeyStore`.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a factum key store",
    note = "use `factum::personal::InMemoryKeyStore`, `factum_postgres::PgKeyStore`, or implement `factum::personal::KeyStore`"
)]
pub trait KeyStore: Send + Sync {
    /// The subject's key, or why there is none.
    fn key(&self, subject: &SubjectId) -> impl Future<Output = Result<KeyLookup, Error>> + Send;

    /// The subject's key, storing `candidate` as the key when it has none yet (concurrent callers
    /// all get the one stored). Fails with [`Error::InvalidArgument`] for a forgotten subject:
    /// its personal data is not written again (give the person a new subject id).
    fn create_key(
        &self,
        subject: &SubjectId,
        candidate: SubjectKey,
    ) -> impl Future<Output = Result<SubjectKey, Error>> + Send;

    /// Deletes the subject's key and remembers that it was forgotten; true when it had a key.
    fn forget(&self, subject: &SubjectId) -> impl Future<Output = Result<bool, Error>> + Send;
}

/// The dyn-compatible twin of [`KeyStore`], implemented for every key store: what a
/// [`Shredder`](super::Shredder) holds.
pub trait DynKeyStore: Send + Sync {
    /// [`KeyStore::key`].
    fn dyn_key<'a>(&'a self, subject: &'a SubjectId) -> BoxFuture<'a, Result<KeyLookup, Error>>;
    /// [`KeyStore::create_key`].
    fn dyn_create_key<'a>(
        &'a self,
        subject: &'a SubjectId,
        candidate: SubjectKey,
    ) -> BoxFuture<'a, Result<SubjectKey, Error>>;
    /// [`KeyStore::forget`].
    fn dyn_forget<'a>(&'a self, subject: &'a SubjectId) -> BoxFuture<'a, Result<bool, Error>>;
}

impl<K: KeyStore> DynKeyStore for K {
    fn dyn_key<'a>(&'a self, subject: &'a SubjectId) -> BoxFuture<'a, Result<KeyLookup, Error>> {
        Box::pin(self.key(subject))
    }
    fn dyn_create_key<'a>(
        &'a self,
        subject: &'a SubjectId,
        candidate: SubjectKey,
    ) -> BoxFuture<'a, Result<SubjectKey, Error>> {
        Box::pin(self.create_key(subject, candidate))
    }
    fn dyn_forget<'a>(&'a self, subject: &'a SubjectId) -> BoxFuture<'a, Result<bool, Error>> {
        Box::pin(self.forget(subject))
    }
}

/// Keys in memory: for tests, examples and single-process tools (nothing survives the
/// process, so neither do the personal fields it encrypted). Clones share the keys.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// use factum::personal::{InMemoryKeyStore, KeyLookup, KeyStore, SubjectId, SubjectKey};
///
/// let keys = InMemoryKeyStore::new();
/// let ada = SubjectId::new("customer-7").unwrap();
/// let key = keys.create_key(&ada, SubjectKey::generate()?).await?;
/// assert_eq!(keys.key(&ada).await?, KeyLookup::Key(key));
/// assert!(keys.forget(&ada).await?);
/// assert_eq!(keys.key(&ada).await?, KeyLookup::Forgotten);
/// assert!(keys.create_key(&ada, SubjectKey::generate()?).await.is_err());
/// # Ok::<(), factum::Error>(())
/// # }).unwrap();
/// ```
#[derive(Clone, Default, Debug)]
pub struct InMemoryKeyStore {
    inner: Arc<Mutex<Keys>>,
}

#[derive(Default, Debug)]
struct Keys {
    keys: HashMap<SubjectId, SubjectKey>,
    forgotten: HashSet<SubjectId>,
}

impl InMemoryKeyStore {
    /// An empty key store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Keys> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

pub(super) fn forgotten_error(subject: &SubjectId) -> Error {
    Error::InvalidArgument(format!(
        "data subject `{subject}` was forgotten: its personal data is not written again; give the person a new subject id"
    ))
}

impl KeyStore for InMemoryKeyStore {
    fn key(&self, subject: &SubjectId) -> impl Future<Output = Result<KeyLookup, Error>> + Send {
        let keys = self.lock();
        let lookup = match keys.keys.get(subject) {
            Some(key) => KeyLookup::Key(key.clone()),
            None if keys.forgotten.contains(subject) => KeyLookup::Forgotten,
            None => KeyLookup::Missing,
        };
        std::future::ready(Ok(lookup))
    }

    fn create_key(
        &self,
        subject: &SubjectId,
        candidate: SubjectKey,
    ) -> impl Future<Output = Result<SubjectKey, Error>> + Send {
        let mut keys = self.lock();
        let result = if keys.forgotten.contains(subject) {
            Err(forgotten_error(subject))
        } else {
            Ok(keys
                .keys
                .entry(subject.clone())
                .or_insert(candidate)
                .clone())
        };
        std::future::ready(result)
    }

    fn forget(&self, subject: &SubjectId) -> impl Future<Output = Result<bool, Error>> + Send {
        let mut keys = self.lock();
        keys.forgotten.insert(subject.clone());
        std::future::ready(Ok(keys.keys.remove(subject).is_some()))
    }
}
