// `use factum::Aggregate` brings the trait into scope too: the derive must still not call
// `Aggregate::decide` itself (it would recurse forever) but say which method to write.
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
    fn evolve(&mut self, _: &Opened) {}
}

fn main() {
    // The same inside a function, with a glob import.
    use factum::*;

    #[derive(Default, Aggregate)]
    #[aggregate(type = "local", command = Open, event = Opened, error = std::fmt::Error)]
    struct Local {}

    impl Local {
        fn evolve(&mut self, _: &Opened) {}
    }
}
