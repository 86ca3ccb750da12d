//! What a failed check says. A test that fails must say what differs, where, and show both
//! sides: these tests catch the panics and assert on their text.

use std::panic::{AssertUnwindSafe, catch_unwind};

use bank::{Account, AccountCommand, AccountError, AccountEvent, Deposited, Opened, Withdrawn};
use factum::{BoxError, Envelope, Outbox, ProcessManager, Projection};
use factum_testkit::{AggregateFixture, FlowFixture, ProcessManagerFixture, ProjectionFixture};

/// Runs `check`, which must panic, and returns the panic's message.
fn failure(check: impl FnOnce()) -> String {
    let payload = catch_unwind(AssertUnwindSafe(check)).expect_err("the check should have failed");
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .expect("panics with a text message")
}

fn opened() -> AccountEvent {
    AccountEvent::Opened(Opened {
        owner: "Ada".into(),
    })
}

fn deposited(amount: u64) -> AccountEvent {
    AccountEvent::Deposited(Deposited { amount })
}

fn withdrawn(amount: u64) -> AccountEvent {
    AccountEvent::Withdrawn(Withdrawn { amount })
}

fn withdraw(amount: u64) -> AccountCommand {
    AccountCommand::Withdraw {
        account: "a1".into(),
        amount,
    }
}

#[test]
fn a_wrong_event_is_named_by_index_with_both_sides_shown() {
    let message = failure(|| {
        AggregateFixture::<Account>::new()
            .given([opened(), deposited(100)])
            .when(withdraw(30))
            .then_events([withdrawn(31)]);
    });
    assert_eq!(
        message,
        "`Withdraw` on `account-a1` produced other events than expected: \
the events differ, first at event #0:
  expected[0]:
    Withdrawn(
        Withdrawn {
            amount: 31,
        },
    )
  actual[0]:
    Withdrawn(
        Withdrawn {
            amount: 30,
        },
    )
expected 1 event:
  [0] Withdrawn(Withdrawn { amount: 31 })
actual 1 event:
  [0] Withdrawn(Withdrawn { amount: 30 })"
    );
}

#[test]
fn a_missing_event_is_named_by_index() {
    let message = failure(|| {
        AggregateFixture::<Account>::new()
            .given([opened(), deposited(100)])
            .when(withdraw(30))
            .then_events([withdrawn(30), deposited(1)]);
    });
    assert!(
        message.contains(
            "first at event #1:
  expected[1]:
    Deposited(
        Deposited {
            amount: 1,
        },
    )
  actual[1]:
    (nothing: there is only 1 event)"
        ),
        "{message}"
    );
}

#[test]
fn expecting_events_from_a_rejected_command_shows_the_error() {
    let message = failure(|| {
        AggregateFixture::<Account>::new()
            .given([opened(), deposited(10)])
            .when(withdraw(30))
            .then_events([withdrawn(30)]);
    });
    assert!(
        message.starts_with(
            "`Withdraw` on `account-a1` was rejected, but 1 event(s) were expected
  error:
    InsufficientFunds {
        balance: 10,
        requested: 30,
    }
  (insufficient funds: the balance is 10 cents, 30 requested)"
        ),
        "{message}"
    );
}

#[test]
fn expecting_a_rejection_of_a_command_that_succeeds_shows_its_events() {
    let message = failure(|| {
        AggregateFixture::<Account>::new()
            .given([opened(), deposited(100)])
            .when(withdraw(30))
            .then_error(|e| matches!(e, AccountError::InsufficientFunds { .. }));
    });
    assert_eq!(
        message,
        "`Withdraw` on `account-a1` was expected to be rejected, but it succeeded with 1 event(s):
  [0] Withdrawn(Withdrawn { amount: 30 })"
    );
}

#[test]
fn the_wrong_error_variant_is_shown() {
    let message = failure(|| {
        AggregateFixture::<Account>::new()
            .given([opened(), deposited(10)])
            .when(withdraw(30))
            .then_error(|e| matches!(e, AccountError::Closed));
    });
    assert!(
        message.starts_with(
            "`Withdraw` on `account-a1` was rejected, but not with the expected error"
        ),
        "{message}"
    );
    assert!(message.contains("InsufficientFunds {"), "{message}");

    let message = failure(|| {
        AggregateFixture::<Account>::new()
            .given([opened(), deposited(10)])
            .when(withdraw(30))
            .then_error_eq(AccountError::InsufficientFunds {
                balance: 10,
                requested: 31,
            });
    });
    assert!(
        message.contains(
            "expected:\n    InsufficientFunds {\n        balance: 10,\n        requested: 31,"
        ),
        "{message}"
    );
    assert!(
        message.contains(
            "actual:\n    InsufficientFunds {\n        balance: 10,\n        requested: 30,"
        ),
        "{message}"
    );
}

