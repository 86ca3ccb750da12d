use factum::{Aggregate, Command, Event, Projection};

#[derive(serde::Serialize, serde::Deserialize)]
struct Opened {}
#[derive(serde::Serialize, serde::Deserialize)]
struct OpenedV1 {}

#[derive(Event)]
#[event]
enum BareAttribute {
    #[event(name = "a.opened", version = 2, upcast_from(OpenedV1))]
    Opened(Opened),
    #[event(name = "a.reopened", version = 2, upcast_from = OpenedV1)]
    Reopened(Opened),
    #[event(name = "")]
    Empty,
    #[event(name = "a closed", name = "a.closed")]
    Closed,
}

#[derive(Command)]
#[command(id)]
struct Deposit {
    account: String,
}

#[derive(Default, Aggregate)]
#[aggregate(type = "", command = Deposit, event = BareAttribute, error = std::fmt::Error)]
struct EmptyType {}

#[derive(Default, Aggregate)]
#[aggregate(type = "bank account", type = "x", command = Deposit, event = BareAttribute, error = std::fmt::Error)]
struct SpacedType {}

#[derive(Projection)]
#[projection(name = " ", event = BareAttribute)]
struct BlankName {}

fn main() {}
