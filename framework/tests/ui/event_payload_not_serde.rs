use factum::Event;

struct Opened {}

#[derive(Event)]
enum AccountEvent {
    #[event(name = "account.opened")]
    Opened(Opened),
}

fn main() {}
