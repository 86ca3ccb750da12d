//! Group commit: appends to other streams that arrive while an append statement is in flight
//! queue, and go out together as one statement when it returns (natural batching: no timer, no
//! added delay).
//!
//! No background task: the caller whose append finds a free statement slot runs it itself; when
//! a statement returns, the caller that ran it takes the next group from the queue and hands it
//! to one of its members, which runs it as the group's leader and replies to the others. A
//! leader whose caller is cancelled drops the others' reply channels; they then treat the
//! statement as an unknown outcome and settle it by event id, like a lost connection.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use factum::{BoxError, IdempotencyKey, StreamId};
use tokio::sync::oneshot;

use crate::store::{Prepared, Tried};

/// The queue of one store's appends waiting for a statement slot.
pub(crate) struct Queue {
    state: Mutex<State>,
    max_batch: usize,
    max_in_flight: usize,
}

struct State {
    waiting: VecDeque<Waiting>,
    /// Statements in flight (each of one append or of a group).
    in_flight: usize,
    /// The streams of the appends in flight: a stream has at most one append in flight, so two
    /// requests for one stream are never merged into one statement and keep their order.
    busy: HashSet<StreamId>,
}

/// An append waiting in the queue, with the channel its outcome goes to.
pub(crate) struct Waiting {
    pub(crate) prepared: Arc<Prepared>,
    pub(crate) reply: oneshot::Sender<Reply>,
}

/// What a waiting append receives.
pub(crate) enum Reply {
    /// Its statement ran (alone or in a group): the outcome.
    Done(Tried),
    /// It leads a group: run the statement for itself and the others, then reply to them.
    Lead(Lead),
}

/// A group handed to its leader, with the statement slot it holds: dropped unused (its leader's
/// caller cancelled before it looked), it still frees the slot, and the others then see their
/// reply channels closed.
pub(crate) struct Lead {
    pub(crate) others: Vec<Waiting>,
    pub(crate) slot: Slot,
}

/// Where [`Queue::enter`] put an append.
pub(crate) enum Entry {
    /// A slot was free and its stream idle: run the statement now, holding the slot.
    Now,
    /// Queued behind a statement in flight: the reply comes here.
    Queued(oneshot::Receiver<Reply>),
}

