use factum::Event;

#[derive(serde::Serialize, serde::Deserialize)]
struct Opened {}
#[derive(serde::Serialize, serde::Deserialize)]
struct OpenedV5 {}

#[derive(Event)]
enum AccountEvent {
    // Versions start at 1; an "older" version above the current one; a struct variant has no
    // payload type to convert into.
    #[event(name = "account.opened", version = 0)]
    Opened(Opened),
    #[event(name = "account.reopened", version = 2, upcast_from(OpenedV5 = 5))]
    Reopened(Opened),
    #[event(name = "account.closed", version = 2, upcast_from(OpenedV5 = 1))]
    Closed { reason: String },
}

fn main() {}
