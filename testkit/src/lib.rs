//! Testing tools for [factum](https://docs.rs/factum): given-when-then fixtures for aggregates,
//! projections and process managers, property-based helpers, the conformance suite every
//! backend must pass, and the throwaway-PostgreSQL harness for database tests.
//!
//! ```
//! use bank::{Account, AccountCommand, AccountError, AccountEvent, Deposited, Opened, Withdrawn};
//! use factum_testkit::AggregateFixture;
//!
//! let opened = AccountEvent::Opened(Opened { owner: "Ada".into() });
//!
//! // Given the past, when a command, then exactly these events.
//! AggregateFixture::<Account>::new()
//!     .given([opened.clone(), AccountEvent::Deposited(Deposited { amount: 100 })])
//!     .when(AccountCommand::Withdraw { account: "a1".into(), amount: 40 })
//!     .then_events([AccountEvent::Withdrawn(Withdrawn { amount: 40 })])
//!     .then_state(|account| assert_eq!(account.balance, 60));
//!
//! // Or a typed domain error, matched by variant.
//! AggregateFixture::<Account>::new()
//!     .given([opened])
//!     .when(AccountCommand::Withdraw { account: "a1".into(), amount: 40 })
//!     .then_error(|e| matches!(e, AccountError::InsufficientFunds { .. }));
//! ```
//!
//! # The fixtures
//! * [`AggregateFixture`]: given past events, when a command, then the events, the rejection or
//!   the state. Runs the command through a real [`Repository`](factum::Repository) on an
//!   [`InMemoryStore`](factum::InMemoryStore).
//! * [`ProjectionFixture`]: given events in [envelopes](envelope), then the read model.
//! * `PgProjectionFixture` (feature `postgres`): given events, applied to a PostgreSQL
//!   projection in real transactions on a `postgres::TestDatabase`, then rows.
//! * [`ProcessManagerFixture`]: given past events, when new ones, then the commands issued.
//! * [`SagaFixture`]: given past events, when an event, a rejection or time passing (a test
//!   clock), then the changes recorded, the commands sent (typed by target, with their ids) and
//!   the timeouts scheduled or cancelled.
//! * [`InProcessServices`]: several in-memory services on an in-process bus, each with its relay
//!   and its sagas, run end to end while the test drives them.
//! * [`FlowFixture`]: the whole flow in one test — given events, when a command, then its
//!   events, what the projections show and what the process managers issue.
//! * [`properties`]: proptest helpers for invariants over random command sequences, and for
//!   snapshots against full replays.
//!
//! A failed check panics with a message that shows what differs: for event and command
//! sequences, the index of the first difference and both sides pretty-printed.
//!
//! # The conformance suite
//! [`conformance`] runs the guarantees every backend keeps against any backend;
//! [`consumer_conformance`] the checkpoint and dead-letter checks; [`bus_conformance`] what every
//! [`Bus`](factum::bus::Bus) keeps.
//!
//! # The compatibility check
//! [`samples`]: stored event payloads exported from a database, replayed through the current
//! code's decoding and upcasting in one call that names every sample that no longer loads.

mod aggregate;
mod envelope;
#[cfg(feature = "postgres")]
mod pg_projection;
mod process;
mod projection;
mod saga;
mod services;
mod support;

pub mod bus_conformance;
pub mod conformance;
pub mod consumer_conformance;
pub mod nats;
#[cfg(feature = "postgres")]
pub mod postgres;
pub mod properties;
pub mod redis;
pub mod samples;

pub use aggregate::{AggregateFixture, FlowFixture, Outcome};
pub use envelope::{TestEnvelope, envelope};
#[cfg(feature = "postgres")]
pub use pg_projection::PgProjectionFixture;
pub use process::ProcessManagerFixture;
pub use projection::ProjectionFixture;
pub use saga::{SAGA_FIXTURE_START, SagaFixture};
pub use services::InProcessServices;

/// The proptest crate the [`properties`] helpers are built on, for writing command strategies
/// without a separate dependency.
pub use proptest;

/// The book's "Testing with factum" chapter, compiled so it cannot drift from the code.
#[cfg(doctest)]
#[doc = include_str!("../../docs/src/testing.md")]
mod testing_chapter {}

/// The book's idempotency chapter (it runs the bank example), compiled so it cannot drift.
#[cfg(doctest)]
#[doc = include_str!("../../docs/src/idempotency.md")]
mod idempotency_chapter {}

/// The book's sagas chapter (it runs the checkout example and shows the PostgreSQL wiring),
/// compiled so it cannot drift.
#[cfg(all(doctest, feature = "postgres"))]
#[doc = include_str!("../../docs/src/sagas.md")]
mod sagas_chapter {}

/// The book's "Evolving events" chapter (it checks the examples' samples), compiled so it
/// cannot drift.
#[cfg(doctest)]
#[doc = include_str!("../../docs/src/evolving-events.md")]
mod evolving_events_chapter {}
