//! Property-based helpers on [proptest](https://docs.rs/proptest): random command sequences
//! checked against invariants, and snapshots checked against a full replay.
//!
//! The `check_*` functions check one case and are meant for `proptest!` blocks; the `assert_*`
//! functions run a whole property (256 cases by default, `PROPTEST_CASES` overrides) and panic
//! with the smallest failing command sequence proptest can shrink to.
//!
//! ```
//! use bank::{Account, AccountCommand};
//! use factum_testkit::properties::{assert_invariants, command_sequences};
//! use proptest::prelude::*;
//!
//! fn account_command() -> impl Strategy<Value = AccountCommand> {
//!     let account = || Just("a1".to_owned());
//!     prop_oneof![
//!         (account(), "[a-z]{1,8}").prop_map(|(account, owner)| AccountCommand::Open { account, owner }),
//!         (account(), 0..500u64).prop_map(|(account, amount)| AccountCommand::Deposit { account, amount }),
//!         (account(), 0..500u64).prop_map(|(account, amount)| AccountCommand::Withdraw { account, amount }),
//!         account().prop_map(|account| AccountCommand::Close { account }),
//!     ]
//! }
//!
//! // Whatever the commands, a closed account holds no money.
//! assert_invariants::<Account, _>(command_sequences(account_command(), 0..30), |account| {
//!     prop_assert!(!account.closed || account.balance == 0);
//!     Ok(())
//! });
//! ```

use std::fmt::Debug;

use factum::{Aggregate, Snapshot};
use proptest::collection::SizeRange;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};

use crate::support::{listing, pretty};

/// Sequences of commands drawn from `command`, with a length in `length` (e.g. `0..50`).
pub fn command_sequences<S: Strategy>(
    command: S,
    length: impl Into<SizeRange>,
) -> impl Strategy<Value = Vec<S::Value>> {
    proptest::collection::vec(command, length)
}

/// Runs `commands` one by one against a new aggregate (through `decide`, then `evolve` for the
/// events of accepted commands; rejected commands change nothing) and checks `invariant` on the
/// initial state and after every command.
///
/// Fails with a message naming the step, the command, what it did, and the invariant's reason.
///
/// ```
/// use bank::{Account, AccountCommand};
/// use factum_testkit::properties::check_invariants;
/// use proptest::prop_assert;
///
/// let commands = [
///     AccountCommand::Open { account: "a1".into(), owner: "Ada".into() },
///     AccountCommand::Withdraw { account: "a1".into(), amount: 10 },
/// ];
/// check_invariants::<Account>(&commands, |account| {
///     prop_assert!(account.balance < 1_000_000);
///     Ok(())
/// })
/// .unwrap();
/// ```
pub fn check_invariants<A>(
    commands: &[A::Command],
    mut invariant: impl FnMut(&A) -> Result<(), TestCaseError>,
) -> Result<(), TestCaseError>
where
    A: Aggregate + Debug,
    A::Command: Debug,
    A::Event: Debug,
    A::Error: Debug,
{
    let mut state = A::default();
    invariant(&state).map_err(|e| explain(e, "in the initial state".to_owned(), &state))?;
    for (index, command) in commands.iter().enumerate() {
        let outcome = match state.decide(command) {
            Ok(events) => {
                for event in &events {
                    state.evolve(event);
                }
                format!("produced {} event(s):\n{}", events.len(), listing(&events))
            }
            Err(error) => format!("was rejected with {error:?}"),
        };
        invariant(&state).map_err(|e| {
            explain(
                e,
                format!("after command #{index} {command:?}, which {outcome}"),
                &state,
            )
        })?;
    }
    Ok(())
}

fn explain<A: Debug>(error: TestCaseError, when: String, state: &A) -> TestCaseError {
    match error {
        TestCaseError::Fail(reason) => TestCaseError::fail(format!(
            "invariant broken {when}\n  state:\n{}\n  reason: {reason}",
            pretty(state, 4)
        )),
        reject @ TestCaseError::Reject(_) => reject,
    }
}

/// Runs the property "`invariant` holds after every command" over sequences from `commands`
/// (see [`check_invariants`]).
///
/// # Panics
/// With the smallest failing sequence found and the reason.
#[track_caller]
pub fn assert_invariants<A, S>(commands: S, invariant: impl Fn(&A) -> Result<(), TestCaseError>)
where
    A: Aggregate + Debug,
    A::Command: Debug,
    A::Event: Debug,
    A::Error: Debug,
    S: Strategy<Value = Vec<A::Command>>,
{
    let result = runner().run(&commands, |commands| {
        check_invariants::<A>(&commands, &invariant)
    });
    report(A::TYPE, "invariant", result);
}

