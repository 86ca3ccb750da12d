use factum::{Envelope, Event, Projection};

#[derive(serde::Serialize, serde::Deserialize, Event)]
#[event(name = "thing.made")]
struct Made {}

#[derive(Projection)]
#[projection(name = "things", event = Made, reads = Thing)]
struct Things;

#[derive(Projection)]
#[projection(name = "others", event = Made, reads())]
struct Others;

impl Things {
    fn apply(&mut self, _: &Envelope<Made>) {}
}

impl Others {
    fn apply(&mut self, _: &Envelope<Made>) {}
}

fn main() {}
