use factum::Event;

#[derive(serde::Serialize, serde::Deserialize, Event)]
#[factum(crate = "not a path", krate = "factum")]
#[event(name = "x.happened")]
struct Happened {}

fn main() {}
