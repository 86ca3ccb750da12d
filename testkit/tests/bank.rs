//! The bank example's domain, specified entirely through the testkit's fixtures.

use std::collections::BTreeMap;

use bank::{
    Account, AccountCommand, AccountError, AccountEvent, Cents, Closed, Deposited, Opened,
    Withdrawn,
};
use factum::{
    BoxError, CommandContext, CorrelationId, Envelope, Outbox, ProcessManager, Projection,
};
use factum_testkit::properties::{assert_invariants, check_invariants, command_sequences};
use factum_testkit::proptest::prelude::*;
use factum_testkit::{
    AggregateFixture, FlowFixture, ProcessManagerFixture, ProjectionFixture, envelope,
};

// --- vocabulary -------------------------------------------------------------------------------

fn opened(owner: &str) -> AccountEvent {
    AccountEvent::Opened(Opened {
        owner: owner.into(),
    })
}

fn deposited(amount: Cents) -> AccountEvent {
    AccountEvent::Deposited(Deposited { amount })
}

fn withdrawn(amount: Cents) -> AccountEvent {
    AccountEvent::Withdrawn(Withdrawn { amount })
}

fn closed() -> AccountEvent {
    AccountEvent::Closed(Closed {})
}

fn open(owner: &str) -> AccountCommand {
    AccountCommand::Open {
        account: "a1".into(),
        owner: owner.into(),
    }
}

fn deposit(amount: Cents) -> AccountCommand {
    AccountCommand::Deposit {
        account: "a1".into(),
        amount,
    }
}

fn withdraw(amount: Cents) -> AccountCommand {
    AccountCommand::Withdraw {
        account: "a1".into(),
        amount,
    }
}

fn close() -> AccountCommand {
    AccountCommand::Close {
        account: "a1".into(),
    }
}

// --- the aggregate ----------------------------------------------------------------------------

#[test]
fn opening_a_new_account() {
    AggregateFixture::<Account>::new()
        .when(open("Ada"))
        .then_events([opened("Ada")])
        .then_state_eq(Account {
            open: true,
            closed: false,
            owner: "Ada".into(),
            balance: 0,
        });
}

#[test]
fn an_account_opens_only_once() {
    AggregateFixture::<Account>::new()
        .given([opened("Ada")])
        .when(open("Bob"))
        .then_error_eq(AccountError::AlreadyOpen)
        .then_state(|account| assert_eq!(account.owner, "Ada"));
}

#[test]
fn nothing_happens_to_an_account_that_was_never_opened() {
    AggregateFixture::<Account>::new()
        .when(deposit(10))
        .then_error_eq(AccountError::NotOpen);
}

#[test]
fn deposits_add_up() {
    AggregateFixture::<Account>::new()
        .given([opened("Ada"), deposited(100)])
        .when(deposit(50))
        .then_events([deposited(50)])
        .then_state(|account| assert_eq!(account.balance, 150));
}

#[test]
fn amounts_must_be_positive() {
    for command in [deposit(0), withdraw(0)] {
        AggregateFixture::<Account>::new()
            .given([opened("Ada"), deposited(100)])
            .when(command)
            .then_error(|e| matches!(e, AccountError::ZeroAmount));
    }
}

#[test]
fn withdrawing_within_the_balance() {
    AggregateFixture::<Account>::new()
        .given([opened("Ada"), deposited(100)])
        .when(withdraw(100))
        .then_events([withdrawn(100)])
        .then_state(|account| assert_eq!(account.balance, 0));
}

#[test]
fn withdrawing_more_than_the_balance_is_rejected_and_stores_nothing() {
    let outcome = AggregateFixture::<Account>::new()
        .given([opened("Ada"), deposited(100), withdrawn(30)])
        .when(withdraw(71))
        .then_error(|e| {
            matches!(
                e,
                AccountError::InsufficientFunds {
                    balance: 70,
                    requested: 71
                }
            )
        })
        .then_state(|account| assert_eq!(account.balance, 70))
        .then_recorded(|recorded| assert!(recorded.is_empty()));
    assert_eq!(outcome.version().get(), 3);
    assert_eq!(outcome.store().len(), 3);
}

