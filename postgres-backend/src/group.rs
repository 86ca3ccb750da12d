//! Natural batching of statements: requests that arrive while a statement of their kind is in
//! flight queue, and go out together as one statement when it returns (no timer, no added
//! delay). Group commit batches appends; batched reads batch stream reads (loads).
//!
//! No background task: the caller whose request finds a free statement slot runs it itself;
//! when a statement returns, its slot goes to the oldest waiting request, which leads the next
//! group: it lets the tasks already woken run first (one yield, no timer), then gathers what is
//! waiting at that moment (the requests of the statement that just returned are back by then,
//! so a closed loop of clients does not split into alternating halves), runs the statement and
//! replies to the others. A leader whose caller is cancelled before it gathers frees the slot
//! for the next one; after it gathers, it drops the others' reply channels: an append then
//! treats the statement as an unknown outcome and settles it by event id, like a lost
//! connection; a read runs its own statement.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use factum::{BoxError, IdempotencyKey, StreamId};
use tokio::sync::oneshot;

/// A request that can share a statement with others of its kind.
pub(crate) trait Member: Send + Sync + 'static {
    /// What a member whose statement ran receives.
    type Outcome: Send + 'static;

    /// The stream of a request that must be alone for its stream: in at most one statement in
    /// flight and never twice in one (appends). `None`: any number may share (reads).
    fn exclusive_stream(&self) -> Option<&StreamId>;

    /// An idempotency key that must not appear twice in one statement.
    fn key(&self) -> Option<&IdempotencyKey> {
        None
    }
}

/// The queue of one store's requests of one kind waiting for a statement slot.
pub(crate) struct Queue<M: Member> {
    state: Mutex<State<M>>,
    max_batch: usize,
    max_in_flight: usize,
}

struct State<M: Member> {
    waiting: VecDeque<Waiting<M>>,
    /// Statements in flight (each of one request or of a group).
    in_flight: usize,
    /// The exclusive streams of the requests in flight: such a stream has at most one request
    /// in flight, so two appends to one stream are never merged into one statement and keep
    /// their order.
    busy: HashSet<StreamId>,
}

/// A request waiting in the queue, with the channel its outcome goes to.
pub(crate) struct Waiting<M: Member> {
    pub(crate) member: Arc<M>,
    pub(crate) reply: oneshot::Sender<Reply<M>>,
}

/// What a waiting request receives.
pub(crate) enum Reply<M: Member> {
    /// Its statement ran (alone or in a group): the outcome.
    Done(M::Outcome),
    /// It leads the next group: gather the others ([`Queue::gather`]), run the statement for
    /// itself and them, then reply to them. The slot is the statement slot it holds: dropped
    /// unused (its caller cancelled), it frees the slot for the next waiting request.
    Lead(Slot<M>),
}

/// Where [`Queue::enter`] put a request.
pub(crate) enum Entry<M: Member> {
    /// A slot was free (and its stream idle): run the statement now, holding the slot.
    Now(Slot<M>),
    /// Queued behind a statement in flight: the reply comes here.
    Queued(oneshot::Receiver<Reply<M>>),
}

impl<M: Member> Queue<M> {
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

    fn lock(&self) -> MutexGuard<'_, State<M>> {
        // Every critical section leaves the state consistent, so a poisoned lock is usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a slot for `member` now, or queues it.
    pub(crate) fn enter(self: &Arc<Self>, member: &Arc<M>) -> Entry<M> {
        let stream = member.exclusive_stream();
        let mut state = self.lock();
        // A free slot goes to a newcomer only when nobody waits: the waiting ones get the slots
        // as statements return, so none is overtaken.
        if state.waiting.is_empty()
            && state.in_flight < self.max_in_flight
            && stream.is_none_or(|s| !state.busy.contains(s))
        {
            state.in_flight += 1;
            let streams: Vec<StreamId> = stream.cloned().into_iter().collect();
            state.busy.extend(streams.iter().cloned());
            return Entry::Now(Slot::new(self, streams));
        }
        let (reply, receive) = oneshot::channel();
        state.waiting.push_back(Waiting {
            member: Arc::clone(member),
            reply,
        });
        Entry::Queued(receive)
    }

