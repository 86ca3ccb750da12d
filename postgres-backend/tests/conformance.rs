//! The backend conformance suite, against PostgreSQL: one fresh database per check.

factum_testkit::conformance_tests!(factum_testkit::postgres::TestStore::create);