#[test]
fn closing_requires_a_zero_balance() {
    AggregateFixture::<Account>::new()
        .given([opened("Ada"), deposited(5)])
        .when(close())
        .then_error_eq(AccountError::BalanceNotZero(5));

    AggregateFixture::<Account>::new()
        .given([opened("Ada"), deposited(5), withdrawn(5)])
        .when(close())
        .then_events([closed()])
        .then_state(|account| assert!(account.closed));
}

#[test]
fn a_closed_account_rejects_everything() {
    for command in [open("Ada"), deposit(1), withdraw(1), close()] {
        AggregateFixture::<Account>::new()
            .given([opened("Ada"), closed()])
            .when(command)
            .then_error_eq(AccountError::Closed);
    }
}

#[test]
fn recorded_events_carry_versions_and_the_commands_context() {
    let workflow = CorrelationId::new();
    let context = CommandContext::new()
        .with_correlation_id(workflow)
        .with_metadata("teller", "t-7")
        .expect("a string serialises");
    let command_id = context.command_id;
    AggregateFixture::<Account>::new()
        .given([opened("Ada"), deposited(100)])
        .when_with(withdraw(10), context)
        .then_events([withdrawn(10)])
        .then_recorded(|recorded| {
            let [withdrawal] = recorded else {
                panic!("one event expected, got {recorded:?}")
            };
            assert_eq!(withdrawal.stream_id.as_str(), "account-a1");
            assert_eq!(withdrawal.stream_version.get(), 3);
            assert_eq!(withdrawal.position.global.get(), 3);
            assert_eq!(withdrawal.metadata.correlation_id, Some(workflow));
            assert_eq!(withdrawal.metadata.causation_id, Some(command_id.into()));
            assert_eq!(
                withdrawal
                    .metadata
                    .user
                    .get::<String>("teller")
                    .expect("decodes")
                    .as_deref(),
                Some("t-7")
            );
        })
        .then_correlation_flows();
}

// --- a projection: balances of all accounts ---------------------------------------------------

/// What an account looks like on a statement.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Statement {
    owner: String,
    balance: Cents,
    closed: bool,
    /// The tenant from the last event's metadata.
    tenant: Option<String>,
}

/// Every account's statement, by account id.
#[derive(Debug, Default, PartialEq, Eq)]
struct Statements(BTreeMap<String, Statement>);

impl Projection for Statements {
    const NAME: &'static str = "statements";
    type Event = AccountEvent;

    fn apply(&mut self, envelope: &Envelope<AccountEvent>) -> Result<(), BoxError> {
        let id = envelope.stream_id.aggregate_id().to_owned();
        let statement = self.0.entry(id).or_default();
        statement.tenant = envelope.metadata.user.get("tenant")?;
        match &envelope.event {
            AccountEvent::Opened(e) => statement.owner = e.owner.clone(),
            AccountEvent::Deposited(e) => statement.balance += e.amount,
            AccountEvent::Withdrawn(e) => {
                statement.balance = statement.balance.checked_sub(e.amount).ok_or_else(|| {
                    format!(
                        "{} withdrawn from a balance of {}",
                        e.amount, statement.balance
                    )
                })?;
            }
            AccountEvent::Closed(_) => statement.closed = true,
        }
        Ok(())
    }
}

fn statement(owner: &str, balance: Cents, closed: bool, tenant: Option<&str>) -> Statement {
    Statement {
        owner: owner.into(),
        balance,
        closed,
        tenant: tenant.map(Into::into),
    }
}

