//! The conformance suite against the in-memory backend.

factum_testkit::conformance_tests!(|| async { factum::InMemoryStore::new() });

factum_testkit::consumer_conformance_tests!(|| async { (factum::InMemoryStore::new(), ()) });
