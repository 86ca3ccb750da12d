use factum::Event;

#[derive(serde::Serialize, serde::Deserialize)]
struct Opened {}
#[derive(serde::Serialize, serde::Deserialize)]
struct OpenedV1 {}
#[derive(serde::Serialize, serde::Deserialize)]
struct OpenedV1b {}
#[derive(serde::Serialize, serde::Deserialize)]
struct OpenedV3 {}

#[derive(Event)]
enum AccountEvent {
    // v1 twice, and the current version 3 listed as an older one.
    #[event(name = "account.opened", version = 3, upcast_from(OpenedV1 = 1, OpenedV1b = 1, OpenedV3 = 3))]
    Opened(Opened),
}

fn main() {}
