//! Point-in-time state on PostgreSQL: an aggregate as of a version and as of a time.

mod projection_support;

use factum::{Aggregate, Command, EventStore, Repository, StreamVersion};
use factum_postgres::PostgresStore;
use factum_testkit::postgres::TestDatabase;
use futures_util::TryStreamExt;
use projection_support::{Entry, bounded, patient_store};

struct Add(i64);

impl Command for Add {
    fn command_name(&self) -> &'static str {
        "Add"
    }
    fn aggregate_id(&self) -> String {
        "c1".to_owned()
    }
}

#[derive(Default, Debug)]
struct Sum(i64);

impl Aggregate for Sum {
    const TYPE: &'static str = "sum";
    type Command = Add;
    type Event = Entry;
    type Error = std::convert::Infallible;

    fn decide(&self, command: &Add) -> Result<Vec<Entry>, Self::Error> {
        Ok(vec![Entry { n: command.0 }])
    }

    fn evolve(&mut self, event: &Entry) {
        self.0 += event.n;
    }
}

#[tokio::test]
async fn an_aggregate_is_rebuilt_as_of_a_version_and_as_of_a_time() {
    bounded(60, async {
        let db = TestDatabase::create().await;
        let store = patient_store(&db);
        let repository = Repository::<Sum, PostgresStore>::new(store.clone());
        for n in [1, 10, 100, 1000] {
            repository.execute(Add(n)).await.expect("execute");
        }
        let at = repository
            .load_at("c1", StreamVersion::new(2))
            .await
            .expect("load_at");
        assert_eq!((at.state.0, at.version), (11, StreamVersion::new(2)));

        let stream = Repository::<Sum, PostgresStore>::stream_id("c1").expect("id");
        let recorded: Vec<_> = store
            .read_stream(&stream, StreamVersion::INITIAL)
            .try_collect()
            .await
            .expect("read");
        // Each append is its own transaction, so each event has its own recorded time.
        let third = recorded[2].recorded_at;
        assert!(recorded[3].recorded_at > third);
        let as_of = repository.load_as_of("c1", third).await.expect("as of");
        assert_eq!((as_of.state.0, as_of.version), (111, StreamVersion::new(3)));
        let before = repository
            .load_as_of(
                "c1",
                recorded[0].recorded_at - chrono::Duration::microseconds(1),
            )
            .await
            .expect("as of");
        assert_eq!(before.version, StreamVersion::INITIAL);
    })
    .await;
}
