//! The repository's bounded cache of aggregate states between commands.

use std::collections::HashMap;
use std::sync::Mutex;

use super::Loaded;
use crate::ids::StreamId;

/// Aggregate states by stream, bounded to about `capacity` entries.
///
/// Two generations approximate least-recently-used eviction in O(1): entries go into the young
/// map; when it holds half the capacity it becomes the old map and the previous old map (the
/// states not used since) is dropped. A command *takes* its stream's entry out, so two commands on
/// one aggregate never share a state (the repository runs them one at a time anyway: the next one
/// takes what the previous one put back).
pub(super) struct StateCache<A> {
    generations: Mutex<Generations<A>>,
    half: usize,
    clone: fn(&A) -> A,
}

/// When a cached state was decrypted from the store: the shredder's generation then, and the
/// time (see `Repository::with_shredder`). `None` for states that hold no personal data.
pub(super) type Stamp = Option<(u64, std::time::Instant)>;

struct Generations<A> {
    young: HashMap<StreamId, (Loaded<A>, Stamp)>,
    old: HashMap<StreamId, (Loaded<A>, Stamp)>,
}

impl<A> StateCache<A> {
    pub(super) fn new(capacity: usize, clone: fn(&A) -> A) -> Self {
        Self {
            generations: Mutex::new(Generations {
                young: HashMap::new(),
                old: HashMap::new(),
            }),
            half: (capacity / 2).max(1),
            clone,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Generations<A>> {
        // A panic while holding the lock leaves the maps consistent (each operation is one map
        // call), so a poisoned lock is still usable.
        self.generations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Removes and returns the state cached for `stream`, with its stamp.
    pub(super) fn take(&self, stream: &StreamId) -> Option<(Loaded<A>, Stamp)> {
        let mut generations = self.lock();
        generations
            .young
            .remove(stream)
            .or_else(|| generations.old.remove(stream))
    }

    /// A copy of `state` (the aggregate's `Clone`).
    pub(super) fn copy(&self, state: &A) -> A {
        (self.clone)(state)
    }

    /// Caches `loaded` unless a state at least as new is already cached.
    pub(super) fn put(&self, loaded: Loaded<A>, stamp: Stamp) {
        let mut generations = self.lock();
        let newer_cached = generations
            .young
            .get(&loaded.stream_id)
            .or_else(|| generations.old.get(&loaded.stream_id))
            .is_some_and(|(cached, _)| cached.version >= loaded.version);
        if newer_cached {
            return;
        }
        generations.old.remove(&loaded.stream_id);
        if generations.young.len() >= self.half {
            generations.old = std::mem::take(&mut generations.young);
        }
        generations
            .young
            .insert(loaded.stream_id.clone(), (loaded, stamp));
    }

    /// How many states are cached.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        let generations = self.lock();
        generations.young.len() + generations.old.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::StreamVersion;

    fn loaded(id: &str, version: u64, state: u32) -> Loaded<u32> {
        Loaded {
            stream_id: StreamId::new(format!("t-{id}")).expect("id"),
            state,
            version: StreamVersion::new(version),
        }
    }

    #[test]
    fn take_removes_the_entry() {
        let cache = StateCache::new(10, Clone::clone);
        cache.put(loaded("a", 3, 30), None);
        let (taken, _) = cache.take(&loaded("a", 0, 0).stream_id).expect("cached");
        assert_eq!((taken.version.get(), taken.state), (3, 30));
        assert!(cache.take(&taken.stream_id).is_none());
    }

    #[test]
    fn an_older_state_never_replaces_a_newer_one() {
        let cache = StateCache::new(10, Clone::clone);
        cache.put(loaded("a", 5, 50), None);
        cache.put(loaded("a", 4, 40), None);
        let (taken, _) = cache.take(&loaded("a", 0, 0).stream_id).expect("cached");
        assert_eq!(taken.version.get(), 5);
    }

    #[test]
    fn stays_within_capacity_and_keeps_recent_entries() {
        let cache = StateCache::new(10, Clone::clone);
        for i in 0..100 {
            cache.put(loaded(&i.to_string(), 1, i), None);
            assert!(cache.len() <= 10, "{} entries", cache.len());
        }
        assert!(cache.take(&loaded("99", 0, 0).stream_id).is_some());
        assert!(cache.take(&loaded("0", 0, 0).stream_id).is_none());
    }
}
