use factum::Event;

#[derive(Event)]
#[event(prefix = "customer")]
enum CustomerEvent {
    Registered {
        customer_id: String,
        #[personal]
        name: String,
        #[personal(subject = customer)]
        email: String,
        #[personal(subject = email)]
        phone: String,
        #[personal(subject = customer_id, placeholder = "x")]
        street: String,
    },
    Moved(#[personal(subject = customer_id)] String),
}

fn main() {}
