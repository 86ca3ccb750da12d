//! PostgreSQL-specific behaviour: bad stored data, schema names and isolation, migrations and
//! their checksums, health, and sequence use on conflicts.

use std::time::Duration;

use factum::{
    DecodeError, EncodeError, Error, Event, EventFilter, EventStore, ExpectedVersion, LogPosition,
    NewEvent, RawValue, StreamId, StreamVersion,
};
use factum_postgres::{PostgresStore, SchemaName, StoreOptions};
use factum_testkit::postgres::TestDatabase;
use futures_util::TryStreamExt;
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Deposited {
    amount: u64,
}

#[derive(Debug)]
enum AccountEvent {
    Deposited(Deposited),
}

impl Event for AccountEvent {
    fn event_type(&self) -> &'static str {
        "account.deposited"
    }
    fn schema_version(&self) -> u32 {
        1
    }
    fn event_types() -> &'static [&'static str] {
        &["account.deposited"]
    }
    fn encode(&self) -> Result<Box<RawValue>, EncodeError> {
        match self {
            AccountEvent::Deposited(e) => factum::encode_json(e),
        }
    }
    fn decode(stored: &factum::Stored<'_>) -> Result<Self, DecodeError> {
        let (event_type, version, payload) =
            (stored.event_type, stored.schema_version, stored.payload);
        match (event_type, version) {
            ("account.deposited", 1) => Ok(AccountEvent::Deposited(factum::decode_json(payload)?)),
            _ => Err(DecodeError::unknown(event_type, version)),
        }
    }
}

fn deposit(amount: u64) -> NewEvent {
    NewEvent::encode(
        &AccountEvent::Deposited(Deposited { amount }),
        Default::default(),
    )
    .expect("encode")
}

fn stream(id: &str) -> StreamId {
    StreamId::new(id).expect("stream id")
}

/// Every test is bounded in time.
async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(120), f)
        .await
        .expect("the test finished in time")
}

async fn raw_insert(db: &TestDatabase, stream: &str, version: i64, event_type: &str, json: &str) {
    sqlx::query(
        "INSERT INTO factum.events (stream_id, stream_version, event_id, event_type, schema_version, payload) \
         VALUES ($1, $2, $3, $4, 1, $5::jsonb)",
    )
    .bind(stream)
    .bind(version)
    .bind(uuid::Uuid::now_v7())
    .bind(event_type)
    .bind(json)
    .execute(db.pool())
    .await
    .expect("raw insert");
}

fn assert_names_the_event(error: &Error, stream_id: &StreamId, version: u64, event_type: &str) {
    match error {
        Error::Decode {
            stream,
            version: v,
            event_type: t,
            position,
            ..
        }
        | Error::Metadata {
            stream,
            version: v,
            event_type: t,
            position,
            ..
        } => {
            assert_eq!(stream, stream_id);
            assert_eq!(v.get(), version);
            assert_eq!(t, event_type);
            assert!(
                position.global.get() > 0 && position.commit > 0,
                "{position:?}"
            );
            let message = error.to_string();
            for part in [
                stream_id.as_str(),
                &version.to_string(),
                event_type,
                &position.to_string(),
            ] {
                assert!(message.contains(part), "{message:?} does not name {part:?}");
            }
        }
        other => panic!("expected a decode error, got {other:?}"),
    }
}

#[tokio::test]
async fn corrupted_payload_names_stream_version_type_and_position() {
    bounded(async {
        let db = TestDatabase::create().await;
        // It reads the global log right after writing: wait for other tests' transactions.
        let store = db.patient_store();
        let id = stream("account-1");
        store
            .append(
                factum::AppendRequest::new(id.clone(), vec![deposit(5)])
                    .expected_version(ExpectedVersion::NoStream),
            )
            .await
            .expect("append");
        // Valid JSON (jsonb accepts nothing else) that does not fit the type.
        raw_insert(
            &db,
            "account-1",
            2,
            "account.deposited",
            r#"{"amount":"lots"}"#,
        )
        .await;
        let events: Vec<_> = store
            .read_stream(&id, StreamVersion::INITIAL)
            .try_collect()
            .await
            .expect("read");
        assert_eq!(events.len(), 2);
        assert!(events[0].decode::<AccountEvent>().is_ok());
        let error = events[1]
            .decode::<AccountEvent>()
            .expect_err("the payload is corrupt");
        assert_names_the_event(&error, &id, 2, "account.deposited");
        assert!(matches!(
            error,
            Error::Decode {
                source: DecodeError::Payload(_),
                ..
            }
        ));
        // The global log hands out the same event with the same position.
        let all = store
            .read_all(LogPosition::START, 10, &EventFilter::all())
            .await
            .expect("read all");
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].position, events[1].position);
    })
    .await;
}