    /// Ends the statement for `streams`, and hands the slots that frees to leaders of the next
    /// groups: as many as the waiting requests need (a group holds up to `max_batch`).
    fn finish(self: &Arc<Self>, streams: &[StreamId]) {
        let mut guard = self.lock();
        let state = &mut *guard;
        state.in_flight -= 1;
        for stream in streams {
            state.busy.remove(stream);
        }
        state.waiting.retain(|w| !w.reply.is_closed());
        let mut groups = state.waiting.len().div_ceil(self.max_batch);
        while groups > 0 && state.in_flight < self.max_in_flight {
            let Some(at) = state.waiting.iter().position(|w| {
                w.member
                    .exclusive_stream()
                    .is_none_or(|s| !state.busy.contains(s))
            }) else {
                return;
            };
            let Some(leader) = state.waiting.remove(at) else {
                return;
            };
            let streams: Vec<StreamId> = leader
                .member
                .exclusive_stream()
                .cloned()
                .into_iter()
                .collect();
            state.in_flight += 1;
            state.busy.extend(streams.iter().cloned());
            match leader
                .reply
                .send(Reply::Lead(Slot::new(self, streams.clone())))
            {
                Ok(()) => groups -= 1,
                // Its caller is gone (cancelled): its request is not run. The slot is accounted
                // for here, under the lock: it must not release itself.
                Err(Reply::Lead(slot)) => {
                    slot.disarm();
                    state.in_flight -= 1;
                    for stream in &streams {
                        state.busy.remove(stream);
                    }
                }
                Err(Reply::Done(_)) => unreachable!("a lead was sent"),
            }
        }
    }

    /// The others of the group `own` leads on `slot`: the oldest waiting requests whose
    /// exclusive streams are idle, one per such stream and idempotency key, at most `max_batch`
    /// with `own`; their streams are marked busy and released with the slot.
    pub(crate) fn gather(&self, slot: &mut Slot<M>, own: &M) -> Vec<Waiting<M>> {
        let mut guard = self.lock();
        let state = &mut *guard;
        let mut group = Vec::new();
        let mut keys: HashSet<IdempotencyKey> = own.key().into_iter().cloned().collect();
        let mut kept = VecDeque::with_capacity(state.waiting.len());
        while let Some(waiting) = state.waiting.pop_front() {
            if waiting.reply.is_closed() {
                // Cancelled while queued: never sent.
                continue;
            }
            let member = &waiting.member;
            let key_free = member.key().is_none_or(|k| !keys.contains(k));
            let stream_free = member
                .exclusive_stream()
                .is_none_or(|s| !state.busy.contains(s));
            if group.len() + 1 < self.max_batch && stream_free && key_free {
                if let Some(stream) = member.exclusive_stream() {
                    state.busy.insert(stream.clone());
                    slot.streams.push(stream.clone());
                }
                if let Some(key) = member.key() {
                    keys.insert(key.clone());
                }
                group.push(waiting);
            } else {
                kept.push_back(waiting);
            }
        }
        state.waiting = kept;
        group
    }
}

/// A statement slot for some streams: released (and handed on) when dropped, also when the
/// caller holding it is cancelled mid-statement.
pub(crate) struct Slot<M: Member> {
    queue: Option<Arc<Queue<M>>>,
    streams: Vec<StreamId>,
}

impl<M: Member> Slot<M> {
    /// A slot held for `streams` (taken by [`Queue::enter`] or handed on by a finished one).
    fn new(queue: &Arc<Queue<M>>, streams: Vec<StreamId>) -> Self {
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

impl<M: Member> Drop for Slot<M> {
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
    use crate::store::Prepared;
    use factum::{AppendRequest, EventId, NewEvent};

    type Queue = super::Queue<Prepared>;
    type Slot = super::Slot<Prepared>;
    type Entry = super::Entry<Prepared>;
    type Reply = super::Reply<Prepared>;
    type Waiting = super::Waiting<Prepared>;

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
            Entry::Now(_) => panic!("expected to queue"),
        }
    }

    /// Takes the first slot for `stream`, as an append on an idle store does.
    fn now(queue: &Arc<Queue>, stream: &str) -> Slot {
        match queue.enter(&prepared(stream, None)) {
            Entry::Now(slot) => slot,
            Entry::Queued(_) => panic!("expected a free slot"),
        }
    }

