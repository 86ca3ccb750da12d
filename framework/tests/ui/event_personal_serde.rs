use factum::Event;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Address {
    street: String,
}

#[derive(Event, Serialize, Deserialize)]
#[event(name = "customer.moved")]
struct Moved {
    customer_id: String,
    #[personal(subject = customer_id)]
    #[serde(flatten)]
    address: Address,
}

fn main() {}
