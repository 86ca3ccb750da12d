use factum::Event;
use serde::Deserialize;

#[derive(Deserialize)]
struct LentAndReturnedV1 {}

#[derive(Event)]
#[event(split(name = "loan.lent_and_returned", version = 1, from = LentAndReturnedV1))]
enum LoanEvent {
    Lent,
    Returned,
}

fn main() {}
