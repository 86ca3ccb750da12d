use factum::{Aggregate, Command, Event, Projection};

#[derive(Event)]
union EventUnion {
    a: u32,
}

#[derive(Command)]
union CommandUnion {
    a: u32,
}

#[derive(Aggregate)]
union AggregateUnion {
    a: u32,
}

#[derive(Projection)]
union ProjectionUnion {
    a: u32,
}

#[derive(Event)]
enum TupleVariant {
    Moved(String, String),
}

#[derive(Event)]
enum Generic<T> {
    Happened(T),
}

fn main() {}
