//! The compatibility check over the examples' sample payloads (exported from PostgreSQL and
//! checked in), and over a deliberately broken change.

use std::path::{Path, PathBuf};

use factum::Event;
use factum_testkit::samples::Samples;
use serde::{Deserialize, Serialize};

fn samples_of(example: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(example)
        .join("samples")
}

#[test]
fn the_examples_samples_decode_with_the_current_code() {
    let versioning = Samples::load(samples_of("versioning")).expect("samples load");
    let checked = versioning
        .check()
        .decodes::<versioning::CustomerEvent>()
        .decodes::<versioning::loan::LoanEvent>()
        .assert();
    // Every declared (name, version) has a sample, plus the old name of the renamed event.
    assert!(checked.pairs >= 9, "{checked:?}");
    assert_eq!(checked.decoded, versioning.len());

    let bank = Samples::load(samples_of("bank")).expect("samples load");
    let checked = bank.check().decodes::<bank::AccountEvent>().assert();
    assert_eq!(checked.pairs, 4, "{checked:?}");
}

/// The versioning example's customer events after a careless change: the v1 payload type
/// renamed its field (`name` -> `full_name`) without a new version, the rename of
/// `customer.email_updated` and the split of `customer.signed_up` were dropped, and a v4 was
/// declared with no sample stored yet.
mod broken {
    use super::*;

    #[derive(Serialize, Deserialize)]
    pub(crate) struct RegisteredV1 {
        pub(crate) full_name: String,
    }
    #[derive(Serialize, Deserialize)]
    pub(crate) struct RegisteredV2 {
        pub(crate) first_name: String,
        pub(crate) last_name: String,
    }
    #[derive(Serialize, Deserialize)]
    pub(crate) struct RegisteredV3 {
        pub(crate) first_name: String,
        pub(crate) last_name: String,
        pub(crate) email: Option<String>,
    }
    #[derive(Serialize, Deserialize)]
    pub(crate) struct Registered {
        pub(crate) first_name: String,
        pub(crate) last_name: String,
        pub(crate) emails: Vec<String>,
    }
    impl From<RegisteredV1> for RegisteredV2 {
        fn from(v1: RegisteredV1) -> Self {
            Self {
                first_name: v1.full_name,
                last_name: String::new(),
            }
        }
    }
    impl From<RegisteredV2> for RegisteredV3 {
        fn from(v2: RegisteredV2) -> Self {
            Self {
                first_name: v2.first_name,
                last_name: v2.last_name,
                email: None,
            }
        }
    }
    impl From<RegisteredV3> for Registered {
        fn from(v3: RegisteredV3) -> Self {
            Self {
                first_name: v3.first_name,
                last_name: v3.last_name,
                emails: v3.email.into_iter().collect(),
            }
        }
    }

    #[derive(Event)]
    #[event(prefix = "customer")]
    pub(crate) enum CustomerEvent {
        #[event(
            version = 4,
            upcast_from(RegisteredV1 = 1, RegisteredV2 = 2, RegisteredV3 = 3)
        )]
        Registered(Registered),
        EmailChanged {
            email: String,
        },
    }
}

#[test]
fn a_broken_change_is_named_file_by_file() {
    let samples = Samples::load(samples_of("versioning")).expect("samples load");
    let report = samples
        .check()
        .decodes::<broken::CustomerEvent>()
        .decodes::<versioning::loan::LoanEvent>()
        .run()
        .expect_err("the broken change must not pass");

    // The v1 sample fails with the serde error, naming file, name and version.
    assert_eq!(report.failures.len(), 1, "{report}");
    let failure = &report.failures[0];
    assert_eq!(
        (failure.event_type.as_str(), failure.schema_version),
        ("customer.registered", 1)
    );
    assert!(
        failure
            .file
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("customer.registered.v1.")),
        "{report}"
    );
    assert!(
        failure.error.contains("missing field `full_name`"),
        "{report}"
    );
    assert!(
        failure.decoder.ends_with("broken::CustomerEvent"),
        "{report}"
    );

    // The old name and the split event: no registered type lists them any more.
    let mut unclaimed: Vec<&str> = report
        .unclaimed
        .iter()
        .map(|s| s.event_type.as_str())
        .collect();
    unclaimed.sort_unstable();
    assert_eq!(
        unclaimed,
        ["customer.email_updated", "customer.signed_up"],
        "{report}"
    );

    // v4 is declared but nothing stored at it has a sample.
    assert_eq!(report.missing.len(), 1, "{report}");
    assert_eq!(
        (
            report.missing[0].event_type.as_str(),
            report.missing[0].schema_version
        ),
        ("customer.registered", 4)
    );

    // The report says all of it.
    let text = report.to_string();
    assert!(text.contains("customer.registered.v1."), "{text}");
    assert!(text.contains("missing field `full_name`"), "{text}");
    assert!(text.contains("\"customer.signed_up\""), "{text}");
    assert!(
        text.contains("no sample of \"customer.registered\" at schema version 4"),
        "{text}"
    );
}

