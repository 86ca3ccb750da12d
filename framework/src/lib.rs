//! CQRS and event sourcing for Rust.
//!
//! Domain code is plain Rust: an [`Aggregate`] decides which [`Event`]s a [`Command`] produces
//! and evolves its state from them; a [`Repository`] loads, decides and appends with optimistic
//! concurrency through any [`EventStore`] backend — the [`InMemoryStore`] here, PostgreSQL with
//! `factum-postgres`.
//!
//! ```
//! use factum::{Aggregate, Command, DecodeError, EncodeError, Event, InMemoryStore, Repository, Stored};
//! use serde_json::value::RawValue;
//!
//! // The state, rebuilt from events.
//! #[derive(Debug, Default)]
//! struct Counter { value: u64 }
//!
//! struct Increment { counter: String, by: u64 }
//!
//! #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
//! struct Incremented { by: u64 }
//!
//! #[derive(Debug, thiserror::Error)]
//! #[error("a counter only goes up by 1 to 10 at a time")]
//! struct TooBig;
//!
//! impl Command for Increment {
//!     fn command_name(&self) -> &'static str { "Increment" }
//!     fn aggregate_id(&self) -> String { self.counter.clone() }
//! }
//!
//! impl Event for Incremented {
//!     fn event_type(&self) -> &'static str { "counter.incremented" }
//!     fn schema_version(&self) -> u32 { 1 }
//!     fn event_types() -> &'static [&'static str] { &["counter.incremented"] }
//!     fn encode(&self) -> Result<Box<RawValue>, EncodeError> { factum::encode_json(self) }
//!     fn decode(stored: &Stored<'_>) -> Result<Self, DecodeError> {
//!         match (stored.event_type, stored.schema_version) {
//!             ("counter.incremented", 1) => factum::decode_json(stored.payload),
//!             _ => Err(DecodeError::unknown(stored.event_type, stored.schema_version)),
//!         }
//!     }
//! }
//!
//! impl Aggregate for Counter {
//!     const TYPE: &'static str = "counter";
//!     type Command = Increment;
//!     type Event = Incremented;
//!     type Error = TooBig;
//!
//!     fn decide(&self, command: &Increment) -> Result<Vec<Incremented>, TooBig> {
//!         if !(1..=10).contains(&command.by) { return Err(TooBig); }
//!         Ok(vec![Incremented { by: command.by }])
//!     }
//!
//!     fn evolve(&mut self, event: &Incremented) {
//!         self.value += event.by;
//!     }
//! }
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let counters = Repository::<Counter, _>::new(InMemoryStore::new());
//! counters.execute(Increment { counter: "c1".into(), by: 2 }).await?;
//! let done = counters.execute(Increment { counter: "c1".into(), by: 3 }).await?;
//! assert_eq!(done.state.value, 5);
//! assert_eq!(done.version.get(), 2);
//!
//! // A rejected command stores nothing and hands back the typed domain error.
//! let err = counters.execute(Increment { counter: "c1".into(), by: 99 }).await.unwrap_err();
//! assert!(matches!(err.rejection(), Some(TooBig)));
//! assert_eq!(counters.load("c1").await?.version.get(), 2);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```
//!
//! # Derive macros
//!
//! With the default `derive` feature, the derives write those impls; the counter above becomes:
//!
//! ```
//! use factum::{Aggregate, Command, Event};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Default, Aggregate)]
//! #[aggregate(type = "counter", command = Increment, event = Incremented, error = TooBig)]
//! struct Counter { value: u64 }
//!
//! #[derive(Command)]
//! struct Increment { #[command(id)] counter: String, by: u64 }
//!
//! #[derive(Debug, PartialEq, Serialize, Deserialize, Event)]
//! #[event(name = "counter.incremented")]
//! struct Incremented { by: u64 }
//!
//! #[derive(Debug, thiserror::Error)]
//! #[error("a counter only goes up by 1 to 10 at a time")]
//! struct TooBig;
//!
//! impl Counter {
//!     fn decide(&self, command: &Increment) -> Result<Vec<Incremented>, TooBig> {
//!         if !(1..=10).contains(&command.by) { return Err(TooBig); }
//!         Ok(vec![Incremented { by: command.by }])
//!     }
//!
//!     fn evolve(&mut self, event: &Incremented) {
//!         self.value += event.by;
//!     }
//! }
//! # let mut counter = Counter::default();
//! # for e in counter.decide(&Increment { counter: "c".into(), by: 3 }).unwrap() { counter.evolve(&e); }
//! # assert_eq!((Counter::TYPE, counter.value), ("counter", 3));
//! # assert_eq!(Increment { counter: "c".into(), by: 1 }.aggregate_id(), "c");
//! ```
//!
//! Every attribute is documented, with an example, on its derive: [`Event`](macro@Event) (wire
//! names, schema versions, upcasting), [`Command`](macro@Command),
//! [`Aggregate`](macro@Aggregate) and [`Projection`](macro@Projection). Mistakes in attributes
//! are compile errors on the offending token, all reported at once.
//!
//! # The pieces
//! * **Domain model**: [`Aggregate`], [`Command`], [`Event`] (stable wire names, schema
//!   versions, upcasting in [`Event::decode`]), [`Snapshot`] for aggregates that opt into
//!   snapshots.
//! * **Identity**: [`StreamId`], [`EventId`], [`StreamVersion`], [`GlobalPosition`],
//!   [`LogPosition`], [`CorrelationId`], [`CausationId`], [`CommandId`].
//! * **Envelopes**: [`NewEvent`] (to append), [`RecordedEvent`] (as stored), [`Envelope`]
//!   (decoded, with its metadata).
//! * **Backends**: [`EventStore`] and [`SnapshotStore`], with the dyn-compatible
//!   [`DynEventStore`] and [`DynSnapshotStore`]; [`InMemoryStore`].
//! * **Execution**: [`Repository`], [`CommandContext`], [`SnapshotPolicy`].
//! * **Errors**: [`Error`] with [`ErrorKind`], and [`CommandError`] for command execution.

