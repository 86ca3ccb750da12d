use factum::Event;

#[derive(serde::Serialize, serde::Deserialize)]
struct Opened {}

// Four mistakes in one item, all reported at once, each on its own token.
#[derive(Event)]
#[event(prefix = "account", rename_all = "shouting")]
enum AccountEvent {
    #[event(name = "account.opened", verison = 2)]
    Opened(Opened),
    #[event(name = "account.opened", version = "2")]
    Reopened(Opened),
}

fn main() {}
