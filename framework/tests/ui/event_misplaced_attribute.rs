use factum::Event;

#[derive(serde::Serialize, serde::Deserialize)]
struct Opened {}

// `version` and `name` belong on variants; `prefix` on the enum; `#[event]` never on fields.
#[derive(Event)]
#[event(version = 2)]
enum AccountEvent {
    #[event(prefix = "account")]
    Opened(Opened),
    Closed {
        #[event(name = "x")]
        reason: String,
    },
}

fn main() {}
