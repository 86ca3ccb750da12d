//! One command at a time per aggregate within a repository.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::ids::StreamId;

/// A FIFO lock per stream, created on first use and dropped when nobody holds or waits for it,
/// so it costs memory only for the aggregates that have commands in flight.
#[derive(Default)]
pub(super) struct Turns {
    streams: Mutex<HashMap<StreamId, Entry>>,
}

struct Entry {
    lock: Arc<tokio::sync::Mutex<()>>,
    /// Commands holding or waiting for the lock.
    users: usize,
}

/// A command's turn on its aggregate: the next one waits until this is dropped.
pub(super) struct Turn<'a> {
    _guard: tokio::sync::OwnedMutexGuard<()>,
    _registered: Registered<'a>,
}

/// Counts a command among the users of its stream's lock from before it waits, so that a
/// command cancelled while waiting still leaves the count right.
struct Registered<'a> {
    turns: &'a Turns,
    stream: StreamId,
}

impl Turns {
    fn streams(&self) -> MutexGuard<'_, HashMap<StreamId, Entry>> {
        // Each critical section is one map operation: a poisoned lock is still consistent.
        self.streams.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for the turn on `stream`, in arrival order (tokio's mutex is fair).
    pub(super) async fn take(&self, stream: &StreamId) -> Turn<'_> {
        let lock = {
            let mut streams = self.streams();
            let entry = streams.entry(stream.clone()).or_insert_with(|| Entry {
                lock: Arc::default(),
                users: 0,
            });
            entry.users += 1;
            Arc::clone(&entry.lock)
        };
        let registered = Registered {
            turns: self,
            stream: stream.clone(),
        };
        Turn {
            _guard: lock.lock_owned().await,
            _registered: registered,
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.streams().len()
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        let mut streams = self.turns.streams();
        if let Some(entry) = streams.get_mut(&self.stream) {
            entry.users -= 1;
            if entry.users == 0 {
                streams.remove(&self.stream);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    fn stream(s: &str) -> StreamId {
        StreamId::new(s).expect("id")
    }

    fn poll_once<F: Future>(f: std::pin::Pin<&mut F>) -> Poll<F::Output> {
        f.poll(&mut Context::from_waker(Waker::noop()))
    }

    #[test]
    fn one_turn_per_stream_in_order_and_nothing_left_behind() {
        let turns = Turns::default();
        let a = stream("t-a");
        let Poll::Ready(first) = poll_once(pin!(turns.take(&a))) else {
            panic!("a free stream's turn is immediate");
        };
        // Another stream is not held up.
        let Poll::Ready(other) = poll_once(pin!(turns.take(&stream("t-b")))) else {
            panic!("another stream's turn is immediate");
        };
        let mut second = pin!(turns.take(&a));
        assert!(poll_once(second.as_mut()).is_pending());
        // A waiter cancelled while waiting leaves nothing behind.
        {
            let mut cancelled = pin!(turns.take(&a));
            assert!(poll_once(cancelled.as_mut()).is_pending());
        }
        drop(first);
        let Poll::Ready(second) = poll_once(second.as_mut()) else {
            panic!("the next command gets the turn when the first is done");
        };
        drop(second);
        drop(other);
        assert_eq!(turns.len(), 0);
    }
}
