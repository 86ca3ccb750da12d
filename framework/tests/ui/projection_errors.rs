use factum::{Event, Projection};

#[derive(serde::Serialize, serde::Deserialize, Event)]
#[event(name = "x.happened")]
struct Happened {}

#[derive(Projection)]
#[projection(event = Happened, checkpoint = "x")]
struct Missing {}

#[derive(Projection)]
struct NoAttribute {}

#[derive(Projection)]
#[projection(name = "counts", event = Happened)]
struct WrongReturn {}

impl WrongReturn {
    fn apply(&mut self, _: &factum::Envelope<Happened>) -> u32 {
        0
    }
}

fn main() {}
