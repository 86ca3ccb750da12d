use factum::{Event, Projection};

#[derive(Debug, serde::Serialize, serde::Deserialize, Event)]
#[event(name = "account.opened")]
struct Opened {}

#[derive(Default, Projection)]
#[projection(name = "accounts", event = Opened)]
struct Accounts {
    count: u64,
}

// The old name of the method is not picked up.
impl Accounts {
    #[allow(dead_code)]
    fn handle(&mut self, _: &factum::Envelope<Opened>) {
        self.count += 1;
    }
}

fn main() {}
