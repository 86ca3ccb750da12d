//! Schema evolution through the derive: renamed events, split events, and upcasts that read the
//! stored envelope, through decoding, the repository and a subscription's projector.

use chrono::{DateTime, Duration, Utc};
use factum::{
    AppendRequest, BoxError, DecodeError, Decoded, Event, EventId, EventMetadata, EventStore,
    ExpectedVersion, InMemoryStore, Metadata, NewEvent, RawValue, Repository, Stored, StreamId,
    Upcast,
};
use futures_util::TryStreamExt;

#[path = "../../examples/versioning/src/lib.rs"]
pub mod domain;

use domain::loan::{LOAN_PERIOD_DAYS, Lent, Loan, LoanEvent};
use domain::{Customer, CustomerEvent, Registered};

fn raw(json: &str) -> Box<RawValue> {
    RawValue::from_string(json.to_owned()).expect("valid JSON")
}

fn legacy(event_type: &str, version: u32, json: &str, metadata: EventMetadata) -> NewEvent {
    NewEvent {
        event_id: EventId::new(),
        event_type: event_type.into(),
        schema_version: version,
        payload: raw(json),
        metadata,
    }
}

async fn seed(store: &InMemoryStore, stream: &str, events: Vec<NewEvent>) {
    store
        .append(
            AppendRequest::new(StreamId::new(stream).expect("id"), events)
                .expected_version(ExpectedVersion::NoStream),
        )
        .await
        .expect("appends");
}

