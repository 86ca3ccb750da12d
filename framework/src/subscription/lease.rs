//! Leases: one leader among the instances of a consumer.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use crate::error::Error;

/// The right to run a consumer, held by one instance at a time: the part of the consumer loop
/// that makes several instances of the same consumer safe to deploy.
///
/// A consumer takes its lease before it reads anything, and waits in
/// [`SubscriptionState::Standby`](super::SubscriptionState::Standby) while another instance
/// holds it, trying again every [`standby_poll`](super::ConsumerOptions::standby_poll). It
/// checks the lease is still held while it is idle; when it is lost, it goes back to standby.
/// (A lease is an optimisation of who works: exactly-once effects come from the
/// [`TransactionalCheckpoint`](super::TransactionalCheckpoint), which refuses a batch whose
/// checkpoint moved under it.)
///
/// * [`NoLease`]: every instance works (the default: a single instance).
/// * [`InMemoryLease`]: one leader among consumers in one process (tests, the embedded backend).
/// * `factum_postgres::subscription::PgLease`: a PostgreSQL advisory lock on a connection of its
///   own, released by the server when that connection ends.
pub trait Lease: Send + Sync {
    /// A held lease; dropping it releases the lease.
    type Guard: Send;

    /// Takes the lease of consumer `name` if no one holds it; `None` if another instance does.
    fn try_acquire(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<Self::Guard>, Error>> + Send;

    /// Whether `guard` still holds its lease (its connection is alive, it was not revoked).
    fn is_held(&self, guard: &mut Self::Guard) -> impl Future<Output = bool> + Send;
}

/// No lease: every instance works. What a consumer uses unless given one.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoLease;

impl Lease for NoLease {
    type Guard = ();

    fn try_acquire(&self, _name: &str) -> impl Future<Output = Result<Option<()>, Error>> + Send {
        std::future::ready(Ok(Some(())))
    }

    fn is_held(&self, _guard: &mut ()) -> impl Future<Output = bool> + Send {
        std::future::ready(true)
    }
}

/// Leases among the consumers of one process; clones share the same leases.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// use factum::subscription::{InMemoryLease, Lease};
///
/// let leases = InMemoryLease::new();
/// let mut held = leases.try_acquire("balances").await?.expect("free");
/// assert!(leases.try_acquire("balances").await?.is_none(), "one holder at a time");
/// leases.revoke("balances"); // as a lost connection would
/// assert!(!leases.is_held(&mut held).await);
/// assert!(leases.try_acquire("balances").await?.is_some());
/// # Ok::<(), factum::Error>(())
/// # }).unwrap();
/// ```
#[derive(Clone, Debug, Default)]
pub struct InMemoryLease {
    held: Arc<Mutex<Leases>>,
}

#[derive(Debug, Default)]
struct Leases {
    /// Each held lease's current token.
    holders: HashMap<String, u64>,
    next: u64,
}

/// A lease held through an [`InMemoryLease`]; dropping it releases the lease.
#[derive(Debug)]
pub struct InMemoryLeaseGuard {
    held: Arc<Mutex<Leases>>,
    name: String,
    token: u64,
}

impl InMemoryLease {
    /// No lease held.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the lease `name` away from its holder (who notices on its next check), as a lost
    /// connection would. Returns whether it was held.
    pub fn revoke(&self, name: &str) -> bool {
        self.lock().holders.remove(name).is_some()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Leases> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Lease for InMemoryLease {
    type Guard = InMemoryLeaseGuard;

    fn try_acquire(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<InMemoryLeaseGuard>, Error>> + Send {
        let mut leases = self.lock();
        let guard = if leases.holders.contains_key(name) {
            None
        } else {
            leases.next += 1;
            let token = leases.next;
            leases.holders.insert(name.to_owned(), token);
            Some(InMemoryLeaseGuard {
                held: self.held.clone(),
                name: name.to_owned(),
                token,
            })
        };
        std::future::ready(Ok(guard))
    }

    fn is_held(&self, guard: &mut InMemoryLeaseGuard) -> impl Future<Output = bool> + Send {
        let held = self.lock().holders.get(&guard.name) == Some(&guard.token);
        std::future::ready(held)
    }
}

impl Drop for InMemoryLeaseGuard {
    fn drop(&mut self) {
        let mut leases = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if leases.holders.get(&self.name) == Some(&self.token) {
            leases.holders.remove(&self.name);
        }
    }
}