/// Checks that restoring a snapshot and replaying the remaining events gives the same state as
/// replaying every event.
///
/// Runs `commands` against a new aggregate to get events (rejected commands are skipped), then
/// compares, with `PartialEq`:
/// 1. the state built while deciding with a full replay of the events from the default state;
/// 2. the state after the first *k* events with the same state serialised to JSON and
///    deserialised again — what a snapshot store does;
/// 3. the full replay with the restored snapshot plus the remaining events.
///
/// *k* is `cut` modulo the number of events plus one, so any `usize` (e.g. drawn with
/// `any::<usize>()`) picks a valid cut point, from none of the events to all of them.
pub fn check_snapshot_replay<A>(commands: &[A::Command], cut: usize) -> Result<(), TestCaseError>
where
    A: Snapshot + PartialEq + Debug,
    A::Command: Debug,
{
    let mut live = A::default();
    let mut events = Vec::new();
    for command in commands {
        if let Ok(decided) = live.decide(command) {
            for event in &decided {
                live.evolve(event);
            }
            events.extend(decided);
        }
    }

    let replay = |from: A, events: &[A::Event]| {
        events.iter().fold(from, |mut state, event| {
            state.evolve(event);
            state
        })
    };
    let full = replay(A::default(), &events);
    if full != live {
        return Err(TestCaseError::fail(format!(
            "replaying the {} event(s) gives another state than deciding them did \
             (does `evolve` depend on anything but the events?)\n  while deciding:\n{}\n  replayed:\n{}",
            events.len(),
            pretty(&live, 4),
            pretty(&full, 4)
        )));
    }

    let cut = cut % (events.len() + 1);
    let before = replay(A::default(), &events[..cut]);
    let json = serde_json::to_string(&before).map_err(|e| {
        TestCaseError::fail(format!(
            "the state after {cut} event(s) does not serialise: {e}"
        ))
    })?;
    let restored: A = serde_json::from_str(&json).map_err(|e| {
        TestCaseError::fail(format!(
            "the snapshot taken after {cut} event(s) does not deserialise: {e}\n  snapshot: {json}"
        ))
    })?;
    if restored != before {
        return Err(TestCaseError::fail(format!(
            "the snapshot taken after {cut} event(s) loses state\n  before:\n{}\n  restored:\n{}\n  snapshot: {json}",
            pretty(&before, 4),
            pretty(&restored, 4)
        )));
    }
    let resumed = replay(restored, &events[cut..]);
    if resumed != full {
        return Err(TestCaseError::fail(format!(
            "a snapshot after {cut} of {} event(s) plus the rest gives another state than a full replay\n  \
             full replay:\n{}\n  from the snapshot:\n{}\n  snapshot: {json}",
            events.len(),
            pretty(&full, 4),
            pretty(&resumed, 4)
        )));
    }
    Ok(())
}

/// Runs the property "a snapshot plus the remaining events gives the same state as a full
/// replay" over sequences from `commands`, at random cut points (see [`check_snapshot_replay`]).
///
/// # Panics
/// With the smallest failing sequence found and the reason.
#[track_caller]
pub fn assert_snapshot_replay<A, S>(commands: S)
where
    A: Snapshot + PartialEq + Debug,
    A::Command: Debug,
    S: Strategy<Value = Vec<A::Command>>,
{
    let result = runner().run(&(commands, any::<usize>()), |(commands, cut)| {
        check_snapshot_replay::<A>(&commands, cut)
    });
    report(A::TYPE, "snapshot replay", result);
}

fn runner() -> TestRunner {
    TestRunner::new(Config {
        // No source file to keep regressions next to: the helpers are called from anywhere.
        failure_persistence: None,
        ..Config::default()
    })
}

#[track_caller]
fn report<T: Debug>(aggregate: &str, property: &str, result: Result<(), TestError<T>>) {
    match result {
        Ok(()) => {}
        Err(TestError::Fail(reason, minimal)) => panic!(
            "`{aggregate}` {property} property failed; minimal failing input:\n{}\n{reason}",
            pretty(&minimal, 2)
        ),
        Err(TestError::Abort(reason)) => {
            panic!("`{aggregate}` {property} property aborted: {reason}")
        }
    }
}
