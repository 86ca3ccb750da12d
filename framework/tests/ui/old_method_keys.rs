use factum::{Aggregate, Command, Event, Projection};

#[derive(Debug, serde::Serialize, serde::Deserialize, Event)]
#[event(name = "account.opened")]
struct Opened {}

#[derive(Command)]
struct Open {
    #[command(id)]
    id: String,
}

#[derive(Default, Aggregate)]
#[aggregate(
    type = "account",
    command = Open,
    event = Opened,
    error = std::fmt::Error,
    handle = Self::on_command,
    apply = Self::on_event,
)]
struct Account {}

#[derive(Default, Projection)]
#[projection(name = "accounts", event = Opened, handle = Self::on_event)]
struct Accounts {}

fn main() {}