mod aggregate;
pub mod bus;
mod error;
mod event;
pub mod health;
pub mod idempotency;
mod ids;
mod memory;
pub mod personal;
mod process;
mod projection;
mod repository;
pub mod resilience;
pub mod saga;
mod store;
pub mod subscription;
pub mod telemetry;

pub use aggregate::{Aggregate, Command, Snapshot};
pub use error::{BoxError, CommandError, Error, ErrorKind, error_chain};
pub use event::{
    DecodeError, Decoded, DecodedIter, EncodeError, Envelope, Event, EventMetadata, Metadata,
    NewEvent, RecordedEvent, STREAM_DELETED, Stored, Upcast, decode_json, encode_json,
};
pub use idempotency::{IdempotencyKey, InvalidIdempotencyKey};
pub use ids::{
    CATEGORY_SEPARATOR, CausationId, CommandId, CorrelationId, EventId, GlobalPosition,
    InvalidStreamId, LogPosition, StreamId, StreamVersion,
};
pub use memory::{InMemoryStore, validate_batch};
pub use process::*;
pub use projection::Projection;
pub use repository::{CommandContext, Committed, Loaded, Repository, SnapshotPolicy};
pub use store::{
    AppendRequest, AppendResult, BoxFuture, DynEventStore, DynSnapshotStore, EventFilter,
    EventPayload, EventStore, EventStream, ExpectedVersion, PayloadStream, ReplicaLag,
    SnapshotStore, StoredSnapshot,
};

/// A JSON payload kept as text: how events and snapshots are stored and handed to
/// [`Event::decode`].
pub use serde_json::value::RawValue;

/// Not public API: what the derive macros' generated code refers to.
#[doc(hidden)]
pub mod __private {
    pub use serde;
    pub use serde_json;
    pub use std::boxed::Box;
    pub use std::string::String;
    pub use std::vec::Vec;

    pub use crate::personal::field as personal;
    pub use crate::{
        DecodeError, Decoded, EncodeError, RawValue, Stored, Upcast, decode_json, encode_json,
    };

    /// The payload of a unit event variant: `{}`.
    #[derive(serde::Serialize)]
    pub struct EmptyPayload {}

    /// One step of an upcasting chain (or a split, into a `Vec`). A missing `From`/`Upcast`
    /// impl fails here, on the user's `upcast_from(...)` entry the call is spanned with.
    #[inline]
    pub fn upcast<Old, New: Upcast<Old>>(
        old: Old,
        stored: &Stored<'_>,
    ) -> Result<New, DecodeError> {
        New::upcast(old, stored).map_err(DecodeError::Upcast)
    }

