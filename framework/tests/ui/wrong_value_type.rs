use factum::{Aggregate, Command, Event, Projection};

#[derive(serde::Serialize, serde::Deserialize)]
struct Opened {}

#[derive(Event)]
#[event(prefix = account, rename_all = "Snake")]
enum AccountEvent {
    #[event(name = 5, version = "3")]
    Opened(Opened),
}

#[derive(Command)]
#[command(id = 5, name = Deposit)]
struct Deposit {
    #[command(id = true)]
    account: String,
}

#[derive(Default, Aggregate)]
#[aggregate(type = account, command = "Deposit", event = AccountEvent, error = std::fmt::Error, snapshot_version = -1)]
struct Account {}

#[derive(Projection)]
#[projection(name = "balances", event = AccountEvent, apply = 5)]
struct Balances {}

fn main() {}