#[test]
fn statements_follow_every_account() {
    ProjectionFixture::new(Statements::default())
        .given_events("account-a1", [opened("Ada"), deposited(100)])
        .given_events("account-b2", [opened("Bob")])
        .given(envelope("account-a1", withdrawn(30)).metadata("tenant", "acme"))
        .then_read_model_eq(Statements(BTreeMap::from([
            ("a1".into(), statement("Ada", 70, false, Some("acme"))),
            ("b2".into(), statement("Bob", 0, false, None)),
        ])))
        .given_events("account-b2", [closed()])
        .then_read_model_matches(|statements| statements.0["b2"].closed)
        .then_read_model(|statements| assert_eq!(statements.0.len(), 2));
}

// --- a process manager: reviews of large withdrawals ------------------------------------------

/// What the review desk is asked to do.
#[derive(Debug, PartialEq, Eq)]
enum ReviewCommand {
    Review { account: String, amount: Cents },
}

/// Asks for a review of a withdrawal of more than half of what the account ever received.
#[derive(Debug, Default)]
struct LargeWithdrawals {
    received: BTreeMap<String, Cents>,
}

impl ProcessManager for LargeWithdrawals {
    const NAME: &'static str = "large-withdrawals";
    type Event = AccountEvent;
    type Command = ReviewCommand;

    fn react(
        &mut self,
        envelope: &Envelope<AccountEvent>,
        outbox: &mut Outbox<ReviewCommand>,
    ) -> Result<(), BoxError> {
        let account = envelope.stream_id.aggregate_id();
        let received = self.received.entry(account.to_owned()).or_default();
        match &envelope.event {
            AccountEvent::Deposited(e) => *received += e.amount,
            AccountEvent::Withdrawn(e) if e.amount * 2 > *received => {
                outbox.issue(ReviewCommand::Review {
                    account: account.to_owned(),
                    amount: e.amount,
                });
            }
            _ => {}
        }
        Ok(())
    }
}

#[test]
fn large_withdrawals_are_reviewed() {
    let workflow = CorrelationId::new();
    let withdrawal = envelope("account-a1", withdrawn(60)).correlation_id(workflow);
    ProcessManagerFixture::new(LargeWithdrawals::default())
        .given_events("account-a1", [opened("Ada"), deposited(100)])
        .when_events("account-a1", [withdrawn(40)])
        .then_no_commands()
        .when(withdrawal)
        .then_commands([ReviewCommand::Review {
            account: "a1".into(),
            amount: 60,
        }])
        .then_issued(|issued| {
            assert_eq!(issued[0].context.correlation_id, workflow);
        })
        .then_state(|manager| assert_eq!(manager.received["a1"], 100));
}

// --- the whole flow ---------------------------------------------------------------------------

#[test]
fn a_large_withdrawal_updates_the_statement_and_asks_for_a_review() {
    FlowFixture::<Account>::new()
        .with_projection(Statements::default())
        .with_process_manager(LargeWithdrawals::default())
        .given([opened("Ada"), deposited(100)])
        .given_stream("account-b2", [opened("Bob"), deposited(10), withdrawn(9)])
        .when(withdraw(60))
        .then_events([withdrawn(60)])
        .then_read_model_eq(Statements(BTreeMap::from([
            ("a1".into(), statement("Ada", 40, false, None)),
            ("b2".into(), statement("Bob", 1, false, None)),
        ])))
        // Bob's large withdrawal is in the past: only Ada's is reviewed now.
        .then_commands::<LargeWithdrawals>([ReviewCommand::Review {
            account: "a1".into(),
            amount: 60,
        }])
        .then_correlation_flows();
}

#[test]
fn a_rejected_withdrawal_changes_no_read_model_and_asks_for_nothing() {
    FlowFixture::<Account>::new()
        .with_projection(Statements::default())
        .with_process_manager(LargeWithdrawals::default())
        .given([opened("Ada"), deposited(100)])
        .when(withdraw(500))
        .then_error(|e| matches!(e, AccountError::InsufficientFunds { .. }))
        .then_read_model(|statements: &Statements| assert_eq!(statements.0["a1"].balance, 100))
        .then_no_commands::<LargeWithdrawals>();
}