#[test]
fn a_wrong_state_shows_both_sides() {
    let message = failure(|| {
        AggregateFixture::<Account>::new()
            .given([opened()])
            .when(AccountCommand::Deposit {
                account: "a1".into(),
                amount: 5,
            })
            .then_state_eq(Account {
                open: true,
                closed: false,
                owner: "Ada".into(),
                balance: 6,
            });
    });
    assert!(
        message.starts_with("after `Deposit` on `account-a1`, the state differs"),
        "{message}"
    );
    assert!(message.contains("balance: 6,"), "{message}");
    assert!(message.contains("balance: 5,"), "{message}");
}

/// Sums deposits.
#[derive(Debug, Default, PartialEq)]
struct Deposits(u64);

impl Projection for Deposits {
    const NAME: &'static str = "deposits";
    type Event = AccountEvent;
    fn apply(&mut self, envelope: &Envelope<AccountEvent>) -> Result<(), BoxError> {
        match &envelope.event {
            AccountEvent::Deposited(d) => self.0 += d.amount,
            AccountEvent::Closed(_) => return Err("closed accounts are not expected".into()),
            _ => {}
        }
        Ok(())
    }
}

#[test]
fn a_wrong_read_model_shows_both_sides_and_the_events_applied() {
    let message = failure(|| {
        let _ = ProjectionFixture::new(Deposits::default())
            .given_events("account-a1", [opened(), deposited(5)])
            .then_read_model_eq(Deposits(6));
    });
    assert!(
        message.starts_with(
            "projection `deposits`: the read model differs from the expected one
  expected:
    Deposits(
        6,
    )
  actual:
    Deposits(
        5,
    )
after 2 event(s):
  [0] account-a1 at version 1 (position 1, \"account.opened\")
  [1] account-a1 at version 2 (position 2, \"account.deposited\")"
        ),
        "{message}"
    );
}

#[test]
fn a_failing_projection_names_the_event() {
    let message = failure(|| {
        let _ = ProjectionFixture::new(Deposits::default()).given_events(
            "account-a1",
            [opened(), AccountEvent::Closed(bank::Closed {})],
        );
    });
    assert_eq!(
        message,
        "projection `deposits` failed to apply the event in stream account-a1 at version 2 \
         (position 2, \"account.closed\"): closed accounts are not expected"
    );
}

/// Asks for a receipt for every deposit.
#[derive(Default)]
struct Receipts;

#[derive(Debug, PartialEq)]
struct SendReceipt(u64);

impl ProcessManager for Receipts {
    const NAME: &'static str = "receipts";
    type Event = AccountEvent;
    type Command = SendReceipt;
    fn react(
        &mut self,
        envelope: &Envelope<AccountEvent>,
        outbox: &mut Outbox<SendReceipt>,
    ) -> Result<(), BoxError> {
        if let AccountEvent::Deposited(d) = &envelope.event {
            outbox.issue(SendReceipt(d.amount));
        }
        Ok(())
    }
}

#[test]
fn a_wrong_command_is_named_by_index_with_both_sides_shown() {
    let message = failure(|| {
        let _ = ProcessManagerFixture::new(Receipts)
            .given_events("account-a1", [opened()])
            .when_events("account-a1", [deposited(5), deposited(7)])
            .then_commands([SendReceipt(5), SendReceipt(8)]);
    });
    assert_eq!(
        message,
        "process manager `receipts` issued other commands than expected: \
the commands differ, first at command #1:
  expected[1]:
    SendReceipt(
        8,
    )
  actual[1]:
    SendReceipt(
        7,
    )
expected 2 commands:
  [0] SendReceipt(5)
  [1] SendReceipt(8)
actual 2 commands:
  [0] SendReceipt(5)
  [1] SendReceipt(7)"
    );
}

#[test]
fn checking_commands_without_an_event_under_test_explains_given_and_when() {
    let message = failure(|| {
        let _ = ProcessManagerFixture::new(Receipts)
            .given_events("account-a1", [deposited(5)])
            .then_commands([SendReceipt(5)]);
    });
    assert!(
        message.starts_with("process manager `receipts`: no event under test"),
        "{message}"
    );
}

#[test]
fn the_flow_names_what_it_checks() {
    let message = failure(|| {
        FlowFixture::<Account>::new()
            .with_projection(Deposits::default())
            .with_process_manager(Receipts)
            .given([opened()])
            .when(AccountCommand::Deposit {
                account: "a1".into(),
                amount: 5,
            })
            .then_read_model_eq(Deposits(5))
            .then_commands::<Receipts>([SendReceipt(6)]);
    });
    assert!(
        message.starts_with(
            "after `Deposit` on `account-a1`, process manager `receipts` issued other commands \
             than expected: the commands differ, first at command #0:"
        ),
        "{message}"
    );

    let message = failure(|| {
        AggregateFixture::<Account>::new()
            .when(AccountCommand::Open {
                account: "a1".into(),
                owner: "Ada".into(),
            })
            .then_read_model(|_: &Deposits| {});
    });
    assert_eq!(
        message,
        "no projection `deposits` in this fixture: add it with `FlowFixture::with_projection`"
    );
}
