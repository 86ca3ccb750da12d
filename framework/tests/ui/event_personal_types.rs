use factum::Event;

struct Secret(String);

#[derive(serde::Serialize, serde::Deserialize)]
struct Id;

#[derive(Event)]
#[event(prefix = "customer")]
enum CustomerEvent {
    // A personal field needs a placeholder for when its subject is forgotten.
    Scored {
        customer_id: String,
        #[personal(subject = customer_id)]
        score: u64,
    },
    // ... and must be serialisable.
    Noted {
        customer_id: String,
        #[personal(subject = customer_id)]
        note: Option<Secret>,
    },
    // The subject is written as text.
    Named {
        id: Id,
        #[personal(subject = id)]
        name: String,
    },
}

fn main() {}
