//! `factum_testkit::PgProjectionFixture`: events applied to a PostgreSQL projection through
//! `ProjectionTx` in real transactions, then the rows checked.

use std::panic::AssertUnwindSafe;

use factum::{BoxError, DecodeError, EncodeError, Envelope, RawValue};
use factum_postgres::projection::{PgProjection, ProjectionTx};
use factum_testkit::postgres::TestDatabase;
use factum_testkit::{PgProjectionFixture, envelope};
use futures_util::FutureExt as _;

#[derive(Debug)]
struct Counted {
    n: i64,
}

impl factum::Event for Counted {
    fn event_type(&self) -> &'static str {
        "tally.counted"
    }
    fn schema_version(&self) -> u32 {
        1
    }
    fn event_types() -> &'static [&'static str] {
        &["tally.counted"]
    }
    fn encode(&self) -> Result<Box<RawValue>, EncodeError> {
        factum::encode_json(&self.n)
    }
    fn decode(stored: &factum::Stored<'_>) -> Result<Self, DecodeError> {
        let (event_type, version, payload) =
            (stored.event_type, stored.schema_version, stored.payload);
        match (event_type, version) {
            ("tally.counted", 1) => factum::decode_json(payload).map(|n| Counted { n }),
            _ => Err(DecodeError::unknown(event_type, version)),
        }
    }
}

/// A total per stream in `read.tallies`, and one row per `apply_batch` call in `tally_batches`
/// (how many events it was given), so the tests see which path the fixture took. Fails on the
/// `poison` value.
#[derive(Default)]
struct Tally {
    poison: Option<i64>,
}

const SCHEMA: &str = "CREATE SCHEMA read;
    CREATE TABLE read.tallies (stream text PRIMARY KEY, total bigint NOT NULL);
    CREATE TABLE tally_batches (id bigserial PRIMARY KEY, events int NOT NULL);";

impl PgProjection for Tally {
    const NAME: &'static str = "tally";
    const TABLES: &'static [&'static str] = &["read.tallies", "tally_batches"];
    type Event = Counted;

    async fn apply(
        &mut self,
        tx: &mut ProjectionTx<'_>,
        event: &Envelope<Counted>,
    ) -> Result<(), BoxError> {
        if self.poison == Some(event.event.n) {
            return Err(format!("{} is poison", event.event.n).into());
        }
        let sql = format!(
            "INSERT INTO {0} AS t (stream, total) VALUES ($1, $2) \
             ON CONFLICT (stream) DO UPDATE SET total = t.total + $2",
            tx.table("read.tallies")
        );
        sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
            .bind(event.stream_id.as_str())
            .bind(event.event.n)
            .execute(tx.conn())
            .await?;
        Ok(())
    }

    async fn apply_batch(
        &mut self,
        tx: &mut ProjectionTx<'_>,
        events: &[Envelope<Counted>],
    ) -> Result<(), BoxError> {
        for event in events {
            self.apply(tx, event).await?;
        }
        let sql = format!(
            "INSERT INTO {0} (events) VALUES ($1)",
            tx.table("tally_batches")
        );
        sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
            .bind(i32::try_from(events.len())?)
            .execute(tx.conn())
            .await?;
        Ok(())
    }
}

fn tally(stream: &str, total: i64) -> (String, i64) {
    (stream.to_owned(), total)
}

const TALLIES: &str = "SELECT stream, total FROM read.tallies ORDER BY stream";
const BATCHES: &str = "SELECT events FROM tally_batches ORDER BY id";

#[tokio::test]
async fn each_given_call_is_one_batch_in_one_committed_transaction() {
    let fixture = PgProjectionFixture::create(Tally::default())
        .await
        .setup(SCHEMA)
        .await
        .given_events("tally-a1", [Counted { n: 1 }, Counted { n: 2 }])
        .await
        .given_events("tally-b2", [Counted { n: 5 }])
        .await
        .given(envelope("tally-a1", Counted { n: 10 }).version(7))
        .await
        .then_rows(TALLIES, [tally("tally-a1", 13), tally("tally-b2", 5)])
        .await
        .then_rows(BATCHES, [(2_i32,), (1,), (1,)])
        .await;
    // Committed: another connection of the pool sees the rows.
    let (count,): (i64,) = sqlx::query_as("SELECT count(*) FROM read.tallies")
        .fetch_one(fixture.pool())
        .await
        .expect("counts");
    assert_eq!(count, 2);
}

#[tokio::test]
async fn one_event_per_transaction_goes_through_apply() {
    PgProjectionFixture::create(Tally::default())
        .await
        .one_event_per_transaction()
        .setup(SCHEMA)
        .await
        .given_events("tally-a1", [Counted { n: 1 }, Counted { n: 2 }])
        .await
        .given_events("tally-b2", [Counted { n: 5 }])
        .await
        .then_rows(TALLIES, [tally("tally-a1", 3), tally("tally-b2", 5)])
        .await
        .then_rows(BATCHES, Vec::<(i32,)>::new())
        .await;
}

#[tokio::test]
async fn a_failing_event_rolls_its_batch_back_and_fails_the_test_with_the_event() {
    let db = TestDatabase::create().await;
    let fixture = PgProjectionFixture::new(&db, Tally { poison: Some(-1) })
        .setup(SCHEMA)
        .await
        .given_events("tally-a1", [Counted { n: 1 }])
        .await;
    let failed =
        AssertUnwindSafe(fixture.given_events("tally-a1", [Counted { n: 2 }, Counted { n: -1 }]))
            .catch_unwind()
            .await;
    let message = panic_message(failed.expect_err("the poisoned batch fails"));
    assert!(
        message.contains("projection `tally` failed to apply tally-a1 at version 2")
            && message.contains("tally-a1 at version 3")
            && message.contains("-1 is poison")
            && message.contains("[0] tally-a1 at version 1"),
        "{message}"
    );
    // The first batch is stored; the failed one left nothing, not even its first event.
    let rows: Vec<(String, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(TALLIES))
        .fetch_all(db.pool())
        .await
        .expect("reads");
    assert_eq!(rows, [tally("tally-a1", 1)]);
}

#[tokio::test]
async fn different_rows_fail_the_test_showing_both_sides_and_the_events() {
    let fixture = PgProjectionFixture::create(Tally::default())
        .await
        .setup(SCHEMA)
        .await
        .given_events("tally-a1", [Counted { n: 4 }])
        .await;
    let failed = AssertUnwindSafe(fixture.then_rows(TALLIES, [tally("tally-a1", 5)]))
        .catch_unwind()
        .await;
    let message = panic_message(failed.expect_err("the rows differ"));
    assert!(
        message.contains("projection `tally`: the rows differ")
            && message.contains(TALLIES)
            && message.contains("5,")
            && message.contains("4,")
            && message.contains("[0] tally-a1 at version 1 (position 1, \"tally.counted\")"),
        "{message}"
    );
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_default()
}