    /// The slot handed to this waiter, and the group it gathers: the other members' streams.
    fn lead(
        queue: &Arc<Queue>,
        receive: &mut oneshot::Receiver<Reply>,
        own: &str,
    ) -> (Vec<String>, Vec<Waiting>, Slot) {
        match receive.try_recv() {
            Ok(Reply::Lead(mut slot)) => {
                let others = queue.gather(&mut slot, &prepared(own, None));
                (
                    others
                        .iter()
                        .map(|w| w.member.request.stream.as_str().to_owned())
                        .collect(),
                    others,
                    slot,
                )
            }
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
        assert!(a2.try_recv().is_err() && c.try_recv().is_err());
        // Appends that arrive before the leader gathers join its group.
        let _e = queued(queue.enter(&prepared("s-e", None)));
        let (others, group, slot) = lead(&queue, &mut b, "s-b");
        assert_eq!(others, ["s-a", "s-c", "s-e"]);
        // While that group is in flight, another `s-a` request waits for the next statement.
        let mut a3 = queued(queue.enter(&prepared("s-a", None)));
        let mut d = queued(queue.enter(&prepared("s-d", None)));
        drop(group);
        drop(slot);
        let (others, _group, next) = lead(&queue, &mut a3, "s-a");
        assert_eq!(others, ["s-d"]);
        assert!(d.try_recv().is_err());
        drop(next);
        // All done: the next append goes out at once.
        drop(now(&queue, "s-a"));
    }

    #[test]
    fn a_newcomer_never_overtakes_waiting_appends() {
        let queue = Arc::new(Queue::new(64, 2));
        let first = now(&queue, "s-1");
        let second = now(&queue, "s-2");
        let mut waiting = queued(queue.enter(&prepared("s-3", None)));
        drop(first);
        // A slot is free, but it went to the waiting append: a newcomer queues behind it.
        let _late = queued(queue.enter(&prepared("s-4", None)));
        let (others, _group, _slot) = lead(&queue, &mut waiting, "s-3");
        assert_eq!(others, ["s-4"]);
        drop(second);
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
        let mut slot = match k1.try_recv() {
            Ok(Reply::Lead(slot)) => slot,
            _ => panic!("expected to lead"),
        };
        let others = queue.gather(&mut slot, &prepared("s-k1", Some("key")));
        let streams: Vec<&str> = others
            .iter()
            .map(|w| w.member.request.stream.as_str())
            .collect();
        assert_eq!(streams, ["s-y", "s-z"]);
        assert!(k2.try_recv().is_err() && y.try_recv().is_err() && z.try_recv().is_err());
        drop(others);
        drop(slot);
        let (others, _group, _alone) = lead(&queue, &mut k2, "s-k2");
        assert!(others.is_empty());
    }

    #[test]
    fn a_leader_that_is_gone_hands_the_slot_on() {
        let queue = Arc::new(Queue::new(64, 1));
        let first = now(&queue, "s-1");
        let gone = queued(queue.enter(&prepared("s-2", None)));
        let mut next = queued(queue.enter(&prepared("s-3", None)));
        let mut last = queued(queue.enter(&prepared("s-4", None)));
        // Cancelled after it was queued but before the slot frees: the slot skips it.
        drop(gone);
        drop(first);
        let (others, _group, _slot) = lead(&queue, &mut next, "s-3");
        assert_eq!(others, ["s-4"]);
        assert!(last.try_recv().is_err());
    }

    #[test]
    fn reads_of_one_stream_share_a_statement() {
        use crate::reads::BatchedRead;
        use factum::StreamVersion;
        let read = |after: u64| {
            Arc::new(BatchedRead {
                stream: StreamId::new("s-r").expect("id"),
                after: StreamVersion::new(after),
            })
        };
        let queue = Arc::new(super::Queue::<BatchedRead>::new(64, 1));
        let first = match queue.enter(&read(0)) {
            super::Entry::Now(slot) => slot,
            super::Entry::Queued(_) => panic!("expected a free slot"),
        };
        // A read does not make its stream busy: more reads of it queue behind the slot, not
        // behind the stream, and all go out together.
        let mut leader = match queue.enter(&read(0)) {
            super::Entry::Queued(receive) => receive,
            super::Entry::Now(_) => panic!("expected to queue"),
        };
        let _second = queue.enter(&read(5));
        let _third = queue.enter(&read(9));
        drop(first);
        let Ok(super::Reply::Lead(mut slot)) = leader.try_recv() else {
            panic!("expected to lead");
        };
        let others = queue.gather(&mut slot, &read(0));
        let afters: Vec<u64> = others.iter().map(|w| w.member.after.get()).collect();
        assert_eq!(afters, [5, 9]);
    }

    #[test]
    fn a_lead_dropped_unread_frees_the_slot_for_the_next() {
        let queue = Arc::new(Queue::new(64, 1));
        let first = now(&queue, "s-1");
        let leader = queued(queue.enter(&prepared("s-2", None)));
        let mut member = queued(queue.enter(&prepared("s-3", None)));
        drop(first);
        // The leader's caller is cancelled after the slot was sent, before it gathered: the
        // next waiting append leads instead, and nothing is lost.
        drop(leader);
        let (others, _group, slot) = lead(&queue, &mut member, "s-3");
        assert!(others.is_empty());
        drop(slot);
        // The slot and the streams are free again.
        drop(now(&queue, "s-2"));
        drop(now(&queue, "s-3"));
    }
}
