//! The in-process bus passes the bus conformance checks.

factum_testkit::bus_conformance_tests!(|| async { (factum::bus::InProcessBus::new(), ()) });