#[tokio::test]
async fn unknown_event_type_names_stream_version_type_and_position() {
    bounded(async {
        let db = TestDatabase::create().await;
        let store = db.store();
        let id = stream("account-2");
        raw_insert(&db, "account-2", 1, "account.vanished", r#"{"amount":1}"#).await;
        let events: Vec<_> = store
            .read_stream(&id, StreamVersion::INITIAL)
            .try_collect()
            .await
            .expect("read");
        let error = events[0]
            .decode::<AccountEvent>()
            .expect_err("the type is unknown");
        assert_names_the_event(&error, &id, 1, "account.vanished");
        assert!(matches!(
            error,
            Error::Decode {
                source: DecodeError::Unknown { .. },
                ..
            }
        ));
    })
    .await;
}

#[tokio::test]
async fn corrupted_metadata_is_a_metadata_error_naming_the_event() {
    bounded(async {
        let db = TestDatabase::create().await;
        let store = db.store();
        let id = stream("account-3");
        raw_insert(&db, "account-3", 1, "account.deposited", r#"{"amount":1}"#).await;
        sqlx::query("UPDATE factum.events SET metadata = '[1, 2]'")
            .execute(db.pool())
            .await
            .expect("corrupt");
        let error = store
            .read_stream(&id, StreamVersion::INITIAL)
            .try_collect::<Vec<_>>()
            .await
            .expect_err("metadata must be an object");
        assert!(matches!(error, Error::Metadata { .. }), "{error:?}");
        assert!(error.to_string().contains("metadata"), "{error}");
        assert_names_the_event(&error, &id, 1, "account.deposited");
    })
    .await;
}

#[test]
fn injected_schema_names_are_rejected() {
    for bad in [
        "x; DROP TABLE events",
        "factum\"; DROP SCHEMA public; --",
        "",
    ] {
        let error = SchemaName::new(bad).expect_err("rejected");
        assert!(matches!(error, Error::InvalidArgument(_)), "{error:?}");
        assert!(error.to_string().contains("schema name"), "{error}");
    }
}

#[tokio::test]
async fn schemas_isolate_stores_in_one_database() {
    bounded(async {
        let db = TestDatabase::create().await;
        let billing = db.store_with(
            StoreOptions::default().with_schema(SchemaName::new("billing").expect("valid")),
        );
        let before = billing.health().await.expect("health");
        assert_eq!(before.applied_version, None);
        assert!(!before.is_up_to_date());
        billing.migrate().await.expect("migrate billing");
        billing.migrate().await.expect("migrating twice is a no-op");
        let after = billing.health().await.expect("health");
        assert!(after.is_up_to_date(), "{after:?}");

        let id = stream("invoice-1");
        billing
            .append(
                factum::AppendRequest::new(id.clone(), vec![deposit(1)])
                    .expected_version(ExpectedVersion::NoStream),
            )
            .await
            .expect("append");
        let default = db.store();
        let in_default: Vec<_> = default
            .read_stream(&id, StreamVersion::INITIAL)
            .try_collect()
            .await
            .expect("read");
        assert!(in_default.is_empty(), "schemas must not share events");
        let migrations_tables: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_tables WHERE tablename = '_sqlx_migrations' \
             AND schemaname IN ('billing', 'factum')",
        )
        .fetch_one(db.pool())
        .await
        .expect("count");
        assert_eq!(
            migrations_tables, 2,
            "each schema keeps its own bookkeeping"
        );
    })
    .await;
}

#[tokio::test]
async fn an_edited_applied_migration_is_detected() {
    bounded(async {
        let db = TestDatabase::create().await;
        let store = db.store();
        store.migrate().await.expect("already applied: no-op");
        // What editing 0001's file after it was applied amounts to: the stored checksum no longer
        // matches the embedded migration's.
        sqlx::query(
            "UPDATE factum._sqlx_migrations SET checksum = sha384('edited') WHERE version = 1",
        )
        .execute(db.pool())
        .await
        .expect("tamper");
        let error = store.migrate().await.expect_err("the checksum differs");
        let chain = format!(
            "{error}: {}",
            std::error::Error::source(&error).expect("a cause")
        );
        assert!(!error.is_transient(), "{chain}");
        assert!(
            chain.contains("migration 1") && chain.contains("checksum"),
            "{chain}"
        );
    })
    .await;
}

#[tokio::test]
async fn a_conflicting_append_takes_no_position() {
    bounded(async {
        let db = TestDatabase::create().await;
        let store = db.store();
        let id = stream("order-1");
        let first = store
            .append(
                factum::AppendRequest::new(id.clone(), vec![deposit(1)])
                    .expected_version(ExpectedVersion::NoStream),
            )
            .await
            .expect("append");
        for expected in [
            ExpectedVersion::NoStream,
            ExpectedVersion::Exact(StreamVersion::new(7)),
        ] {
            let conflict = store
                .append(
                    factum::AppendRequest::new(id.clone(), vec![deposit(2)])
                        .expected_version(expected),
                )
                .await
                .expect_err("conflict");
            assert!(
                matches!(conflict, Error::Conflict { actual, .. } if actual.get() == 1),
                "{conflict:?}"
            );
        }
        let next = store
            .append(
                factum::AppendRequest::new(id.clone(), vec![deposit(3), deposit(4)])
                    .expected_version(ExpectedVersion::Exact(StreamVersion::new(1))),
            )
            .await
            .expect("append");
        assert_eq!(
            next.positions
                .iter()
                .map(|p| p.get() - first.positions[0].get())
                .collect::<Vec<_>>(),
            [1, 2],
            "conflicts consumed no sequence values"
        );
        assert_eq!(next.stream_version.get(), 3);
    })
    .await;
}

#[tokio::test]
async fn health_reports_the_schema_and_connect_applies_pool_settings() {
    bounded(async {
        let db = TestDatabase::create().await;
        let config = factum_postgres::PoolConfig {
            max_connections: 2,
            statement_timeout: Some(Duration::from_millis(1500)),
            ..Default::default()
        };
        let store = PostgresStore::connect_with(db.url(), &config, StoreOptions::default())
            .await
            .expect("connect");
        let health = store.health().await.expect("health");
        assert!(health.is_up_to_date(), "{health:?}");
        assert_eq!(health.schema.as_str(), "factum");
        let timeout: String = sqlx::query_scalar("SHOW statement_timeout")
            .fetch_one(store.pool())
            .await
            .expect("show");
        assert_eq!(timeout, "1500ms");
        // A statement cancelled by statement_timeout was rolled back: a transient error.
        let slow = sqlx::query("SELECT pg_sleep(5)")
            .execute(store.pool())
            .await
            .expect_err("cancelled");
        assert!(slow.to_string().contains("statement timeout"), "{slow}");
        let bad_url = PostgresStore::connect("not a url")
            .await
            .expect_err("bad url");
        assert!(matches!(bad_url, Error::InvalidArgument(_)), "{bad_url:?}");
    })
    .await;
}

/// An append cancelled by `statement_timeout` was rolled back: the store retries it by its
/// [`RetryPolicy`](factum::resilience::RetryPolicy), and with `no_retry` it reports it at once.
#[tokio::test]
async fn a_rolled_back_append_is_retried_by_the_store_policy() {
    use factum::resilience::RetryPolicy;

    bounded(async {
        let db = TestDatabase::create().await;
        let id = stream("account-9");
        db.store()
            .append(
                factum::AppendRequest::new(id.clone(), vec![deposit(1)])
                    .expected_version(ExpectedVersion::NoStream),
            )
            .await
            .expect("the stream exists");
        let config = factum_postgres::PoolConfig {
            max_connections: 2,
            statement_timeout: Some(Duration::from_millis(300)),
            ..Default::default()
        };
        let connect = |policy: RetryPolicy| {
            let config = config.clone();
            let url = db.url().to_owned();
            async move {
                PostgresStore::connect_with(
                    &url,
                    &config,
                    StoreOptions::default().with_retry(policy),
                )
                .await
                .expect("connect")
            }
        };
        let policy = RetryPolicy::new()
            .with_max_attempts(3)
            .with_initial_delay(Duration::from_millis(10));

        // Another transaction holds the stream's row, so each attempt waits and is cancelled.
        let lock_row = |db: &TestDatabase| {
            let pool = db.pool().clone();
            let id = id.clone();
            async move {
                let mut tx = pool.begin().await.expect("begin");
                sqlx::query("SELECT 1 FROM factum.streams WHERE stream_id = $1 FOR UPDATE")
                    .bind(id.as_str())
                    .execute(&mut *tx)
                    .await
                    .expect("lock");
                tx
            }
        };

        // Without retries: the first cancellation is the answer, a transient error.
        let once = connect(RetryPolicy::no_retry()).await;
        let holder = lock_row(&db).await;
        let error = once
            .append(
                factum::AppendRequest::new(id.clone(), vec![deposit(2)])
                    .expected_version(ExpectedVersion::Exact(StreamVersion::new(1))),
            )
            .await
            .expect_err("cancelled");
        assert!(error.is_transient(), "{error:?}");
        holder.rollback().await.expect("rollback");

        // With retries: the lock is released only once a second attempt is seen waiting.
        let store = connect(policy).await;
        let holder = lock_row(&db).await;
        let append = tokio::spawn({
            let (store, id) = (store.clone(), id.clone());
            async move {
                store
                    .append(
                        factum::AppendRequest::new(id.clone(), vec![deposit(3)])
                            .expected_version(ExpectedVersion::Exact(StreamVersion::new(1))),
                    )
                    .await
            }
        });
        let waiting = "SELECT query_start::text FROM pg_stat_activity \
                       WHERE datname = current_database() AND wait_event_type = 'Lock'";
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let mut starts: Vec<String> = Vec::new();
        while starts.len() < 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no second attempt was seen: {starts:?}"
            );
            let start: Option<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(waiting))
                .fetch_optional(db.pool())
                .await
                .expect("pg_stat_activity");
            if let Some(start) = start
                && starts.last() != Some(&start)
            {
                starts.push(start);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        holder.rollback().await.expect("rollback");
        let appended = append
            .await
            .expect("append task")
            .expect("a later attempt went through");
        assert_eq!(appended.stream_version.get(), 2);
        assert!(!appended.duplicate);
    })
    .await;
}
