//! Events stored at schema v1 and v2 load as v3: `cargo run -p versioning`.
//!
//! The store is seeded the way an old deployment would have left it: raw payloads written by
//! earlier versions of the code. The current code reads them without a migration.

#![allow(
    clippy::print_stdout,
    reason = "an example program: its output is the point"
)]

use factum::{
    EventMetadata, EventStore, ExpectedVersion, InMemoryStore, NewEvent, RawValue, Repository,
    StreamId,
};
use versioning::{Customer, CustomerCommand};

/// A payload as an older version of the code wrote it.
fn stored(version: u32, json: &str) -> Result<NewEvent, Box<dyn std::error::Error>> {
    Ok(NewEvent {
        event_id: factum::EventId::new(),
        event_type: "customer.registered".into(),
        schema_version: version,
        payload: RawValue::from_string(json.to_owned())?,
        metadata: EventMetadata::default(),
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let store = InMemoryStore::new();
    let history = [
        ("c1", stored(1, r#"{"name":"Ada King Lovelace"}"#)?),
        (
            "c2",
            stored(2, r#"{"first_name":"Grace","last_name":"Hopper"}"#)?,
        ),
        (
            "c3",
            stored(
                3,
                r#"{"first_name":"Alan","last_name":"Turing","email":"alan@example.org"}"#,
            )?,
        ),
    ];
    for (id, event) in history {
        let version = event.schema_version;
        store
            .append(
                factum::AppendRequest::new(
                    StreamId::for_aggregate("customer", id)?.clone(),
                    vec![event],
                )
                .expected_version(ExpectedVersion::NoStream),
            )
            .await?;
        println!("stored   customer-{id}: customer.registered at schema v{version}");
    }

    let customers = Repository::<Customer, _>::new(store);
    for id in ["c1", "c2", "c3"] {
        let customer = customers.load(id).await?.state;
        println!(
            "loaded   customer-{id}: {:?}, e-mail {:?}",
            customer.name, customer.email
        );
    }

    let done = customers
        .execute(CustomerCommand::ChangeEmail {
            customer: "c1".into(),
            email: "ada@example.org".into(),
        })
        .await?;
    println!(
        "command  ChangeEmail on customer-c1 -> {:?} (stream at version {})",
        done.events, done.version
    );
    Ok(())
}
