use factum::{Aggregate, Command, Event};

#[derive(serde::Serialize, serde::Deserialize, Event)]
#[event(name = "x.happened")]
struct Happened {}

#[derive(Command)]
struct Do {
    #[command(id)]
    id: String,
}

#[derive(Default, Aggregate)]
#[aggregate(type = "bank-account", command = Do, event = Happened, error = std::fmt::Error)]
struct BankAccount {}

fn main() {}
