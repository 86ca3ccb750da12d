//! The derive macros, re-exported with their documentation. The book chapter
//! `reference/derives.md` covers the same ground with more background.

/// Derives [`Event`](trait@crate::Event): a wire name and schema version per event, encoding, and
/// decoding with upcasting from older versions.
///
/// # On an enum: one variant per kind of event
///
/// A variant is a newtype around its payload type (`Opened(Opened)`, the payload must be
/// `Serialize + Deserialize`), a struct variant (`Closed { reason: String }`, stored as a JSON
/// object of its fields) or a unit variant (`Frozen`, stored as `{}`).
///
/// ```
/// use factum::Event;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, PartialEq, Serialize, Deserialize)]
/// pub struct Opened { pub owner: String }
///
/// #[derive(Debug, PartialEq, Event)]
/// #[event(prefix = "account")]                // wire names `account.{variant in snake_case}`
/// pub enum AccountEvent {
///     Opened(Opened),                         // "account.opened", version 1
///     #[event(name = "account.money_in")]     // an explicit name wins over the rule
///     Deposited { amount: u64 },
///     Frozen,                                 // "account.frozen"
/// }
///
/// assert_eq!(AccountEvent::event_types(), ["account.opened", "account.money_in", "account.frozen"]);
/// let event = AccountEvent::Deposited { amount: 5 };
/// assert_eq!((event.event_type(), event.schema_version()), ("account.money_in", 1));
/// assert_eq!(event.encode()?.get(), r#"{"amount":5}"#);
/// # Ok::<(), factum::EncodeError>(())
/// ```
///
/// # Attributes
///
/// | where | attribute | meaning |
/// |---|---|---|
/// | enum or struct | `#[event(prefix = "account")]` | derived names are `"{prefix}.{name}"` |
/// | enum or struct | `#[event(rename_all = "kebab-case")]` | how the Rust identifier becomes `{name}`: `"snake_case"` (default), `"kebab-case"`, `"camelCase"`, `"PascalCase"`, `"lowercase"`, `"SCREAMING_SNAKE_CASE"` |
/// | variant or struct | `#[event(name = "account.opened")]` | the wire name, instead of the derived one |
/// | variant or struct | `#[event(version = 3)]` | the current schema version (default 1) |
/// | variant or struct | `#[event(upcast_from(OpenedV1 = 1, OpenedV2 = 2))]` | older versions: each type decodes payloads stored at its version |
/// | variant or struct | `#[event(renamed_from("bank.opened"))]` | old wire names: stored events under them decode as this event, at every version of its chain |
/// | enum or struct | `#[event(split(name = "account.opened_with_deposit", version = 1, from = OpenedWithDepositV1))]` | a stored (name, version) read as several events: its payload decodes as `from`, converted by an `Upcast<from> for Vec<Self>` (or `From`); see [`Event::decode_all`](crate::Event::decode_all) |
/// | enum or struct | `#[factum(crate = "path::to::factum")]` | where generated code finds factum, when it is re-exported |
///
/// A derived name follows the Rust identifier: before renaming a variant whose events are
/// stored, pin its old name with `name = "..."`. Two variants with the same wire name, a
/// version listed twice, or a version in `upcast_from` not older than `version`, are compile
/// errors on the offending token.
///
/// # Versions and upcasting
///
/// Each older version is a type of its own with a `From` impl to the next version (or an
/// [`Upcast`](crate::Upcast) impl, when the step needs the stored envelope). A payload
/// stored at version 1 is decoded as the version-1 type, then converted step by step, in version
/// order, to the current type. A missing `From` is a compile error on the `upcast_from` entry
/// that cannot move forward.
///
/// ```
/// use factum::{Event, RawValue, Stored};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct OpenedV1 { name: String }
/// #[derive(Serialize, Deserialize)]
/// struct OpenedV2 { owner: String }
/// #[derive(Debug, PartialEq, Serialize, Deserialize)]
/// struct Opened { owner: String, currency: String }
///
/// impl From<OpenedV1> for OpenedV2 {
///     fn from(v1: OpenedV1) -> Self { Self { owner: v1.name } }
/// }
/// impl From<OpenedV2> for Opened {
///     fn from(v2: OpenedV2) -> Self { Self { owner: v2.owner, currency: "EUR".into() } }
/// }
///
/// #[derive(Debug, PartialEq, Event)]
/// enum AccountEvent {
///     #[event(name = "account.opened", version = 3, upcast_from(OpenedV1 = 1, OpenedV2 = 2))]
///     Opened(Opened),
/// }
///
/// let stored = RawValue::from_string(r#"{"name":"Ada"}"#.into())?;
/// let event = AccountEvent::decode(&Stored::new("account.opened", 1, &stored))?;
/// assert_eq!(event, AccountEvent::Opened(Opened { owner: "Ada".into(), currency: "EUR".into() }));
/// assert_eq!(event.schema_version(), 3); // new events are written at the current version
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # On a struct: one event type
///
/// The struct is the payload; the attributes go on the struct.
///
/// ```
/// use factum::Event;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize, Event)]
/// #[event(prefix = "shop", rename_all = "kebab-case")]
/// struct OrderPlaced { order: u64 }
///
/// assert_eq!(OrderPlaced::event_types(), ["shop.order-placed"]);
/// ```
///
/// Generic types and unions are rejected; so are tuple variants with more than one field.
///
/// # Personal fields
/// `#[personal(subject = customer_id)]` on a named field (of a struct event or of a variant with
/// named fields) marks it as personal data of the subject whose opaque id is in `customer_id`,
/// another field of the same event: stored encrypted by a store with a
/// `Shredder` ([`personal`](crate::personal)), read as a placeholder once the subject is forgotten. The field's
/// type must be `Serialize + Deserialize` and [`Forgettable`](crate::personal::Forgettable); the
/// subject's `Display`. See [`personal`](crate::personal).
///
/// ```
/// #[derive(factum::Event)]
/// #[event(name = "customer.registered")]
/// struct Registered {
///     customer_id: String,
///     #[personal(subject = customer_id)]
///     email: String,
/// }
/// ```
pub use factum_macros::Event;

