//! Beginning transactions in a way that is safe to cancel.

use sqlx::{PgPool, Postgres, Transaction};

/// `pool.begin()`, safe to cancel.
///
/// sqlx (0.8.6 and 0.9.0) does not roll back a `BEGIN` it has sent when the future awaiting it is
/// dropped before the answer arrives (its guard looks at a depth it has not raised yet), and the
/// connection goes back to the pool inside a server-side transaction: every statement that later
/// runs on it joins that transaction, never commits, and holds its locks. A projection runner is
/// cancelled by design (dropped, aborted, raced in `select!`), so its transactions begin in a
/// task of their own: the task always finishes the `BEGIN`, and when nobody waits for it any
/// more it drops the transaction, which rolls it back.
///
/// Upstream: sqlx issues #4385 and #4393, fixed by pull request #4394 (merged August 2026, after
/// the 0.9.0 release factum is built on). Once factum depends on a release with that fix, this can
/// go back to `pool.begin()`; the test below keeps checking the behaviour either way.
pub(crate) async fn begin(pool: &PgPool) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    let pool = pool.clone();
    tokio::spawn(async move { pool.begin().await })
        .await
        .unwrap_or(Err(sqlx::Error::WorkerCrashed))
}

#[cfg(test)]
mod tests {
    use sqlx::postgres::PgPoolOptions;

    #[tokio::test]
    async fn a_cancelled_begin_leaves_no_transaction_behind() {
        let db = factum_testkit::postgres::TestDatabase::create().await;
        // One connection, so every statement runs on the one a cancelled begin used.
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect(db.url())
            .await
            .expect("connect");
        sqlx::query("CREATE TABLE writes (n int)")
            .execute(&pool)
            .await
            .expect("table");
        for n in 0..150_u32 {
            // Dropped after a growing delay: some drops land after the BEGIN went out and before
            // its answer came back.
            let delay = std::time::Duration::from_micros(u64::from(n % 60) * 25);
            let _ = tokio::time::timeout(delay, super::begin(&pool)).await;
            // A plain write afterwards must commit: inside a leaked transaction it would not.
            sqlx::query("INSERT INTO writes VALUES ($1)")
                .bind(i64::from(n))
                .execute(&pool)
                .await
                .expect("insert");
            let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM writes")
                .fetch_one(db.pool())
                .await
                .expect("count");
            assert_eq!(
                seen,
                i64::from(n) + 1,
                "a write after a cancelled begin is not visible to another connection"
            );
        }
    }
}
