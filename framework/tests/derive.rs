//! The derives' generated impls, exercised through the public API.

use factum::{
    Aggregate, Command, DecodeError, Envelope, Event, EventFilter, Projection, RawValue, Stored,
    StreamId, StreamVersion,
};
use serde::{Deserialize, Serialize};

fn raw(json: &str) -> Box<RawValue> {
    RawValue::from_string(json.to_owned()).expect("valid JSON")
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Opened {
    owner: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct DepositedV1 {
    cents: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Deposited {
    amount: u64,
    currency: String,
}

impl From<DepositedV1> for Deposited {
    fn from(v1: DepositedV1) -> Self {
        Self {
            amount: v1.cents,
            currency: "EUR".into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Event)]
#[event(prefix = "account")]
enum AccountEvent {
    Opened(Opened),
    #[event(version = 2, upcast_from(DepositedV1 = 1))]
    Deposited(Deposited),
    #[event(name = "account.closed")]
    Closed {
        reason: String,
        at: Option<u64>,
    },
    Frozen,
    MoneyWithdrawn(Deposited),
}

#[test]
fn wire_names_follow_the_prefix_and_snake_case_rule() {
    assert_eq!(
        AccountEvent::event_types(),
        [
            "account.opened",
            "account.deposited",
            "account.closed",
            "account.frozen",
            "account.money_withdrawn"
        ]
    );
    let frozen = AccountEvent::Frozen;
    assert_eq!(frozen.event_type(), "account.frozen");
    assert_eq!(frozen.schema_version(), 1);
    let deposited = AccountEvent::Deposited(Deposited {
        amount: 5,
        currency: "EUR".into(),
    });
    assert_eq!(deposited.event_type(), "account.deposited");
    assert_eq!(deposited.schema_version(), 2);
}

#[test]
fn every_shape_round_trips() {
    let events = [
        AccountEvent::Opened(Opened {
            owner: "ada".into(),
        }),
        AccountEvent::Deposited(Deposited {
            amount: 5,
            currency: "GBP".into(),
        }),
        AccountEvent::Closed {
            reason: "moved".into(),
            at: Some(7),
        },
        AccountEvent::Frozen,
    ];
    for event in events {
        let payload = event.encode().expect("encodes");
        let back = AccountEvent::decode(&Stored::new(
            event.event_type(),
            event.schema_version(),
            &payload,
        ))
        .expect("decodes");
        assert_eq!(back, event);
    }
}

#[test]
fn payload_shapes_are_plain_json() {
    let closed = AccountEvent::Closed {
        reason: "moved".into(),
        at: None,
    };
    assert_eq!(
        closed.encode().expect("encodes").get(),
        r#"{"reason":"moved","at":null}"#
    );
    assert_eq!(AccountEvent::Frozen.encode().expect("encodes").get(), "{}");
    let opened = AccountEvent::Opened(Opened { owner: "a".into() });
    assert_eq!(opened.encode().expect("encodes").get(), r#"{"owner":"a"}"#);
    // A missing `Option` field of a struct variant reads as `None`.
    let decoded =
        AccountEvent::decode(&Stored::new("account.closed", 1, &raw(r#"{"reason":"x"}"#)));
    assert_eq!(
        decoded.expect("decodes"),
        AccountEvent::Closed {
            reason: "x".into(),
            at: None
        }
    );
}

#[test]
fn an_old_version_is_upcast() {
    let event = AccountEvent::decode(&Stored::new(
        "account.deposited",
        1,
        &raw(r#"{"cents":250}"#),
    ))
    .expect("v1 decodes");
    assert_eq!(
        event,
        AccountEvent::Deposited(Deposited {
            amount: 250,
            currency: "EUR".into()
        })
    );
}

#[test]
fn unknown_names_and_versions_are_typed_errors() {
    let err =
        AccountEvent::decode(&Stored::new("account.deposited", 3, &raw("{}"))).expect_err("no v3");
    assert!(
        matches!(err, DecodeError::Unknown { version: 3, .. }),
        "{err:?}"
    );
    let err =
        AccountEvent::decode(&Stored::new("account.reopened", 1, &raw("{}"))).expect_err("unknown");
    assert!(matches!(err, DecodeError::Unknown { .. }), "{err:?}");
    let err = AccountEvent::decode(&Stored::new("account.opened", 1, &raw(r#"{"owner":1}"#)))
        .expect_err("bad payload");
    assert!(matches!(err, DecodeError::Payload(_)), "{err:?}");
}

#[test]
fn a_filter_from_the_event_type_fetches_only_its_names() {
    let filter = EventFilter::for_event::<AccountEvent>();
    assert!(filter.matches_parts("account", "account.money_withdrawn"));
    assert!(!filter.matches_parts("account", "account.renamed"));
}

/// A struct event with its own name, version and history.
#[derive(Debug, PartialEq, Serialize, Deserialize, Event)]
#[event(
    name = "customer.registered",
    version = 3,
    upcast_from(RegisteredV1 = 1, RegisteredV2 = 2)
)]
struct Registered {
    full_name: String,
    email: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct RegisteredV1 {
    name: String,
}

#[derive(Serialize, Deserialize)]
struct RegisteredV2 {
    full_name: String,
}

impl From<RegisteredV1> for RegisteredV2 {
    fn from(v1: RegisteredV1) -> Self {
        Self { full_name: v1.name }
    }
}

impl From<RegisteredV2> for Registered {
    fn from(v2: RegisteredV2) -> Self {
        Self {
            full_name: v2.full_name,
            email: None,
        }
    }
}

#[test]
fn a_struct_event_walks_its_whole_chain() {
    assert_eq!(Registered::event_types(), ["customer.registered"]);
    let expected = Registered {
        full_name: "Ada".into(),
        email: None,
    };
    let v1 = Registered::decode(&Stored::new(
        "customer.registered",
        1,
        &raw(r#"{"name":"Ada"}"#),
    ));
    assert_eq!(v1.expect("v1"), expected);
    let v2 = Registered::decode(&Stored::new(
        "customer.registered",
        2,
        &raw(r#"{"full_name":"Ada"}"#),
    ));
    assert_eq!(v2.expect("v2"), expected);
    assert_eq!(expected.schema_version(), 3);
    assert_eq!(expected.event_type(), "customer.registered");
}

#[derive(Debug, PartialEq, Serialize, Deserialize, Event)]
#[event(prefix = "shop", rename_all = "kebab-case")]
struct OrderPlaced {}

#[test]
fn a_struct_event_name_can_be_derived() {
    assert_eq!(OrderPlaced::event_types(), ["shop.order-placed"]);
}

#[derive(Command)]
#[command(name = "Deposit")]
struct DepositMoney {
    #[command(id)]
    account: u32,
    #[allow(dead_code)]
    amount: u64,
}

#[derive(Command)]
struct Rename(#[command(id)] String, #[allow(dead_code)] String);

#[derive(Command)]
#[command(id = account)]
enum AccountCommand {
    Open {
        account: String,
    },
    #[command(name = "Withdraw")]
    TakeOut {
        account: String,
    },
    Transfer {
        #[allow(dead_code)]
        account: String,
        #[command(id)]
        from: String,
    },
    Freeze(#[command(id)] u64),
}

#[test]
fn commands_name_themselves_and_find_their_id() {
    let c = DepositMoney {
        account: 42,
        amount: 1,
    };
    assert_eq!(
        (c.command_name(), c.aggregate_id()),
        ("Deposit", "42".into())
    );
    let c = Rename("r1".into(), "x".into());
    assert_eq!(
        (c.command_name(), c.aggregate_id()),
        ("Rename", "r1".into())
    );

    let open = AccountCommand::Open {
        account: "a1".into(),
    };
    assert_eq!(
        (open.command_name(), open.aggregate_id()),
        ("Open", "a1".into())
    );
    let take = AccountCommand::TakeOut {
        account: "a2".into(),
    };
    assert_eq!(
        (take.command_name(), take.aggregate_id()),
        ("Withdraw", "a2".into())
    );
    let transfer = AccountCommand::Transfer {
        account: "to".into(),
        from: "from".into(),
    };
    assert_eq!(transfer.aggregate_id(), "from");
    assert_eq!(AccountCommand::Freeze(9).aggregate_id(), "9");
}

#[derive(Debug, thiserror::Error)]
#[error("closed")]
struct IsClosed;

#[derive(Default, Aggregate)]
#[aggregate(type = "account", command = AccountCommand, event = AccountEvent, error = IsClosed)]
struct Account {
    opened: bool,
    closed: bool,
    balance: u64,
}

impl Account {
    fn decide(&self, command: &AccountCommand) -> Result<Vec<AccountEvent>, IsClosed> {
        if self.closed {
            return Err(IsClosed);
        }
        Ok(match command {
            AccountCommand::Open { account } => vec![AccountEvent::Opened(Opened {
                owner: account.clone(),
            })],
            _ => vec![AccountEvent::Frozen],
        })
    }

    fn evolve(&mut self, event: &AccountEvent) {
        match event {
            AccountEvent::Opened(_) => self.opened = true,
            AccountEvent::Deposited(d) => self.balance += d.amount,
            AccountEvent::Closed { .. } => self.closed = true,
            AccountEvent::Frozen | AccountEvent::MoneyWithdrawn(_) => {}
        }
    }
}

#[test]
fn the_aggregate_delegates_to_decide_and_evolve() {
    assert_eq!(Account::TYPE, "account");
    let mut account = Account::default();
    let events = account
        .decide(&AccountCommand::Open {
            account: "a".into(),
        })
        .expect("decides");
    for e in &events {
        account.evolve(e);
    }
    assert!(account.opened);
    account.evolve(&AccountEvent::Closed {
        reason: "r".into(),
        at: None,
    });
    let rejected = account.decide(&AccountCommand::Freeze(1));
    assert!(matches!(rejected, Err(IsClosed)));
    // Through the trait, as the repository calls it: the inherent methods, no recursion.
    let mut fresh = Account::default();
    let events = Aggregate::decide(
        &fresh,
        &AccountCommand::Open {
            account: "b".into(),
        },
    )
    .expect("decides");
    Aggregate::evolve(&mut fresh, &events[0]);
    assert!(fresh.opened);
}

// Methods written in another module, visible to the derive; a generic state type.
mod elsewhere {
    use super::*;

    #[derive(Default, Aggregate)]
    #[aggregate(type = "tally", command = AccountCommand, event = AccountEvent, error = IsClosed)]
    pub(super) struct Tally<T: Default + Send + Sync + 'static> {
        pub(super) seen: Vec<T>,
    }

    mod rules {
        use super::*;

        impl<T: Default + Send + Sync + 'static> Tally<T> {
            pub(crate) fn decide(&self, _: &AccountCommand) -> Result<Vec<AccountEvent>, IsClosed> {
                Ok(vec![AccountEvent::Frozen, AccountEvent::Frozen])
            }

            pub(crate) fn evolve(&mut self, _: &AccountEvent) {
                self.seen.push(T::default());
            }
        }
    }
}

#[test]
fn methods_in_another_module_and_generic_states_are_found() {
    let mut tally = elsewhere::Tally::<u8>::default();
    for event in Aggregate::decide(&tally, &AccountCommand::Freeze(1)).expect("decides") {
        Aggregate::evolve(&mut tally, &event);
    }
    assert_eq!(tally.seen, [0, 0]);
}

mod custom_paths {
    use super::*;

    mod rules {
        use super::*;

        // Named like the trait method, in a module: it cannot be the trait method, and a
        // generic one has its parameters inferred from the call.
        pub(super) fn decide<L>(_: &L, _: &AccountCommand) -> Result<Vec<AccountEvent>, IsClosed> {
            Ok(vec![AccountEvent::Frozen])
        }
    }

    fn count(ledger: &mut Ledger, _: &AccountEvent) {
        ledger.seen += 1;
    }

    #[derive(Default, Serialize, Deserialize, Aggregate)]
    #[aggregate(
        type = "ledger",
        command = AccountCommand,
        event = AccountEvent,
        error = IsClosed,
        decide = rules::decide,
        evolve = count,
        snapshot_version = 4,
    )]
    pub(super) struct Ledger {
        pub(super) seen: u32,
    }
}

#[test]
fn function_paths_and_snapshots_are_configurable() {
    use custom_paths::Ledger;
    let mut ledger = Ledger::default();
    let events = ledger.decide(&AccountCommand::Freeze(1)).expect("decides");
    ledger.evolve(&events[0]);
    assert_eq!(ledger.seen, 1);
    assert_eq!(<Ledger as factum::Snapshot>::SNAPSHOT_VERSION, 4);
}

#[derive(Default, Projection)]
#[projection(name = "balances", event = AccountEvent)]
struct Balances {
    total: u64,
    opened: Vec<String>,
}

impl Balances {
    fn apply(&mut self, envelope: &Envelope<AccountEvent>) -> Result<(), String> {
        match &envelope.event {
            AccountEvent::Opened(_) => self.opened.push(envelope.stream_id.to_string()),
            AccountEvent::Deposited(d) if d.amount == 0 => return Err("zero deposit".into()),
            AccountEvent::Deposited(d) => self.total += d.amount,
            _ => {}
        }
        Ok(())
    }
}

#[derive(Default, Projection)]
#[projection(name = "opened-count", event = AccountEvent, apply = Self::count)]
struct OpenedCount(u32);

impl OpenedCount {
    fn count(&mut self, envelope: &Envelope<AccountEvent>) {
        if let AccountEvent::Opened(_) = envelope.event {
            self.0 += 1;
        }
    }
}

/// Reads the `account` category whole: a stored type the aggregate does not register stops it.
#[derive(Default, Projection)]
#[projection(name = "strict-opened-count", event = AccountEvent, apply = Self::count, reads(Account))]
struct StrictOpenedCount(u32);

impl StrictOpenedCount {
    fn count(&mut self, envelope: &Envelope<AccountEvent>) {
        if let AccountEvent::Opened(_) = envelope.event {
            self.0 += 1;
        }
    }
}

#[tokio::test]
async fn a_projection_that_reads_its_aggregates_stops_on_an_unregistered_type() {
    use factum::subscription::{Projector, Subscription};
    use factum::{AppendRequest, EventStore, InMemoryStore, NewEvent};

    assert!(<OpenedCount as factum::Projection>::known_events().is_none());
    let known = <StrictOpenedCount as factum::Projection>::known_events().expect("declared");
    assert!(known.knows("account", "account.opened"));
    assert!(!known.knows("account", "account.opend"));

    let store = InMemoryStore::new();
    let raw_event = |event_type: &str, json: &str| NewEvent {
        event_id: factum::EventId::new(),
        event_type: event_type.into(),
        schema_version: 1,
        payload: raw(json),
        metadata: Default::default(),
    };
    let stream = StreamId::new("account-1").expect("valid");
    for (event_type, json) in [
        ("account.opened", r#"{"owner":"a"}"#),
        ("account.opend", r#"{"owner":"b"}"#),
    ] {
        store
            .append(AppendRequest::new(
                stream.clone(),
                vec![raw_event(event_type, json)],
            ))
            .await
            .expect("append");
    }
    let mut strict = Projector::new(StrictOpenedCount::default());
    let err = Subscription::for_projection::<StrictOpenedCount>(store.clone())
        .handler_retries(1, std::time::Duration::ZERO)
        .catch_up(&mut strict)
        .await
        .expect_err("an unregistered type stops the projection");
    assert!(err.to_string().contains("account.opend"), "{err}");
    assert_eq!(strict.get().0, 1);

    // Without `reads`, the type filter never reads the typo (the documented default).
    let mut lenient = Projector::new(OpenedCount::default());
    Subscription::for_projection::<OpenedCount>(store)
        .catch_up(&mut lenient)
        .await
        .expect("reads only its own types");
    assert_eq!(lenient.get().0, 1);
}

fn envelope(event: AccountEvent) -> Envelope<AccountEvent> {
    let stream = StreamId::for_aggregate("account", "1").expect("valid");
    Envelope::new(stream, StreamVersion::new(1), event)
}

#[test]
fn projections_dispatch_to_their_handler() {
    assert_eq!(Balances::NAME, "balances");
    let mut balances = Balances::default();
    balances
        .apply(&envelope(AccountEvent::Opened(Opened {
            owner: "a".into(),
        })))
        .expect("applies");
    balances
        .apply(&envelope(AccountEvent::Deposited(Deposited {
            amount: 7,
            currency: "EUR".into(),
        })))
        .expect("applies");
    assert_eq!((balances.total, balances.opened.len()), (7, 1));
    // Through the trait, as subscriptions call it: the inherent method's error, boxed.
    let err = Projection::apply(
        &mut balances,
        &envelope(AccountEvent::Deposited(Deposited {
            amount: 0,
            currency: "EUR".into(),
        })),
    )
    .expect_err("handler error surfaces");
    assert_eq!(err.to_string(), "zero deposit");

    let mut count = OpenedCount::default();
    count
        .apply(&envelope(AccountEvent::Opened(Opened {
            owner: "a".into(),
        })))
        .expect("infallible handler");
    assert_eq!((OpenedCount::NAME, count.0), ("opened-count", 1));
}

/// The `crate` override: generated code reaches factum through another path.
mod reexported {
    pub(crate) mod my_framework {
        pub(crate) use factum as fw;
    }

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize, factum::Event)]
    #[factum(crate = "self::my_framework::fw")]
    #[event(name = "x.happened")]
    pub(crate) struct Happened {}

    #[derive(factum::Command)]
    #[factum(crate = "self::my_framework::fw")]
    pub(crate) struct Happen {
        #[command(id)]
        pub(crate) id: String,
    }

    // No `use factum::...` here: the derives reach everything through the override.
    #[derive(Default, factum::Aggregate)]
    #[factum(crate = "self::my_framework::fw")]
    #[aggregate(type = "x", command = Happen, event = Happened, error = std::fmt::Error)]
    pub(crate) struct Counter {
        pub(crate) seen: u32,
    }

    impl Counter {
        fn decide(&self, _: &Happen) -> Result<Vec<Happened>, std::fmt::Error> {
            Ok(vec![Happened {}])
        }

        fn evolve(&mut self, _: &Happened) {
            self.seen += 1;
        }
    }

    #[derive(Default, factum::Projection)]
    #[factum(crate = "self::my_framework::fw")]
    #[projection(name = "x", event = Happened)]
    pub(crate) struct Seen(pub(crate) u32);

    impl Seen {
        fn apply(&mut self, _: &my_framework::fw::Envelope<Happened>) {
            self.0 += 1;
        }
    }
}

#[test]
fn the_crate_path_can_be_overridden() {
    assert_eq!(reexported::Happened {}.event_type(), "x.happened");
    let mut counter = reexported::Counter::default();
    let command = reexported::Happen { id: "1".into() };
    for event in Aggregate::decide(&counter, &command).expect("decides") {
        Aggregate::evolve(&mut counter, &event);
    }
    assert_eq!(counter.seen, 1);
    let mut seen = reexported::Seen::default();
    let stream = StreamId::for_aggregate("x", "1").expect("valid");
    Projection::apply(
        &mut seen,
        &Envelope::new(stream, StreamVersion::new(1), reexported::Happened {}),
    )
    .expect("applies");
    assert_eq!(seen.0, 1);
}