    /// A command's aggregate id, from any `Display` field.
    #[inline]
    pub fn aggregate_id<T: std::fmt::Display + ?Sized>(id: &T) -> String {
        id.to_string()
    }

    /// What the `apply` a projection derive calls may return: `()` or `Result<(), E>` with `E`
    /// convertible into a [`BoxError`](crate::BoxError).
    #[diagnostic::on_unimplemented(
        message = "a projection's `apply` must return `()` or `Result<(), E>` where `E` converts into `factum::BoxError`",
        label = "this `apply` returns `{Self}`"
    )]
    pub trait HandlerResult {
        /// The result as the `Projection::apply` contract wants it.
        fn into_result(self) -> Result<(), crate::BoxError>;
    }

    impl HandlerResult for () {
        #[inline]
        fn into_result(self) -> Result<(), crate::BoxError> {
            Ok(())
        }
    }

    impl<E: Into<crate::BoxError>> HandlerResult for Result<(), E> {
        #[inline]
        fn into_result(self) -> Result<(), crate::BoxError> {
            self.map_err(Into::into)
        }
    }

    /// The function a derive delegates a trait method to (`U`), next to the trait method it
    /// implements (`T`), for the checks below.
    ///
    /// `#[derive(Aggregate)]` implements `Aggregate::decide` by calling `Self::decide`, which
    /// finds the user's inherent method, or, when there is none, the trait method itself (the
    /// implemented trait is always in scope inside its impl): a call that would recurse forever.
    /// No name lookup can tell them apart, but their function item types differ. So the derive
    /// builds `Delegate<Self, typeof(Self::decide), typeof(<Self as Aggregate>::decide)>` and
    /// calls `check_decide` on a reference to it: `DelegateIsTheTraitMethod` (implemented for
    /// `Delegate<S, F, F>`, found first) when both are the same function, with a bound that fails
    /// with a sentence naming the method to write; `DelegateIsAnotherFunction` otherwise (found
    /// one auto-reference later), which checks nothing.
    pub struct Delegate<S: ?Sized, U, T>(core::marker::PhantomData<DelegateMarker<S, U, T>>);

    /// `Delegate`'s marker: a function type, so `Delegate` is `Send`, `Sync` and covariant
    /// whatever the types.
    type DelegateMarker<S, U, T> = fn(&S) -> (U, T);

    /// A [`Delegate`] for the function `user` (what the derive calls) and `trait_method`.
    #[inline]
    pub fn delegate<S: ?Sized, U, T>(user: U, trait_method: T) -> Delegate<S, U, T> {
        let _ = (user, trait_method);
        Delegate(core::marker::PhantomData)
    }

    /// An aggregate's command type, for the bounds below.
    pub type CommandOf<S> = <S as crate::Aggregate>::Command;
    /// An aggregate's event type, for the bounds below.
    pub type EventOf<S> = <S as crate::Aggregate>::Event;
    /// An aggregate's error type, for the bounds below.
    pub type ErrorOf<S> = <S as crate::Aggregate>::Error;

    /// The derive would call the trait method it implements: the user's method is missing.
    pub trait DelegateIsTheTraitMethod<S: ?Sized> {
        /// Fails to compile: no inherent `decide`.
        #[inline]
        fn check_decide(&self)
        where
            S: crate::Aggregate + WriteDecide<CommandOf<S>, EventOf<S>, ErrorOf<S>>,
        {
        }

        /// Fails to compile: no inherent `evolve`.
        #[inline]
        fn check_evolve(&self)
        where
            S: crate::Aggregate + WriteEvolve<EventOf<S>>,
        {
        }

        /// Fails to compile: no inherent `apply`.
        #[inline]
        fn check_apply(&self)
        where
            S: crate::Projection + WriteApply<<S as crate::Projection>::Event>,
        {
        }
    }

    impl<S: ?Sized, F> DelegateIsTheTraitMethod<S> for Delegate<S, F, F> {}

    /// The derive calls a function of its own: nothing to check.
    pub trait DelegateIsAnotherFunction {
        /// Checks nothing.
        #[inline]
        fn check_decide(&self) {}
        /// Checks nothing.
        #[inline]
        fn check_evolve(&self) {}
        /// Checks nothing.
        #[inline]
        fn check_apply(&self) {}
    }

    impl<S: ?Sized, U, T> DelegateIsAnotherFunction for &Delegate<S, U, T> {}

    /// Never implemented for a user's type: the message of a missing `decide`.
    #[diagnostic::on_unimplemented(
        message = "`{Self}` has no method `decide`: write `fn decide(&self, command: &{C}) -> Result<Vec<{E}>, {X}>` in an `impl {Self}` block",
        label = "`#[derive(Aggregate)]` implements `Aggregate::decide` by calling `{Self}::decide`",
        note = "`decide` looks at the state and the command and returns the events to record, or the rejection",
        note = "a method written in another module must be visible here (e.g. `pub(crate)`); to call a function with another name, use `#[aggregate(decide = path::to::function)]`"
    )]
    pub trait WriteDecide<C, E, X> {}

    /// Never implemented for a user's type: the message of a missing `evolve`.
    #[diagnostic::on_unimplemented(
        message = "`{Self}` has no method `evolve`: write `fn evolve(&mut self, event: &{E})` in an `impl {Self}` block",
        label = "`#[derive(Aggregate)]` implements `Aggregate::evolve` by calling `{Self}::evolve`",
        note = "`evolve` applies one recorded event to the state; it cannot fail",
        note = "a method written in another module must be visible here (e.g. `pub(crate)`); to call a function with another name, use `#[aggregate(evolve = path::to::function)]`"
    )]
    pub trait WriteEvolve<E> {}

    /// Never implemented for a user's type: the message of a missing projection `apply`.
    #[diagnostic::on_unimplemented(
        message = "`{Self}` has no method `apply`: write `fn apply(&mut self, event: &factum::Envelope<{E}>)` in an `impl {Self}` block",
        label = "`#[derive(Projection)]` implements `Projection::apply` by calling `{Self}::apply`",
        note = "`apply` updates the read model with one event; it returns `()`, or `Result<(), E>` where `E` converts into `factum::BoxError`",
        note = "a method written in another module must be visible here (e.g. `pub(crate)`); to call a function with another name, use `#[projection(apply = path::to::function)]`"
    )]
    pub trait WriteApply<E> {}

    // One impl each, for a type no user has, so rustc does not add "this trait has no
    // implementations" under the message.
    #[diagnostic::do_not_recommend]
    impl<C, E, X> WriteDecide<C, E, X> for Unparsed {}
    #[diagnostic::do_not_recommend]
    impl<E> WriteEvolve<E> for Unparsed {}
    #[diagnostic::do_not_recommend]
    impl<E> WriteApply<E> for Unparsed {}

    /// Stands in for a type a derive attribute failed to name, so the fallback impl emitted
    /// next to the real error adds no errors of its own.
    #[derive(Debug)]
    pub enum Unparsed {}

    impl std::fmt::Display for Unparsed {
        fn fmt(&self, _: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match *self {}
        }
    }

    impl std::error::Error for Unparsed {}

    impl crate::Command for Unparsed {
        fn command_name(&self) -> &'static str {
            match *self {}
        }
        fn aggregate_id(&self) -> String {
            match *self {}
        }
    }

    impl crate::Event for Unparsed {
        fn event_type(&self) -> &'static str {
            match *self {}
        }
        fn schema_version(&self) -> u32 {
            match *self {}
        }
        fn event_types() -> &'static [&'static str] {
            &[]
        }
        fn encode(&self) -> Result<Box<RawValue>, EncodeError> {
            match *self {}
        }
        fn decode(stored: &crate::Stored<'_>) -> Result<Self, DecodeError> {
            Err(DecodeError::unknown(
                stored.event_type,
                stored.schema_version,
            ))
        }
    }
}

#[cfg(feature = "derive")]
mod derives;
#[cfg(feature = "derive")]
pub use derives::{Aggregate, Command, Event, Projection};

/// The derive macros chapter of the book, compiled so it cannot drift from the code.
#[cfg(doctest)]
#[doc = include_str!("../../docs/src/reference/derives.md")]
mod derives_chapter {}

#[cfg(doctest)]
#[doc = include_str!("../../docs/src/tutorial.md")]
mod tutorial_chapter {}

#[cfg(doctest)]
#[doc = include_str!("../../docs/src/subscriptions.md")]
mod subscriptions_chapter {}

#[cfg(doctest)]
#[doc = include_str!("../../docs/src/snapshots.md")]
mod snapshots_chapter {}

#[cfg(doctest)]
#[doc = include_str!("../../docs/src/reference/metrics.md")]
mod metrics_chapter {}
