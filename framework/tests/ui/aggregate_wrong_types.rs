use factum::Aggregate;

struct NotACommand;
struct NotAnEvent;
struct NotAnError;

#[derive(Default, Aggregate)]
#[aggregate(type = "account", command = NotACommand, event = NotAnEvent, error = NotAnError)]
struct Account {}

impl Account {
    fn decide(&self, _: &NotACommand) -> Result<Vec<NotAnEvent>, NotAnError> {
        Ok(Vec::new())
    }
    fn evolve(&mut self, _: &NotAnEvent) {}
}

fn main() {}
