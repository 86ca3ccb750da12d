use factum::{Aggregate, Command, Event};

#[derive(Debug, serde::Serialize, serde::Deserialize, Event)]
#[event(name = "account.opened")]
struct Opened {}

#[derive(Command)]
struct Open {
    #[command(id)]
    id: String,
}

#[derive(Default, Aggregate)]
#[aggregate(type = "account", command = Open, event = Opened, error = std::fmt::Error)]
struct Account {}

impl Account {
    fn decide(&self, _: &Open) -> Result<Vec<Opened>, std::fmt::Error> {
        Ok(vec![Opened {}])
    }
}

// A path named like the trait method is checked too.
#[derive(Default, Aggregate)]
#[aggregate(
    type = "ledger",
    command = Open,
    event = Opened,
    error = std::fmt::Error,
    decide = Self::decide,
    evolve = Self::evolve,
)]
struct Ledger {}

impl Ledger {
    fn decide(&self, _: &Open) -> Result<Vec<Opened>, std::fmt::Error> {
        Ok(vec![Opened {}])
    }
}

fn main() {}
