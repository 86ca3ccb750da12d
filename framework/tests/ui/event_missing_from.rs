use factum::Event;

#[derive(serde::Serialize, serde::Deserialize)]
struct OpenedV1 {}
#[derive(serde::Serialize, serde::Deserialize)]
struct OpenedV2 {}
#[derive(serde::Serialize, serde::Deserialize)]
struct Opened {}

impl From<OpenedV2> for Opened {
    fn from(_: OpenedV2) -> Self {
        Opened {}
    }
}

// No `From<OpenedV1> for OpenedV2`: the chain is broken at `OpenedV1`.
#[derive(Event)]
enum AccountEvent {
    #[event(name = "account.opened", version = 3, upcast_from(OpenedV1 = 1, OpenedV2 = 2))]
    Opened(Opened),
}

fn main() {}
