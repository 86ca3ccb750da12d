//! The property-based helpers: they pass on a correct aggregate and catch broken ones.

use std::panic::{AssertUnwindSafe, catch_unwind};

use factum::{Aggregate, Command, DecodeError, EncodeError, Event, RawValue, Snapshot};
use factum_testkit::properties::{
    assert_invariants, assert_snapshot_replay, check_snapshot_replay, command_sequences,
};
use factum_testkit::proptest::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug)]
enum TallyCommand {
    Add(u32),
    Reset,
}

impl Command for TallyCommand {
    fn command_name(&self) -> &'static str {
        match self {
            TallyCommand::Add(_) => "Add",
            TallyCommand::Reset => "Reset",
        }
    }

    fn aggregate_id(&self) -> String {
        "t".into()
    }
}

#[derive(Debug, Serialize, Deserialize)]
enum TallyEvent {
    Added(u32),
    Reset,
}

impl Event for TallyEvent {
    fn event_type(&self) -> &'static str {
        "tally.changed"
    }
    fn schema_version(&self) -> u32 {
        1
    }
    fn event_types() -> &'static [&'static str] {
        &["tally.changed"]
    }
    fn encode(&self) -> Result<Box<RawValue>, EncodeError> {
        factum::encode_json(self)
    }
    fn decode(stored: &factum::Stored<'_>) -> Result<Self, DecodeError> {
        let (event_type, version, payload) =
            (stored.event_type, stored.schema_version, stored.payload);
        match (event_type, version) {
            ("tally.changed", 1) => factum::decode_json(payload),
            _ => Err(DecodeError::unknown(event_type, version)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the tally only takes 1 to 100 at a time")]
struct OutOfRange;

fn decide(command: &TallyCommand) -> Result<Vec<TallyEvent>, OutOfRange> {
    match command {
        TallyCommand::Add(n) if (1..=100).contains(n) => Ok(vec![TallyEvent::Added(*n)]),
        TallyCommand::Add(_) => Err(OutOfRange),
        TallyCommand::Reset => Ok(vec![TallyEvent::Reset]),
    }
}

/// A tally whose whole state is in its snapshot.
#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
struct Tally {
    total: u64,
    additions: u32,
}

impl Aggregate for Tally {
    const TYPE: &'static str = "tally";
    type Command = TallyCommand;
    type Event = TallyEvent;
    type Error = OutOfRange;

    fn decide(&self, command: &TallyCommand) -> Result<Vec<TallyEvent>, OutOfRange> {
        decide(command)
    }

    fn evolve(&mut self, event: &TallyEvent) {
        match event {
            TallyEvent::Added(n) => {
                self.total += u64::from(*n);
                self.additions += 1;
            }
            TallyEvent::Reset => *self = Tally::default(),
        }
    }
}

impl Snapshot for Tally {
    const SNAPSHOT_VERSION: u32 = 1;
}

/// A tally that forgets how many additions it saw when snapshotted: a classic snapshot bug.
#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
struct ForgetfulTally {
    total: u64,
    #[serde(skip)]
    additions: u32,
}

impl Aggregate for ForgetfulTally {
    const TYPE: &'static str = "forgetful";
    type Command = TallyCommand;
    type Event = TallyEvent;
    type Error = OutOfRange;

    fn decide(&self, command: &TallyCommand) -> Result<Vec<TallyEvent>, OutOfRange> {
        decide(command)
    }

    fn evolve(&mut self, event: &TallyEvent) {
        match event {
            TallyEvent::Added(n) => {
                self.total += u64::from(*n);
                self.additions += 1;
            }
            TallyEvent::Reset => *self = ForgetfulTally::default(),
        }
    }
}

impl Snapshot for ForgetfulTally {
    const SNAPSHOT_VERSION: u32 = 1;
}

fn tally_command() -> impl Strategy<Value = TallyCommand> {
    prop_oneof![
        8 => (0..120u32).prop_map(TallyCommand::Add),
        1 => Just(TallyCommand::Reset),
    ]
}

fn failure(check: impl FnOnce()) -> String {
    let payload = catch_unwind(AssertUnwindSafe(check)).expect_err("the property should fail");
    payload
        .downcast_ref::<String>()
        .cloned()
        .expect("panics with a formatted message")
}

#[test]
fn invariants_hold_for_a_correct_aggregate() {
    assert_invariants::<Tally, _>(command_sequences(tally_command(), 0..50), |tally| {
        prop_assert!(tally.total <= u64::from(tally.additions) * 100);
        Ok(())
    });
}

#[test]
fn a_broken_invariant_is_reported_with_the_minimal_sequence_and_the_step() {
    let message = failure(|| {
        assert_invariants::<Tally, _>(command_sequences(tally_command(), 0..50), |tally| {
            prop_assert!(tally.total < 150, "the total reached {}", tally.total);
            Ok(())
        });
    });
    assert!(
        message.starts_with("`tally` invariant property failed; minimal failing input:"),
        "{message}"
    );
    // The step that broke it, what it did, the state, and the invariant's own message.
    assert!(
        message.contains("invariant broken after command #"),
        "{message}"
    );
    assert!(
        message.contains("which produced 1 event(s):\n  [0] Added("),
        "{message}"
    );
    assert!(message.contains("reason: the total reached "), "{message}");
}

#[test]
fn snapshots_replay_like_the_full_stream() {
    assert_snapshot_replay::<Tally, _>(command_sequences(tally_command(), 0..50));
}

#[test]
fn a_snapshot_that_loses_state_is_caught() {
    let message = failure(|| {
        assert_snapshot_replay::<ForgetfulTally, _>(command_sequences(tally_command(), 0..50));
    });
    assert!(
        message.starts_with("`forgetful` snapshot replay property failed"),
        "{message}"
    );
    assert!(message.contains("loses state"), "{message}");
}

proptest! {
    #[test]
    fn snapshot_replay_can_be_checked_inside_proptest(
        commands in command_sequences(tally_command(), 0..20),
        cut in any::<usize>(),
    ) {
        check_snapshot_replay::<Tally>(&commands, cut)?;
    }
}

#[test]
fn a_snapshot_cut_before_any_event_is_trivially_fine_but_a_later_one_is_not() {
    let commands = [TallyCommand::Add(5), TallyCommand::Add(6)];
    // A snapshot of the empty state has nothing to forget; one after both additions does.
    assert!(check_snapshot_replay::<ForgetfulTally>(&commands, 0).is_ok());
    assert!(check_snapshot_replay::<ForgetfulTally>(&commands, 3).is_ok());
    let error = check_snapshot_replay::<ForgetfulTally>(&commands, 2)
        .expect_err("the snapshot after both additions forgets them");
    assert!(
        error
            .to_string()
            .contains("the snapshot taken after 2 event(s) loses state"),
        "{error}"
    );
}
