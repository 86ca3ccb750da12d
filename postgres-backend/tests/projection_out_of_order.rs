//! A transactional projection following the log live while writers commit out of order: every
//! event is applied exactly once.
//!
//! Alone in its binary: it holds writing transactions open on purpose, which stalls every reader
//! of the global log in the cluster until they end.

mod projection_support;

use std::time::Duration;

use factum::EventId;
use factum::subscription::SubscriptionState;
use factum_postgres::projection::PgProjectionRunner;
use factum_testkit::postgres::TestDatabase;
use projection_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writers_committing_out_of_order_are_each_applied_once_while_the_projection_follows_live() {
    bounded(60, async {
        let db = TestDatabase::create().await;
        let store = patient_store(&db);
        create_tables(db.pool()).await;
        let mut fold = Fold::default();
        append(&store, &mut fold, "ledger-0", 0, 10).await;

        let mut runner = PgProjectionRunner::new(store.clone(), Ledger::default())
            .batch_size(32)
            .idle_backoff(Duration::from_millis(2), Duration::from_millis(20));
        let mut status = runner.status();
        let task = tokio::spawn(async move { runner.run(std::future::pending::<()>()).await });
        wait_for(&mut status, "the runner to go live", |s| {
            s.state == SubscriptionState::Live && s.handled == 10
        })
        .await;

        // Three raw transactions take positions (and transaction ids) and stay open while
        // writers commit later events around them; then they commit newest first.
        let mut held = Vec::new();
        let mut writers = Vec::new();
        for k in 0..3_i64 {
            let mut tx = db.pool().begin().await.expect("begin");
            let id = EventId::new();
            let stream = format!("held-{k}");
            sqlx::query(
                "INSERT INTO factum.events (stream_id, stream_version, event_id, event_type, schema_version, payload) \
                 VALUES ($1, 1, $2, 'ledger.entry', 1, jsonb_build_object('n', $3::bigint))",
            )
            .bind(&stream)
            .bind(id.as_uuid())
            .bind(10_000 + k)
            .execute(&mut *tx)
            .await
            .expect("insert a held event");
            fold.add(&stream, 1, 10_000 + k, id);
            held.push(tx);
            for w in 0..2 {
                let store = store.clone();
                writers.push(tokio::spawn(async move {
                    let mut fold = Fold::default();
                    let stream = format!("ledger-{k}{w}");
                    for round in 0..5 {
                        append(&store, &mut fold, &stream, round * 10, 10).await;
                    }
                    fold
                }));
            }
        }
        for writer in writers {
            let written = writer.await.expect("writer");
            fold.model.total += written.model.total;
            fold.model.count += written.model.count;
            fold.model.applied += written.model.applied;
            fold.model.streams.extend(written.model.streams);
            fold.ids.extend(written.ids);
        }
        while let Some(tx) = held.pop() {
            tx.commit().await.expect("commit a held transaction");
        }

        let total = u64::try_from(fold.model.count).expect("count");
        wait_for(&mut status, "every event to be applied", |s| {
            s.handled >= total
        })
        .await;
        assert_eq!(status.borrow().handled, total, "no event applied twice");
        assert_eq!(read_model(db.pool()).await, fold.model);
        task.abort();
        let _ = task.await;
    })
    .await;
}
