use factum::{Aggregate, Event};

#[derive(serde::Serialize, serde::Deserialize, Event)]
#[event(name = "x.happened")]
struct Happened {}

#[derive(Default, Aggregate)]
#[aggregate(type = "account", event = Happened)]
struct Account {}

#[derive(Default, Aggregate)]
struct NoAttribute {}

fn main() {}
