use factum::Event;
use serde::Deserialize;

#[derive(Deserialize)]
struct LentAndReturnedV1 {}

#[derive(Event)]
#[event(split(name = "loan.lent_and_returned", version = 1))]
#[event(split(name = "loan.lent", version = 1, from = LentAndReturnedV1, into = LoanEvent))]
#[event(prefix = "loan", split)]
#[event(split(name = "loan.renewed", version = 1, from = LentAndReturnedV1))]
#[event(split(name = "loan.renewed", version = 1, from = LentAndReturnedV1))]
enum LoanEvent {
    #[event(split(name = "loan.x", version = 1, from = LentAndReturnedV1))]
    Lent,
    Returned,
}

fn main() {}