impl Queue {
    pub(crate) fn new(max_batch: usize, max_in_flight: usize) -> Self {
        Self {
            state: Mutex::new(State {
                waiting: VecDeque::new(),
                in_flight: 0,
                busy: HashSet::new(),
            }),
            max_batch: max_batch.max(1),
            max_in_flight: max_in_flight.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state consistent, so a poisoned lock is usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a slot for `prepared` now, or queues it.
    pub(crate) fn enter(&self, prepared: &Arc<Prepared>) -> Entry {
        let stream = &prepared.request.stream;
        let mut state = self.lock();
        let idle = !state.busy.contains(stream)
            && !state
                .waiting
                .iter()
                .any(|w| &w.prepared.request.stream == stream);
        if idle && state.in_flight < self.max_in_flight {
            state.in_flight += 1;
            state.busy.insert(stream.clone());
            return Entry::Now;
        }
        let (reply, receive) = oneshot::channel();
        state.waiting.push_back(Waiting {
            prepared: Arc::clone(prepared),
            reply,
        });
        Entry::Queued(receive)
    }

    /// Ends the statement for `streams`, and hands the slots that frees to the next groups.
    fn finish(self: &Arc<Self>, streams: &[StreamId]) {
        let mut state = self.lock();
        state.in_flight -= 1;
        for stream in streams {
            state.busy.remove(stream);
        }
        while state.in_flight < self.max_in_flight {
            let mut group = self.take_group(&mut state);
            if group.is_empty() {
                return;
            }
            // The first member still waiting leads; the others are its group.
            loop {
                if group.is_empty() {
                    state.in_flight -= 1;
                    break;
                }
                let leader = group.remove(0);
                let streams = std::iter::once(&leader)
                    .chain(&group)
                    .map(|w| w.prepared.request.stream.clone())
                    .collect();
                let lead = Lead {
                    others: group,
                    slot: Slot::new(self, streams),
                };
                match leader.reply.send(Reply::Lead(lead)) {
                    Ok(()) => break,
                    // Its caller is gone (cancelled): its append is not run. The slot is
                    // accounted for here, under the lock: it must not release itself.
                    Err(Reply::Lead(Lead { others, slot })) => {
                        slot.disarm();
                        state.busy.remove(&leader.prepared.request.stream);
                        group = others;
                    }
                    Err(Reply::Done(_)) => unreachable!("a lead was sent"),
                }
            }
        }
    }

    /// The next group: the oldest waiting appends whose streams are idle, one per stream and
    /// idempotency key, at most `max_batch`; it takes their slot and marks their streams busy.
    fn take_group(&self, state: &mut State) -> Vec<Waiting> {
        let mut group = Vec::new();
        let mut keys: HashSet<IdempotencyKey> = HashSet::new();
        let mut kept = VecDeque::with_capacity(state.waiting.len());
        while let Some(waiting) = state.waiting.pop_front() {
            if waiting.reply.is_closed() {
                // Cancelled while queued: never sent.
                continue;
            }
            let request = &waiting.prepared.request;
            let key_free = request
                .idempotency_key
                .as_ref()
                .is_none_or(|k| !keys.contains(k));
            if group.len() < self.max_batch && !state.busy.contains(&request.stream) && key_free {
                state.busy.insert(request.stream.clone());
                if let Some(key) = &request.idempotency_key {
                    keys.insert(key.clone());
                }
                group.push(waiting);
            } else {
                kept.push_back(waiting);
            }
        }
        state.waiting = kept;
        if !group.is_empty() {
            state.in_flight += 1;
        }
        group
    }
}

/// A statement slot for some streams: released (and handed on) when dropped, also when the
/// caller holding it is cancelled mid-statement.
pub(crate) struct Slot {
    queue: Option<Arc<Queue>>,
    streams: Vec<StreamId>,
}

impl Slot {
    /// The slot a caller took with [`Entry::Now`] (or one for a group being handed on).
    pub(crate) fn new(queue: &Arc<Queue>, streams: Vec<StreamId>) -> Self {
        Self {
            queue: Some(Arc::clone(queue)),
            streams,
        }
    }

    /// Drops it without releasing anything (the caller accounts for it).
    fn disarm(mut self) {
        self.queue = None;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(queue) = self.queue.take() {
            queue.finish(&self.streams);
        }
    }
}

/// A group statement's error, shared by every member whose outcome it left unknown (the sqlx
/// error is not `Clone`). Displays and chains as the error inside.
#[derive(Debug)]
pub(crate) struct Shared(pub(crate) Arc<sqlx::Error>);

impl std::fmt::Display for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&*self.0, f)
    }
}