#[test]
fn a_renamed_event_decodes_under_its_old_name_and_is_written_under_the_new_one() {
    let payload = raw(r#"{"email":"a@example.org"}"#);
    let old = CustomerEvent::decode(&Stored::new("customer.email_updated", 1, &payload))
        .expect("the old name decodes");
    assert_eq!(
        old,
        CustomerEvent::EmailChanged {
            email: "a@example.org".into()
        }
    );
    assert_eq!(old.event_type(), "customer.email_changed");
    // Readers fetch the old name too; the compatibility check asks for samples of the new one.
    assert!(CustomerEvent::event_types().contains(&"customer.email_updated"));
    assert!(!CustomerEvent::event_versions().contains(&("customer.email_updated", 1)));
    assert!(CustomerEvent::event_versions().contains(&("customer.signed_up", 1)));
    assert!(CustomerEvent::event_versions().contains(&("customer.registered", 2)));
}

#[test]
fn a_split_event_decodes_into_several_and_decode_alone_says_so() {
    let payload = raw(r#"{"name":"Ada Lovelace","email":"ada@example.org"}"#);
    let stored = Stored::new("customer.signed_up", 1, &payload);
    let all = CustomerEvent::decode_all(&stored).expect("splits");
    assert_eq!(
        all,
        Decoded::Split(vec![
            CustomerEvent::Registered(Registered {
                first_name: "Ada".into(),
                last_name: "Lovelace".into(),
                email: None,
            }),
            CustomerEvent::EmailChanged {
                email: "ada@example.org".into()
            },
        ])
    );
    let error = CustomerEvent::decode(&stored).expect_err("one event cannot hold a split");
    assert!(
        matches!(&error, DecodeError::Split { event_type, version: 1 } if event_type == "customer.signed_up"),
        "{error:?}"
    );
    // Events that were not split decode through `decode_all` as one.
    let one = raw(r#"{"email":"x@example.org"}"#);
    let decoded = CustomerEvent::decode_all(&Stored::new("customer.email_changed", 1, &one))
        .expect("decodes");
    assert_eq!(decoded.len(), 1);
}

#[tokio::test]
async fn the_repository_and_a_projector_apply_every_part_of_a_split_and_upcasts_see_recorded_at() {
    let store = InMemoryStore::new();
    seed(
        &store,
        "customer-c1",
        vec![legacy(
            "customer.signed_up",
            1,
            r#"{"name":"Ada Lovelace","email":"ada@example.org"}"#,
            EventMetadata::default(),
        )],
    )
    .await;
    seed(
        &store,
        "loan-l1",
        vec![legacy(
            "loan.lent",
            1,
            r#"{"book":"QA76"}"#,
            EventMetadata::default(),
        )],
    )
    .await;

    let customer = Repository::<Customer, _>::new(store.clone())
        .load("c1")
        .await
        .expect("loads")
        .state;
    assert_eq!(
        (customer.name.as_str(), customer.email.as_deref()),
        ("Ada Lovelace", Some("ada@example.org"))
    );

    let recorded: Vec<_> = store
        .read_stream(
            &StreamId::new("loan-l1").expect("id"),
            factum::StreamVersion::INITIAL,
        )
        .try_collect()
        .await
        .expect("reads");
    let loan = Repository::<Loan, _>::new(store.clone())
        .load("l1")
        .await
        .expect("loads")
        .state;
    let due = recorded[0].recorded_at + Duration::days(LOAN_PERIOD_DAYS);
    assert_eq!(loan.due, Some(due));
    // The same through a subscriber's decoding of the recorded event.
    let envelopes = recorded[0].decode_all::<LoanEvent>().expect("decodes");
    let events: Vec<LoanEvent> = envelopes.into_iter().map(|e| e.event).collect();
    assert_eq!(
        events,
        [LoanEvent::Lent(Lent {
            book: "QA76".into(),
            due
        })]
    );

    // A projector (the subscription runtime's handler) sees both parts of the split.
    let log: Vec<_> = store
        .read_stream(
            &StreamId::new("customer-c1").expect("id"),
            factum::StreamVersion::INITIAL,
        )
        .try_collect()
        .await
        .expect("reads");
    let mut projector = factum::subscription::Projector::new(Emails::default());
    for event in &log {
        factum::subscription::EventHandler::handle(&mut projector, event)
            .await
            .expect("applies");
    }
    assert_eq!(
        projector.get().seen,
        ["customer.registered", "customer.email_changed"]
    );
}

#[derive(Default, factum::Projection)]
#[projection(name = "emails", event = CustomerEvent)]
struct Emails {
    seen: Vec<&'static str>,
}

impl Emails {
    fn apply(&mut self, envelope: &factum::Envelope<CustomerEvent>) {
        self.seen.push(envelope.event.event_type());
    }
}

/// An upcast that reads the stored metadata: v1 events were written before tenants were part of
/// the payload; the writer put the tenant in the metadata.
mod tenants {
    use super::*;
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize)]
    pub(crate) struct InvoicedV1 {
        pub(crate) amount: u64,
    }
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    pub(crate) struct Invoiced {
        pub(crate) amount: u64,
        pub(crate) tenant: String,
    }

    impl Upcast<InvoicedV1> for Invoiced {
        fn upcast(v1: InvoicedV1, stored: &Stored<'_>) -> Result<Self, BoxError> {
            let tenant: Option<String> = stored.metadata.user.get("tenant")?;
            let tenant = tenant.ok_or("a v1 invoice without a tenant in its metadata")?;
            Ok(Self {
                amount: v1.amount,
                tenant,
            })
        }
    }

    #[derive(Debug, PartialEq, Event)]
    pub(crate) enum BillingEvent {
        #[event(name = "billing.invoiced", version = 2, upcast_from(InvoicedV1 = 1))]
        Invoiced(Invoiced),
    }
}

#[test]
fn an_upcast_reads_metadata_and_its_error_is_an_upcast_error() {
    use tenants::{BillingEvent, Invoiced};
    let payload = raw(r#"{"amount":12}"#);
    let mut user = Metadata::new();
    user.insert("tenant", "acme").expect("inserts");
    let metadata = EventMetadata {
        user,
        ..EventMetadata::default()
    };
    let at: DateTime<Utc> = "2025-05-05T05:05:05Z".parse().expect("date");
    let stored = Stored::new("billing.invoiced", 1, &payload)
        .recorded_at(at)
        .with_metadata(&metadata);
    assert_eq!(
        BillingEvent::decode(&stored).expect("upcasts"),
        BillingEvent::Invoiced(Invoiced {
            amount: 12,
            tenant: "acme".into()
        })
    );
    let error =
        BillingEvent::decode(&Stored::new("billing.invoiced", 1, &payload)).expect_err("no tenant");
    assert!(matches!(&error, DecodeError::Upcast(e) if e.to_string().contains("without a tenant")));
}