// --- properties -------------------------------------------------------------------------------

fn account_command() -> impl Strategy<Value = AccountCommand> {
    let amount = || prop_oneof![Just(0), 1..200 as Cents, Just(1_000)];
    prop_oneof![
        1 => Just(open("Ada")),
        4 => amount().prop_map(deposit),
        4 => amount().prop_map(withdraw),
        1 => Just(close()),
    ]
}

#[test]
fn an_account_never_breaks_its_rules() {
    assert_invariants::<Account, _>(command_sequences(account_command(), 0..40), |account| {
        prop_assert!(!account.closed || account.open, "closed but never opened");
        prop_assert!(
            !account.closed || account.balance == 0,
            "closed with money left"
        );
        prop_assert!(
            account.open || account.balance == 0,
            "money in an unopened account"
        );
        Ok(())
    });
}

proptest! {
    #[test]
    fn the_balance_never_exceeds_what_was_deposited(
        commands in command_sequences(account_command(), 0..40)
    ) {
        let offered: Cents = commands
            .iter()
            .map(|c| match c {
                AccountCommand::Deposit { amount, .. } => *amount,
                _ => 0,
            })
            .sum();
        check_invariants::<Account>(&commands, |account| {
            prop_assert!(account.balance <= offered);
            Ok(())
        })?;
    }
}

// --- readers with their own event types -------------------------------------------------------

/// The only account event the ledger cares about, decoded into its own type: a projection reads
/// the wire format, not the aggregate's enum.
#[derive(Debug)]
struct MoneyIn {
    amount: Cents,
}

impl factum::Event for MoneyIn {
    fn event_type(&self) -> &'static str {
        "account.deposited"
    }
    fn schema_version(&self) -> u32 {
        1
    }
    fn event_types() -> &'static [&'static str] {
        &["account.deposited"]
    }
    fn encode(&self) -> Result<Box<factum::RawValue>, factum::EncodeError> {
        factum::encode_json(&Deposited {
            amount: self.amount,
        })
    }
    fn decode(stored: &factum::Stored<'_>) -> Result<Self, factum::DecodeError> {
        let (event_type, version, payload) =
            (stored.event_type, stored.schema_version, stored.payload);
        match (event_type, version) {
            ("account.deposited", 1) => {
                let Deposited { amount } = factum::decode_json(payload)?;
                Ok(MoneyIn { amount })
            }
            _ => Err(factum::DecodeError::unknown(event_type, version)),
        }
    }
}

/// Every deposit, in log order.
#[derive(Debug, Default, PartialEq)]
struct Ledger(Vec<(String, Cents)>);

impl Projection for Ledger {
    const NAME: &'static str = "ledger";
    type Event = MoneyIn;

    fn apply(&mut self, envelope: &Envelope<MoneyIn>) -> Result<(), BoxError> {
        self.0
            .push((envelope.stream_id.to_string(), envelope.event.amount));
        Ok(())
    }
}

#[test]
fn a_projection_sees_only_the_events_it_declares_decoded_into_its_own_type() {
    FlowFixture::<Account>::new()
        .with_projection(Ledger::default())
        .given([opened("Ada"), deposited(100), withdrawn(5)])
        .given_stream("account-b2", [opened("Bob"), deposited(7)])
        .when(deposit(20))
        .then_events([deposited(20)])
        .then_read_model_eq(Ledger(vec![
            ("account-a1".into(), 100),
            ("account-b2".into(), 7),
            ("account-a1".into(), 20),
        ]));
}

#[tokio::test]
async fn the_fixtures_work_inside_an_async_test() {
    AggregateFixture::<Account>::new()
        .given([opened("Ada")])
        .when(deposit(1))
        .then_events([deposited(1)]);
}
