//! Crypto-shredding end to end: after a customer is forgotten, no byte of their name or email is
//! readable through any API or in any table (events, snapshots, the read model, every other
//! table of the schema), the rest of each event still loads, and a rebuild succeeds. On the real
//! PostgreSQL, then the in-memory backend held to the same checks.

use std::time::Duration;

use customers::{Customer, CustomerCommand, CustomerEvent, DIRECTORY_TABLE, Directory};
use factum::personal::{InMemoryKeyStore, PLACEHOLDER, Shredder, ShredderOptions, SubjectId};
use factum::{
    EventFilter, EventStore, InMemoryStore, LogPosition, Repository, SnapshotPolicy, SnapshotStore,
    StreamId, StreamVersion,
};
use factum_postgres::PgKeyStore;
use factum_postgres::projection::PgProjectionRunner;
use factum_testkit::postgres::TestStore;
use futures_util::TryStreamExt;

const ADA: [&str; 3] = ["Ada Lovelace", "ada@example.com", "ada@analytical.engine"];
const GRACE: [&str; 2] = ["Grace Hopper", "grace@navy.mil"];

fn register(id: &str, name: &str, email: &str) -> CustomerCommand {
    CustomerCommand::Register {
        customer_id: id.into(),
        name: name.into(),
        email: email.into(),
        plan: "gold".into(),
    }
}

/// Ada: registered, plan changed, email changed; Grace: registered. Snapshots after every event.
async fn write_history<S: EventStore>(customers: &Repository<Customer, S>) {
    customers
        .execute(register("ada", ADA[0], ADA[1]))
        .await
        .unwrap();
    customers
        .execute(CustomerCommand::ChangePlan {
            customer_id: "ada".into(),
            plan: "platinum".into(),
        })
        .await
        .unwrap();
    customers
        .execute(CustomerCommand::ChangeEmail {
            customer_id: "ada".into(),
            email: ADA[2].into(),
        })
        .await
        .unwrap();
    customers
        .execute(register("grace", GRACE[0], GRACE[1]))
        .await
        .unwrap();
}

