use factum::{Aggregate, Command, Event};

#[derive(serde::Serialize, serde::Deserialize, Event)]
#[event(name = "x.happened")]
struct Happened {}

#[derive(Command)]
struct Do {
    #[command(id)]
    id: String,
}

// The named handlers are not written: the error points at the attribute that names them.
#[derive(Default, Aggregate)]
#[aggregate(
    type = "account",
    command = Do,
    event = Happened,
    error = std::fmt::Error,
    decide = Self::decide_account,
    evolve = Self::evolve_account,
)]
struct Account {}

fn main() {}