/// Derives [`Command`](trait@crate::Command): the command's name, and the field holding the id of
/// the aggregate it targets.
///
/// | where | attribute | meaning |
/// |---|---|---|
/// | field | `#[command(id)]` | this field holds the aggregate id (any `Display` type) |
/// | enum or struct | `#[command(id = account)]` | the field named `account` holds it (in every variant of an enum, unless one marks another field) |
/// | variant or struct | `#[command(name = "Deposit")]` | the name in traces and errors; default: the Rust identifier |
/// | enum or struct | `#[factum(crate = "path::to::factum")]` | where generated code finds factum |
///
/// A struct or variant without an id field is a compile error on its name.
///
/// ```
/// use factum::Command;
///
/// #[derive(Command)]
/// struct Deposit {
///     #[command(id)]
///     account: u64,
///     amount: u64,
/// }
///
/// #[derive(Command)]
/// #[command(id = account)]
/// enum AccountCommand {
///     Open { account: String, owner: String },
///     #[command(name = "Withdraw")]
///     TakeOut { account: String, amount: u64 },
///     Transfer { account: String, #[command(id)] from: String },
///     Freeze(#[command(id)] String),
/// }
///
/// let deposit = Deposit { account: 42, amount: 10 };
/// assert_eq!((deposit.command_name(), deposit.aggregate_id()), ("Deposit", "42".to_string()));
/// let take = AccountCommand::TakeOut { account: "a1".into(), amount: 5 };
/// assert_eq!((take.command_name(), take.aggregate_id()), ("Withdraw", "a1".to_string()));
/// let transfer = AccountCommand::Transfer { account: "a1".into(), from: "a2".into() };
/// assert_eq!(transfer.aggregate_id(), "a2");
/// ```
pub use factum_macros::Command;

