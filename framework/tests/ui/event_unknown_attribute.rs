use factum::Event;

#[derive(serde::Serialize, serde::Deserialize)]
struct Opened {}

#[derive(Event)]
#[event(prefix = "account", nmae = "account.x")]
enum AccountEvent {
    #[event(renamed = "account.opened")]
    Opened(Opened),
}

fn main() {}
