//! The JetStream bus passes the bus conformance checks, on a shared server with JetStream (the
//! machine's, or one started from the installed binary).

factum_testkit::bus_conformance_tests!(|| async {
    let bus = factum_nats::JetStreamBus::connect(&factum_testkit::nats::shared_url())
        .await
        .expect("connect to NATS");
    (bus, ())
});
