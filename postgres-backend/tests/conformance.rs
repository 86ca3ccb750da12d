//! The backend conformance suite, against PostgreSQL: one fresh database per check.

factum_testkit::conformance_tests!(factum_testkit::postgres::TestStore::create);

factum_testkit::consumer_conformance_tests!(|| async {
    let test = factum_testkit::postgres::TestStore::create().await;
    ((*test).clone(), test)
});

/// The same suite with group commit on: every append goes through the group-commit queue.
mod group_commit {
    use factum_postgres::{GroupCommit, StoreOptions};
    use factum_testkit::postgres::{PATIENT_READ_SETTLE, TestStore};

    async fn store() -> TestStore {
        TestStore::create_with(
            StoreOptions::default()
                .with_read_settle_timeout(PATIENT_READ_SETTLE)
                .with_group_commit(GroupCommit::enabled()),
        )
        .await
    }

    factum_testkit::conformance_tests!(store);
}

/// The same suite with batched reads (and group commit) on: every stream read goes through the
/// batched-reads queue, and one event per statement per stream makes every read of more than one
/// event go on alone after its first.
mod batched_reads {
    use factum_postgres::{BatchedReads, GroupCommit, StoreOptions};
    use factum_testkit::postgres::{PATIENT_READ_SETTLE, TestStore};

    async fn store() -> TestStore {
        TestStore::create_with(
            StoreOptions::default()
                .with_read_settle_timeout(PATIENT_READ_SETTLE)
                .with_group_commit(GroupCommit::enabled())
                .with_batched_reads(BatchedReads::enabled().with_rows_per_stream(1)),
        )
        .await
    }

    factum_testkit::conformance_tests!(store);
}
