//! Personal fields read through a read replica: the replica's reads decrypt them as the
//! primary's do (a real streaming replica, `pg_basebackup -R`).

use customers::{Customer, CustomerCommand, CustomerEvent};
use factum::personal::{Shredder, SubjectId};
use factum::{EventStore, Repository, StreamId, StreamVersion};
use factum_postgres::PgKeyStore;
use factum_testkit::postgres::replica::ReplicatedDatabase;
use futures_util::TryStreamExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_on_the_replica_decrypts_personal_fields_and_reads_placeholders_after_a_forget() {
    let db = ReplicatedDatabase::create().await;
    let plain = db.primary_store();
    plain.migrate().await.expect("migrate");
    let store = plain
        .clone()
        .with_shredder(Shredder::new(PgKeyStore::new(&plain)));
    let customers = Repository::<Customer, _>::new(store.clone());
    customers
        .execute(CustomerCommand::Register {
            customer_id: "ada".into(),
            name: "Ada Lovelace".into(),
            email: "ada@example.com".into(),
            plan: "gold".into(),
        })
        .await
        .expect("register");
    db.wait_for_replay().await;

    let reader = db.reader(&store).await.expect("reader");
    let stream = StreamId::new("customer-ada").expect("stream id");
    let read = |reader: factum_postgres::PgReader| {
        let stream = stream.clone();
        async move {
            let events: Vec<_> = reader
                .read_stream(&stream, StreamVersion::INITIAL)
                .try_collect()
                .await
                .expect("read on the replica");
            assert_eq!(events.len(), 1, "the replica has the registration");
            let event = events[0]
                .decode::<CustomerEvent>()
                .expect("decodes on the replica")
                .event;
            format!("{event:?}")
        }
    };
    let before = read(reader.clone()).await;
    assert!(before.contains("Ada Lovelace"), "decrypted: {before}");

    store
        .forget_subject(&SubjectId::new("ada").expect("subject"))
        .await
        .expect("forget");
    db.wait_for_replay().await;
    let after = read(reader).await;
    assert!(
        !after.contains("Ada Lovelace") && !after.contains("ada@example.com"),
        "forgotten on the replica too: {after}"
    );
}