#[test]
fn a_stored_version_without_a_sample_is_named() {
    let samples = Samples::load(samples_of("bank")).expect("samples load");
    let report = samples
        .check()
        .decodes::<bank::AccountEvent>()
        .expect_stored([("account.opened", 1), ("account.frozen", 2)])
        .run()
        .expect_err("a stored pair has no sample");
    assert!(report.failures.is_empty() && report.unclaimed.is_empty());
    assert_eq!(report.missing.len(), 1, "{report}");
    assert_eq!(report.missing[0].event_type, "account.frozen");
    assert_eq!(report.missing[0].expected_by, "the store");
}

#[test]
fn the_tombstone_of_a_deleted_stream_needs_no_type_and_no_sample() {
    let dir = std::env::temp_dir().join(format!("factum-tombstone-sample-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    for file in std::fs::read_dir(samples_of("bank")).expect("bank samples") {
        let path = file.expect("entry").path();
        std::fs::copy(&path, dir.join(path.file_name().expect("name"))).expect("copies");
    }
    std::fs::write(
        dir.join("factum.stream_deleted.v1.json"),
        r#"{"event_type":"factum.stream_deleted","schema_version":1,
            "recorded_at":"2026-01-01T00:00:00Z","payload":{"deleted_through":3}}"#,
    )
    .expect("writes");
    let samples = Samples::load(&dir).expect("loads");
    std::fs::remove_dir_all(&dir).expect("cleans up");
    samples
        .check()
        .decodes::<bank::AccountEvent>()
        .expect_stored([(factum::STREAM_DELETED, 1)])
        .assert();
}

