use factum::Event;

#[derive(serde::Serialize, serde::Deserialize)]
struct Opened {}

#[derive(serde::Serialize, serde::Deserialize)]
struct Reopened {}

#[derive(Event)]
#[event(prefix = "account")]
enum AccountEvent {
    Opened(Opened),
    // Explicit name equal to the derived `account.opened` above.
    #[event(name = "account.opened")]
    Reopened(Reopened),
    Closed,
    #[event(name = "account.closed")]
    ClosedAgain,
}

fn main() {}