/// Derives [`Aggregate`](trait@crate::Aggregate) for a state type, delegating
/// [`decide`](crate::Aggregate::decide) and [`evolve`](crate::Aggregate::evolve) to inherent
/// methods of the same names that you write.
///
/// | attribute | meaning |
/// |---|---|
/// | `type = "account"` | [`Aggregate::TYPE`](crate::Aggregate::TYPE), the stream category; must not contain `-` (checked at compile time) |
/// | `command = AccountCommand` | the command type |
/// | `event = AccountEvent` | the event type |
/// | `error = AccountError` | the rejection type |
/// | `decide = path` | the decide function, `fn(&Self, &Command) -> Result<Vec<Event>, Error>`; default `Self::decide` |
/// | `evolve = path` | the evolve function, `fn(&mut Self, &Event)`; default `Self::evolve` |
/// | `snapshot_version = 1` | also implement [`Snapshot`](crate::Snapshot) with this version (the state must be `Serialize + Deserialize`) |
///
/// `type`, `command`, `event` and `error` are required, all in `#[aggregate(...)]`. The state
/// must implement `Default` (the state before the first event).
///
/// A forgotten method is a compile error on the type that names the method to write, with its
/// signature (``"`Counter` has no method `decide`: write `fn decide(&self, command:
/// &CounterCommand) -> Result<Vec<Added>, TooBig>` in an `impl Counter` block"``), never a
/// call of the trait method itself that would recurse forever, also when `factum::Aggregate` is
/// imported.
///
/// ```
/// use factum::{Aggregate, Command, Event};
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Command)]
/// # enum CounterCommand { Add { #[command(id)] id: String, by: u64 } }
/// # #[derive(Debug, Serialize, Deserialize, Event)]
/// # #[event(name = "counter.added")]
/// # struct Added { by: u64 }
/// # #[derive(Debug, thiserror::Error)]
/// # #[error("too big")]
/// # struct TooBig;
///
/// #[derive(Default, Aggregate)]
/// #[aggregate(type = "counter", command = CounterCommand, event = Added, error = TooBig)]
/// struct Counter { value: u64 }
///
/// impl Counter {
///     fn decide(&self, command: &CounterCommand) -> Result<Vec<Added>, TooBig> {
///         let CounterCommand::Add { by, .. } = command;
///         if *by > 10 { return Err(TooBig); }
///         Ok(vec![Added { by: *by }])
///     }
///
///     fn evolve(&mut self, event: &Added) {
///         self.value += event.by;
///     }
/// }
///
/// let mut counter = Counter::default();
/// for event in counter.decide(&CounterCommand::Add { id: "c".into(), by: 2 })? {
///     counter.evolve(&event);
/// }
/// assert_eq!((Counter::TYPE, counter.value), ("counter", 2));
/// # Ok::<(), TooBig>(())
/// ```
pub use factum_macros::Aggregate;

/// Derives [`Projection`](trait@crate::Projection): its name, the events it handles, and
/// [`apply`](crate::Projection::apply), delegated to an inherent method of the same name that you
/// write.
///
/// | attribute | meaning |
/// |---|---|
/// | `name = "balances"` | [`Projection::NAME`](crate::Projection::NAME), the key of its checkpoint (required) |
/// | `event = BalanceEvent` | the event type it handles (required); subscriptions fetch only its [`Event::event_types`](crate::Event::event_types) |
/// | `apply = path` | the function each event goes to, `fn(&mut Self, &Envelope<Event>)` returning `()` or `Result<(), E>` with `E: Into<BoxError>`; default `Self::apply` |
///
/// A forgotten `apply` is a compile error on the type that names the method to write.
///
/// To handle events of several aggregates, or a subset of one aggregate's events, derive
/// [`Event`](macro@Event) on an enum of exactly those events with their wire names.
///
/// ```
/// use factum::{Envelope, Event, Projection, StreamId, StreamVersion};
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Debug, Serialize, Deserialize)]
/// # struct Deposited { amount: u64 }
///
/// #[derive(Debug, Event)]
/// enum BalanceEvent {
///     #[event(name = "account.deposited")]
///     Deposited(Deposited),
/// }
///
/// #[derive(Default, Projection)]
/// #[projection(name = "balances", event = BalanceEvent)]
/// struct Balances { total: u64 }
///
/// impl Balances {
///     fn apply(&mut self, envelope: &Envelope<BalanceEvent>) {
///         let BalanceEvent::Deposited(d) = &envelope.event;
///         self.total += d.amount;
///     }
/// }
///
/// let mut balances = Balances::default();
/// let stream = StreamId::new("account-1")?;
/// let event = BalanceEvent::Deposited(Deposited { amount: 7 });
/// // Through the trait, as subscriptions call it (`balances.apply(..)` is your own method).
/// Projection::apply(&mut balances, &Envelope::new(stream, StreamVersion::new(1), event))?;
/// assert_eq!((Balances::NAME, balances.total), ("balances", 7));
/// assert_eq!(factum::EventFilter::for_event::<BalanceEvent>().event_types().unwrap(), ["account.deposited"]);
/// # Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
/// ```
pub use factum_macros::Projection;