/// How many rows of each table of `schema` (and of `public`) hold any of `needles`, by their
/// whole text form.
async fn tables_holding(pool: &sqlx::PgPool, schema: &str, needles: &[&str]) -> Vec<(String, i64)> {
    let tables: Vec<(String, String)> = sqlx::query_as(
        "SELECT table_schema, table_name FROM information_schema.tables \
         WHERE table_schema IN ($1, 'public') AND table_type = 'BASE TABLE'",
    )
    .bind(schema)
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(tables.iter().any(|(_, t)| t == "events"), "{tables:?}");
    let mut found = Vec::new();
    for (schema, table) in tables {
        let sql =
            format!("SELECT count(*) FROM \"{schema}\".\"{table}\" t WHERE t::text LIKE ANY($1)");
        let patterns: Vec<String> = needles.iter().map(|n| format!("%{n}%")).collect();
        let count: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .bind(patterns)
            .fetch_one(pool)
            .await
            .unwrap();
        if count > 0 {
            found.push((format!("{schema}.{table}"), count));
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_customer_leaves_no_plaintext_in_postgres() {
    let db = TestStore::create().await;
    let plain_store = (*db).clone();
    let pool = plain_store.pool().clone();
    sqlx::query(DIRECTORY_TABLE).execute(&pool).await.unwrap();
    let shredder = Shredder::new(PgKeyStore::new(&plain_store));
    let store = plain_store.clone().with_shredder(shredder.clone());
    let customers = Repository::<Customer, _>::new(store.clone())
        .with_cache(100)
        .with_snapshots(store.clone(), SnapshotPolicy::every(1))
        .with_shredder(shredder.clone());
    write_history(&customers).await;

    let mut directory = PgProjectionRunner::new(store.clone(), Directory);
    directory.catch_up().await.unwrap();

    // Before: the events never held plaintext, the snapshots and the read model do (so the scan
    // below finds what it looks for).
    let before = tables_holding(&pool, "factum", &ADA).await;
    assert!(
        !before.iter().any(|(t, _)| t == "factum.events"),
        "events hold plaintext: {before:?}"
    );
    assert!(
        before.iter().any(|(t, _)| t == "factum.snapshots"),
        "{before:?}"
    );
    assert!(
        before.iter().any(|(t, _)| t == "public.customer_directory"),
        "{before:?}"
    );
    assert_eq!(customers.load("ada").await.unwrap().state.name, ADA[0]);

    // Another process, with its own shredder on the same keys (re-reading keys on every use).
    let other_shredder = Shredder::with_options(
        PgKeyStore::new(&plain_store),
        ShredderOptions::default().max_staleness(Duration::ZERO),
    );
    let other = plain_store.clone().with_shredder(other_shredder);
    let ada_stream = StreamId::new("customer-ada").unwrap();
    let read: Vec<_> = other
        .read_stream(&ada_stream, StreamVersion::INITIAL)
        .try_collect()
        .await
        .unwrap();
    assert!(read[0].payload.get().contains(ADA[0]));

    let ada = SubjectId::new("ada").unwrap();
    let done = store.forget_subject(&ada).await.unwrap();
    assert!(done.had_key);
    assert_eq!(done.streams, std::slice::from_ref(&ada_stream));
    assert_eq!(done.snapshots_deleted, 1);
    directory.catch_up().await.unwrap();

    // No table holds a byte of Ada's personal fields; Grace's are untouched.
    let after = tables_holding(&pool, "factum", &ADA).await;
    assert!(
        after.is_empty(),
        "plaintext left after forgetting: {after:?}"
    );
    let grace = tables_holding(&pool, "factum", &GRACE).await;
    assert!(
        grace.iter().any(|(t, _)| t == "public.customer_directory"),
        "{grace:?}"
    );
    let key: Option<Option<Vec<u8>>> =
        sqlx::query_scalar("SELECT key FROM factum.personal_keys WHERE subject = 'ada'")
            .fetch_optional(&pool)
            .await
            .unwrap();
    assert_eq!(
        key,
        Some(None),
        "the key is gone, the forgetting remembered"
    );

    // Every API: aggregate loads (the cached state was dropped, the snapshot discarded), the
    // stream read, the global log as subscriptions read it, the other process.
    let loaded = customers.load("ada").await.unwrap();
    assert_eq!(
        (loaded.state.name.as_str(), loaded.state.email.as_str()),
        (PLACEHOLDER, PLACEHOLDER)
    );
    assert_eq!(
        loaded.state.plan, "platinum",
        "the rest of each event still loads"
    );
    let committed = customers
        .execute(CustomerCommand::ChangePlan {
            customer_id: "ada".into(),
            plan: "silver".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        committed.state.name, PLACEHOLDER,
        "the state cache held Ada's name"
    );
    assert_eq!(committed.state.plan, "silver");
    let snapshot = store
        .load_snapshot(&ada_stream)
        .await
        .unwrap()
        .expect("taken again");
    assert!(
        !ADA.iter().any(|n| snapshot.state.get().contains(n)),
        "{}",
        snapshot.state.get()
    );
    for reader in [&store, &other] {
        let events: Vec<_> = reader
            .read_stream(&ada_stream, StreamVersion::INITIAL)
            .try_collect()
            .await
            .unwrap();
        assert_eq!(events.len(), 4);
        let log = reader
            .read_all(LogPosition::START, 100, &EventFilter::all())
            .await
            .unwrap();
        for event in events.iter().chain(&log) {
            assert!(
                !ADA.iter().any(|n| event.payload.get().contains(n)),
                "{}",
                event.payload.get()
            );
        }
        let first = events[0].decode::<CustomerEvent>().unwrap().event;
        assert_eq!(
            first,
            CustomerEvent::Registered {
                customer_id: "ada".into(),
                name: PLACEHOLDER.into(),
                email: PLACEHOLDER.into(),
                plan: "gold".into(),
            }
        );
        assert!(
            log.iter()
                .any(|e| e.event_type == factum::personal::SUBJECT_FORGOTTEN)
        );
    }
    directory.catch_up().await.unwrap();
    let (name, email, plan): (String, String, String) = sqlx::query_as(
        "SELECT name, email, plan FROM public.customer_directory WHERE customer_id = 'ada'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (name.as_str(), email.as_str(), plan.as_str()),
        (PLACEHOLDER, PLACEHOLDER, "silver")
    );

    // A rebuild from the log succeeds and holds placeholders for Ada, Grace's data for Grace.
    directory.rebuild(|_| {}).await.unwrap();
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT customer_id, name, email FROM public.customer_directory ORDER BY customer_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        [
            ("ada".into(), PLACEHOLDER.into(), PLACEHOLDER.into()),
            ("grace".into(), GRACE[0].into(), GRACE[1].into()),
        ]
    );
    assert!(tables_holding(&pool, "factum", &ADA).await.is_empty());

    // Nothing personal is written for a forgotten subject again.
    let refused = customers
        .execute(CustomerCommand::ChangeEmail {
            customer_id: "ada".into(),
            email: "new@example.com".into(),
        })
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("forgotten") || format!("{refused:?}").contains("forgotten"),
        "{refused:?}"
    );

    // A store without a shredder refuses personal fields rather than store them in the clear,
    // and reading them fails with an error instead of handing out ciphertext as data.
    let plain = Repository::<Customer, _>::new(plain_store.clone());
    let error = plain
        .execute(register("alan", "Alan Turing", "alan@bletchley.uk"))
        .await
        .unwrap_err();
    assert!(format!("{error:?}").contains("plaintext"), "{error:?}");
    let error = plain.load("grace").await.unwrap_err();
    assert!(
        format!("{error:?}").contains("still encrypted"),
        "{error:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_memory_backend_forgets_the_same_way() {
    let keys = InMemoryKeyStore::new();
    let shredder = Shredder::new(keys.clone());
    let raw = InMemoryStore::new();
    let store = raw.clone().with_shredder(shredder.clone());
    let customers = Repository::<Customer, _>::new(store.clone())
        .with_cache(100)
        .with_snapshots(store.clone(), SnapshotPolicy::every(1))
        .with_shredder(shredder.clone());
    write_history(&customers).await;
    let ada_stream = StreamId::new("customer-ada").unwrap();

    // What is kept (read without the shredder) never held plaintext; snapshots do until forgotten.
    let kept = raw
        .read_all(LogPosition::START, 100, &EventFilter::all())
        .await
        .unwrap();
    assert!(
        kept.iter()
            .all(|e| !ADA.iter().any(|n| e.payload.get().contains(n)))
    );
    let snapshot = raw.load_snapshot(&ada_stream).await.unwrap().unwrap();
    assert!(snapshot.state.get().contains(ADA[0]));
    assert_eq!(customers.load("ada").await.unwrap().state.email, ADA[2]);

    let done = store
        .forget_subject(&SubjectId::new("ada").unwrap())
        .await
        .unwrap();
    assert_eq!((done.snapshots_deleted, done.streams.len()), (1, 1));
    assert!(raw.load_snapshot(&ada_stream).await.unwrap().is_none());

    let loaded = customers.load("ada").await.unwrap();
    assert_eq!(
        (loaded.state.name.as_str(), loaded.state.plan.as_str()),
        (PLACEHOLDER, "platinum")
    );
    let committed = customers
        .execute(CustomerCommand::ChangePlan {
            customer_id: "ada".into(),
            plan: "silver".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        committed.state.email, PLACEHOLDER,
        "the state cache held Ada's email"
    );
    for reader in [&store, &raw] {
        let log = reader
            .read_all(LogPosition::START, 100, &EventFilter::all())
            .await
            .unwrap();
        assert!(
            log.iter()
                .all(|e| !ADA.iter().any(|n| e.payload.get().contains(n)))
        );
        let snapshot = reader.load_snapshot(&ada_stream).await.unwrap().unwrap();
        assert!(!ADA.iter().any(|n| snapshot.state.get().contains(n)));
    }
    // Grace is untouched, and a replay of the whole log decodes.
    assert_eq!(customers.load("grace").await.unwrap().state.name, GRACE[0]);
    let log = store
        .read_all(LogPosition::START, 100, &EventFilter::all())
        .await
        .unwrap();
    let decoded = log
        .iter()
        .filter(|e| e.stream_id.category() == "customer")
        .map(|e| e.decode::<CustomerEvent>().map(|e| e.event))
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    assert_eq!(decoded.len(), 5);
    assert!(matches!(&decoded[0], CustomerEvent::Registered { name, .. } if name == PLACEHOLDER));
    assert!(matches!(&decoded[3], CustomerEvent::Registered { name, .. } if name == GRACE[0]));
}
