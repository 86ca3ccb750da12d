//! Evolved events on PostgreSQL: a projection runner and its rebuild apply every part of a split
//! event, and events stored under an old (renamed) name.
#![cfg(feature = "postgres")]

use factum::{
    AppendRequest, BoxError, Envelope, EventId, EventMetadata, EventStore, ExpectedVersion,
    NewEvent, RawValue, StreamId,
};
use factum_postgres::projection::{PgProjection, PgProjectionRunner, ProjectionTx};
use factum_testkit::postgres::TestDatabase;
use versioning::CustomerEvent;

fn legacy(event_type: &str, version: u32, json: &str) -> NewEvent {
    NewEvent {
        event_id: EventId::new(),
        event_type: event_type.into(),
        schema_version: version,
        payload: RawValue::from_string(json.to_owned()).expect("JSON"),
        metadata: EventMetadata::default(),
    }
}

/// One row per customer: name and e-mail.
#[derive(Default)]
struct Directory;

impl PgProjection for Directory {
    const NAME: &'static str = "directory";
    const TABLES: &'static [&'static str] = &["directory"];
    type Event = CustomerEvent;

    async fn apply(
        &mut self,
        tx: &mut ProjectionTx<'_>,
        event: &Envelope<CustomerEvent>,
    ) -> Result<(), BoxError> {
        let table = tx.table("directory").to_owned();
        let (sql, value) = match &event.event {
            CustomerEvent::Registered(r) => (
                format!(
                    "INSERT INTO {table} (stream, name) VALUES ($1, $2) \
                     ON CONFLICT (stream) DO UPDATE SET name = $2"
                ),
                format!("{} {}", r.first_name, r.last_name),
            ),
            CustomerEvent::EmailChanged { email } => (
                format!("UPDATE {table} SET email = $2 WHERE stream = $1"),
                email.clone(),
            ),
        };
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(event.stream_id.as_str())
            .bind(value)
            .execute(tx.conn())
            .await?;
        Ok(())
    }
}

async fn rows(db: &TestDatabase) -> Vec<(String, String, Option<String>)> {
    sqlx::query_as("SELECT stream, name, email FROM directory ORDER BY stream")
        .fetch_all(db.pool())
        .await
        .expect("reads the read model")
}

#[tokio::test]
async fn a_projection_and_its_rebuild_apply_split_and_renamed_events() {
    let db = TestDatabase::create().await;
    sqlx::query("CREATE TABLE directory (stream text PRIMARY KEY, name text NOT NULL, email text)")
        .execute(db.pool())
        .await
        .expect("creates the read model");
    let store = db.store();
    for (stream, events) in [
        (
            "customer-c1",
            vec![legacy(
                "customer.signed_up",
                1,
                r#"{"name":"Ada Lovelace","email":"ada@example.org"}"#,
            )],
        ),
        (
            "customer-c2",
            vec![
                legacy("customer.registered", 1, r#"{"name":"Grace Hopper"}"#),
                legacy(
                    "customer.email_updated",
                    1,
                    r#"{"email":"grace@example.org"}"#,
                ),
            ],
        ),
    ] {
        store
            .append(
                AppendRequest::new(StreamId::new(stream).expect("id"), events)
                    .expected_version(ExpectedVersion::NoStream),
            )
            .await
            .expect("appends");
    }
    let expected = vec![
        (
            "customer-c1".to_owned(),
            "Ada Lovelace".to_owned(),
            Some("ada@example.org".to_owned()),
        ),
        (
            "customer-c2".to_owned(),
            "Grace Hopper".to_owned(),
            Some("grace@example.org".to_owned()),
        ),
    ];

    let mut runner = PgProjectionRunner::new(store.clone(), Directory);
    runner.catch_up().await.expect("catches up");
    assert_eq!(rows(&db).await, expected);

    // The rebuild reads the same log into fresh tables and swaps them in.
    sqlx::query("UPDATE directory SET email = NULL")
        .execute(db.pool())
        .await
        .expect("spoils the model");
    runner.rebuild(|_| {}).await.expect("rebuilds");
    assert_eq!(rows(&db).await, expected);
}
