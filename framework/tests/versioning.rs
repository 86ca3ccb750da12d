//! Events stored at schema v1 and v2 of `customer.registered` load as v3 through the derived
//! upcasting chain (the domain of `examples/versioning`, compiled here as a module).

use factum::{
    Event, EventId, EventMetadata, EventStore, ExpectedVersion, InMemoryStore, NewEvent, RawValue,
    Repository, StreamId,
};
use futures_util::TryStreamExt;

#[path = "../../examples/versioning/src/lib.rs"]
pub mod domain;

use domain::{Customer, CustomerCommand, CustomerEvent, Registered};

fn stored(event_type: &str, version: u32, json: &str) -> NewEvent {
    NewEvent {
        event_id: EventId::new(),
        event_type: event_type.into(),
        schema_version: version,
        payload: RawValue::from_string(json.to_owned()).expect("valid JSON"),
        metadata: EventMetadata::default(),
    }
}

async fn seed(store: &InMemoryStore, id: &str, events: Vec<NewEvent>) {
    let stream = StreamId::for_aggregate("customer", id).expect("valid stream id");
    store
        .append(
            factum::AppendRequest::new(stream.clone(), events)
                .expected_version(ExpectedVersion::NoStream),
        )
        .await
        .expect("appends");
}

#[tokio::test]
async fn stored_v1_and_v2_payloads_load_as_v3() {
    let store = InMemoryStore::new();
    seed(
        &store,
        "v1",
        vec![stored(
            "customer.registered",
            1,
            r#"{"name":"Ada Lovelace"}"#,
        )],
    )
    .await;
    seed(
        &store,
        "v2",
        vec![
            stored(
                "customer.registered",
                2,
                r#"{"first_name":"Grace","last_name":"Hopper"}"#,
            ),
            stored(
                "customer.email_changed",
                1,
                r#"{"email":"grace@example.org"}"#,
            ),
        ],
    )
    .await;

    // Decoding one stored event yields the current type, converted v1 -> v2 -> v3.
    let stream = StreamId::for_aggregate("customer", "v1").expect("valid");
    let recorded: Vec<_> = store
        .read_stream(&stream, factum::StreamVersion::INITIAL)
        .try_collect()
        .await
        .expect("reads");
    assert_eq!(recorded[0].schema_version, 1);
    let envelope = recorded[0].decode::<CustomerEvent>().expect("upcasts");
    assert_eq!(
        envelope.event,
        CustomerEvent::Registered(Registered {
            first_name: "Ada".into(),
            last_name: "Lovelace".into(),
            email: None,
        })
    );
    assert_eq!(envelope.event.schema_version(), 3);

    // The repository rebuilds aggregates from the old payloads.
    let customers = Repository::<Customer, _>::new(store.clone());
    let v1 = customers.load("v1").await.expect("loads v1").state;
    assert_eq!(
        (v1.name.as_str(), v1.email.as_deref()),
        ("Ada Lovelace", None)
    );
    let v2 = customers.load("v2").await.expect("loads v2").state;
    assert_eq!(
        (v2.name.as_str(), v2.email.as_deref()),
        ("Grace Hopper", Some("grace@example.org"))
    );

    // New events on an old stream are written at the current version.
    let done = customers
        .execute(CustomerCommand::ChangeEmail {
            customer: "v1".into(),
            email: "ada@example.org".into(),
        })
        .await
        .expect("executes");
    assert_eq!(done.version.get(), 2);
    let recorded: Vec<_> = store
        .read_stream(&stream, factum::StreamVersion::INITIAL)
        .try_collect()
        .await
        .expect("reads");
    assert_eq!(
        recorded
            .iter()
            .map(|e| (e.event_type.as_str(), e.schema_version))
            .collect::<Vec<_>>(),
        [("customer.registered", 1), ("customer.email_changed", 1)]
    );
}

#[tokio::test]
async fn a_version_newer_than_the_code_is_a_decode_error_naming_the_event() {
    let store = InMemoryStore::new();
    seed(
        &store,
        "v4",
        vec![stored("customer.registered", 4, r#"{"first_name":"X"}"#)],
    )
    .await;
    let customers = Repository::<Customer, _>::new(store);
    let err = customers.load("v4").await.expect_err("v4 is unknown");
    let message = err.to_string();
    assert!(
        message.contains("customer-v4") && message.contains("customer.registered"),
        "{message}"
    );
}

#[test]
fn the_current_version_is_written() {
    let event = CustomerEvent::Registered(Registered {
        first_name: "A".into(),
        last_name: "B".into(),
        email: None,
    });
    assert_eq!(
        (event.event_type(), event.schema_version()),
        ("customer.registered", 3)
    );
    // Readers fetch the old name of the renamed event and the split one too.
    assert_eq!(
        CustomerEvent::event_types(),
        [
            "customer.registered",
            "customer.email_changed",
            "customer.email_updated",
            "customer.signed_up"
        ]
    );
}