impl std::error::Error for Shared {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// The error of a member whose leader went away before replying.
pub(crate) fn leader_gone() -> BoxError {
    "the caller running this append's group statement was cancelled before the outcome was known"
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use factum::{AppendRequest, EventId, NewEvent};

    fn prepared(stream: &str, key: Option<&str>) -> Arc<Prepared> {
        let event = NewEvent {
            event_id: EventId::new(),
            event_type: "t".into(),
            schema_version: 1,
            payload: serde_json::value::to_raw_value(&1).expect("json"),
            metadata: Default::default(),
        };
        let mut request = AppendRequest::new(StreamId::new(stream).expect("id"), vec![event]);
        if let Some(key) = key {
            request = request.idempotency_key(IdempotencyKey::new(key).expect("key"));
        }
        Arc::new(Prepared::new(request).expect("prepared"))
    }

    fn queued(entry: Entry) -> oneshot::Receiver<Reply> {
        match entry {
            Entry::Queued(receive) => receive,
            Entry::Now => panic!("expected to queue"),
        }
    }

    /// Takes the first slot for `stream`, as an append on an idle store does.
    fn now(queue: &Arc<Queue>, stream: &str) -> Slot {
        let p = prepared(stream, None);
        assert!(
            matches!(queue.enter(&p), Entry::Now),
            "expected a free slot"
        );
        Slot::new(queue, vec![p.request.stream.clone()])
    }

    /// The group handed to this waiter, with the other members' streams.
    fn lead(receive: &mut oneshot::Receiver<Reply>) -> (Vec<String>, Lead) {
        match receive.try_recv() {
            Ok(Reply::Lead(lead)) => (
                lead.others
                    .iter()
                    .map(|w| w.prepared.request.stream.as_str().to_owned())
                    .collect(),
                lead,
            ),
            Ok(Reply::Done(_)) => panic!("expected to lead, was answered"),
            Err(e) => panic!("expected to lead: {e:?}"),
        }
    }

    #[test]
    fn an_idle_store_sends_at_once_and_a_busy_one_groups_per_stream_in_order() {
        let queue = Arc::new(Queue::new(64, 1));
        let first = now(&queue, "s-a");
        // In flight: everything queues, a second request for `s-a` too.
        let mut b = queued(queue.enter(&prepared("s-b", None)));
        let mut a2 = queued(queue.enter(&prepared("s-a", None)));
        let mut c = queued(queue.enter(&prepared("s-c", None)));
        // The first statement returns: the oldest waiting request leads a group of the others
        // (the second `s-a` request among them: its stream's earlier append is done).
        drop(first);
        let (others, group) = lead(&mut b);
        assert_eq!(others, ["s-a", "s-c"]);
        assert!(a2.try_recv().is_err() && c.try_recv().is_err());
        // While that group is in flight, another `s-a` request waits for the next statement.
        let mut a3 = queued(queue.enter(&prepared("s-a", None)));
        let mut d = queued(queue.enter(&prepared("s-d", None)));
        drop(group);
        let (others, next) = lead(&mut a3);
        assert_eq!(others, ["s-d"]);
        assert!(d.try_recv().is_err());
        drop(next);
        // All done: the next append goes out at once.
        drop(now(&queue, "s-a"));
    }

    #[test]
    fn one_request_per_stream_and_key_in_a_group_and_cancelled_ones_are_skipped() {
        let queue = Arc::new(Queue::new(3, 1));
        let first = now(&queue, "s-x");
        let cancelled = queued(queue.enter(&prepared("s-gone", None)));
        let mut k1 = queued(queue.enter(&prepared("s-k1", Some("key"))));
        let mut k2 = queued(queue.enter(&prepared("s-k2", Some("key"))));
        let mut y = queued(queue.enter(&prepared("s-y", None)));
        let mut z = queued(queue.enter(&prepared("s-z", None)));
        drop(cancelled);
        drop(first);
        // Leader `s-k1`; `s-k2` has the same key, so it waits; the cap is 3 requests.
        let (others, group) = lead(&mut k1);
        assert_eq!(others, ["s-y", "s-z"]);
        assert!(k2.try_recv().is_err() && y.try_recv().is_err() && z.try_recv().is_err());
        drop(group);
        let (others, _alone) = lead(&mut k2);
        assert!(others.is_empty());
    }

    #[test]
    fn a_leader_that_is_gone_hands_the_group_on() {
        let queue = Arc::new(Queue::new(64, 1));
        let first = now(&queue, "s-1");
        let gone = queued(queue.enter(&prepared("s-2", None)));
        let mut next = queued(queue.enter(&prepared("s-3", None)));
        let mut last = queued(queue.enter(&prepared("s-4", None)));
        // Cancelled after it was queued but before the slot frees: the group skips it.
        drop(gone);
        drop(first);
        let (others, _group) = lead(&mut next);
        assert_eq!(others, ["s-4"]);
        assert!(last.try_recv().is_err());
    }

    #[test]
    fn a_lead_dropped_unread_frees_the_slot_and_closes_the_others() {
        let queue = Arc::new(Queue::new(64, 1));
        let first = now(&queue, "s-1");
        let leader = queued(queue.enter(&prepared("s-2", None)));
        let mut member = queued(queue.enter(&prepared("s-3", None)));
        drop(first);
        // The leader's caller is cancelled after the lead was sent, before it read it.
        drop(leader);
        assert!(
            matches!(member.try_recv(), Err(oneshot::error::TryRecvError::Closed)),
            "the member learns its statement will not run as planned"
        );
        // The slot and the streams are free again.
        drop(now(&queue, "s-2"));
        drop(now(&queue, "s-3"));
    }
}