#[test]
fn a_file_that_is_not_a_sample_is_an_error_naming_it() {
    let dir = std::env::temp_dir().join(format!("factum-bad-sample-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(dir.join("x.v1.json"), r#"{"event_type":"x"}"#).expect("writes");
    let error = Samples::load(&dir).expect_err("not a sample");
    std::fs::remove_dir_all(&dir).expect("cleans up");
    let text = error.to_string();
    assert!(
        text.contains("x.v1.json") && text.contains("schema_version"),
        "{text}"
    );
}

/// Exports the examples' samples from a real PostgreSQL database the examples wrote to (old
/// payloads as earlier releases stored them, current ones through commands), and checks the
/// checked-in files are exactly what the export gives. `FACTUM_WRITE_SAMPLES=1` writes them into
/// `examples/*/samples` instead.
#[cfg(feature = "postgres")]
mod export {
    use super::*;
    use chrono::{DateTime, Utc};
    use factum::{
        AppendRequest, EventId, EventMetadata, EventStore, ExpectedVersion, NewEvent, RawValue,
        Repository, StreamId,
    };
    use factum_testkit::postgres::TestDatabase;
    use factum_testkit::samples;

    fn legacy(event_type: &str, version: u32, json: &str) -> NewEvent {
        NewEvent {
            event_id: EventId::new(),
            event_type: event_type.into(),
            schema_version: version,
            payload: RawValue::from_string(json.to_owned()).expect("JSON"),
            metadata: EventMetadata::default(),
        }
    }

    async fn seed(store: &impl EventStore, stream: &str, events: Vec<NewEvent>) {
        store
            .append(
                AppendRequest::new(StreamId::new(stream).expect("stream id"), events)
                    .expected_version(ExpectedVersion::NoStream),
            )
            .await
            .expect("appends");
    }

    async fn compare_or_write(
        store: &factum_postgres::PostgresStore,
        example: &str,
    ) -> Vec<String> {
        let target = samples_of(example);
        let write = std::env::var_os("FACTUM_WRITE_SAMPLES").is_some();
        let dir = if write {
            target.clone()
        } else {
            std::env::temp_dir().join(format!("factum-export-{example}-{}", std::process::id()))
        };
        let exported = samples::export(store, &dir).await.expect("exports");
        let names = |dir: &Path| {
            let mut names: Vec<String> = std::fs::read_dir(dir)
                .expect("reads dir")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };
        assert!(exported.events > 0);
        // A second export of the same store finds every shape on disk and writes nothing.
        let again = samples::export(store, &dir).await.expect("exports again");
        assert!(again.written.is_empty(), "{again:?}");
        assert_eq!(again.kept, exported.written.len() + exported.kept);
        let fresh = names(&dir);
        if !write {
            std::fs::remove_dir_all(&dir).expect("cleans up");
            assert_eq!(
                fresh,
                names(&target),
                "the checked-in samples of {example} differ from an export: run this test with FACTUM_WRITE_SAMPLES=1"
            );
        }
        fresh
    }

    #[tokio::test]
    async fn samples_export_from_postgres_as_checked_in() {
        let db = TestDatabase::create().await;
        let store = db.store();

        // What three releases of the versioning example left in the store.
        seed(
            &store,
            "customer-c1",
            vec![legacy(
                "customer.registered",
                1,
                r#"{"name":"Ada King Lovelace"}"#,
            )],
        )
        .await;
        seed(
            &store,
            "customer-c2",
            vec![
                legacy(
                    "customer.registered",
                    2,
                    r#"{"first_name":"Grace","last_name":"Hopper"}"#,
                ),
                legacy(
                    "customer.email_updated",
                    1,
                    r#"{"email":"grace@example.org"}"#,
                ),
            ],
        )
        .await;
        seed(
            &store,
            "customer-c3",
            vec![legacy(
                "customer.signed_up",
                1,
                r#"{"name":"Edsger Dijkstra","email":"ewd@example.org"}"#,
            )],
        )
        .await;
        seed(
            &store,
            "loan-l1",
            vec![legacy("loan.lent", 1, r#"{"book":"QA76.D45"}"#)],
        )
        .await;
        // ... and what the current code writes, through commands.
        let customers = Repository::<versioning::Customer, _>::new(store.clone());
        for (id, email) in [("c4", Some("alan@example.org")), ("c5", None)] {
            customers
                .execute(versioning::CustomerCommand::Register {
                    customer: id.into(),
                    first_name: "Alan".into(),
                    last_name: "Turing".into(),
                    email: email.map(Into::into),
                })
                .await
                .expect("registers");
        }
        customers
            .execute(versioning::CustomerCommand::ChangeEmail {
                customer: "c5".into(),
                email: "turing@example.org".into(),
            })
            .await
            .expect("changes e-mail");
        let loans = Repository::<versioning::loan::Loan, _>::new(store.clone());
        let due: DateTime<Utc> = "2026-12-24T12:00:00Z".parse().expect("date");
        loans
            .execute(versioning::loan::LoanCommand::Lend {
                loan: "l2".into(),
                book: "QA76.K58".into(),
                due,
            })
            .await
            .expect("lends");
        for loan in ["l1", "l2"] {
            loans
                .execute(versioning::loan::LoanCommand::Return { loan: loan.into() })
                .await
                .expect("returns");
        }
        let files = compare_or_write(&store, "versioning").await;
        assert_eq!(files.len(), 10, "{files:#?}");

        // The store's own list of (name, version) pairs is covered too.
        let stored = samples::stored_event_versions(&store)
            .await
            .expect("lists pairs");
        Samples::load(samples_of("versioning"))
            .expect("loads")
            .check()
            .decodes::<versioning::CustomerEvent>()
            .decodes::<versioning::loan::LoanEvent>()
            .expect_stored(stored)
            .assert();

        // On PostgreSQL: the split sign-up loads as a registration and an e-mail change, the
        // renamed e-mail event under its old name applies like the new one.
        let c3 = customers.load("c3").await.expect("loads").state;
        assert_eq!(
            (c3.name.as_str(), c3.email.as_deref()),
            ("Edsger Dijkstra", Some("ewd@example.org"))
        );
        let c2 = customers.load("c2").await.expect("loads").state;
        assert_eq!(c2.email.as_deref(), Some("grace@example.org"));

        // The v1 loan, read back through the repository: due 21 days after it was recorded.
        let l1 = loans.load("l1").await.expect("loads").state;
        let stream = StreamId::new("loan-l1").expect("id");
        let recorded: Vec<_> = futures_util::TryStreamExt::try_collect(
            store.read_stream(&stream, factum::StreamVersion::INITIAL),
        )
        .await
        .expect("reads");
        let first = &recorded[0];
        assert_eq!(
            l1.due,
            Some(first.recorded_at + chrono::Duration::days(versioning::loan::LOAN_PERIOD_DAYS))
        );
    }

    #[tokio::test]
    async fn bank_samples_export_from_postgres_as_checked_in() {
        let db = TestDatabase::create().await;
        let store = db.store();
        let accounts = Repository::<bank::Account, _>::new(store.clone());
        use bank::AccountCommand::{Close, Deposit, Open, Withdraw};
        for command in [
            Open {
                account: "a1".into(),
                owner: "Ada".into(),
            },
            Deposit {
                account: "a1".into(),
                amount: 100,
            },
            Withdraw {
                account: "a1".into(),
                amount: 100,
            },
            Close {
                account: "a1".into(),
            },
        ] {
            accounts.execute(command).await.expect("executes");
        }
        let files = compare_or_write(&store, "bank").await;
        assert_eq!(files.len(), 4, "{files:#?}");
    }
}
