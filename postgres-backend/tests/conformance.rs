//! The backend conformance suite, against PostgreSQL: one fresh database per check.

factum_testkit::conformance_tests!(factum_testkit::postgres::TestStore::create);

factum_testkit::consumer_conformance_tests!(|| async {
    let test = factum_testkit::postgres::TestStore::create().await;
    ((*test).clone(), test)
});
