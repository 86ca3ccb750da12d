//! The services' health endpoints over real HTTP: they follow the inbound consumer and the
//! bus's circuit breaker as those change.

use std::net::SocketAddr;
use std::time::Duration;

use factum::bus::{
    Bus, ConsumerConfig, InMemoryInbox, InProcessBus, InboundConsumer, InboundState, ServiceName,
    StreamConfig,
};
use factum::resilience::{CircuitBreakerConfig, Operation, Resilience};
use factum::subscription::EventHandler;
use factum::{BoxError, RecordedEvent};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

struct Ignore;

impl EventHandler for Ignore {
    async fn handle(&mut self, _event: &RecordedEvent) -> Result<(), BoxError> {
        Ok(())
    }
}

/// `GET path` on a fresh connection: the status code, the content type and the JSON body.
async fn get(address: SocketAddr, path: &str) -> (u16, String, serde_json::Value) {
    let mut stream = TcpStream::connect(address).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    let (head, body) = response.split_once("\r\n\r\n").expect("a head and a body");
    let status = head[9..12].parse().expect("a status code");
    let content_type = head
        .lines()
        .find_map(|line| line.strip_prefix("content-type: "))
        .unwrap_or_default()
        .to_owned();
    (
        status,
        content_type,
        serde_json::from_str(body).expect("a JSON body"),
    )
}

fn check<'a>(body: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    body["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name} in {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_endpoints_follow_the_consumer_and_the_breaker() {
    let bank = ServiceName::new("bank").expect("name");
    let bus = InProcessBus::new();
    bus.ensure_stream(&StreamConfig::for_service(&bank))
        .await
        .expect("stream");
    let mut consumer = InboundConsumer::new(
        bus.clone(),
        InMemoryInbox::new(),
        ConsumerConfig::new("BANK", "statements").filter_subject("bank.account.>"),
    );
    let mut status = consumer.status();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(async move {
        consumer
            .run(Ignore, async {
                let _ = stopped.await;
            })
            .await
    });
    status
        .wait_for(|s| s.state == InboundState::Running)
        .await
        .expect("running");

    let broker = Resilience::new("bus").with_breaker_config(CircuitBreakerConfig {
        consecutive_failures: 1,
        cool_down: Duration::from_secs(600),
        ..CircuitBreakerConfig::default()
    });
    let probes = services::Probes {
        circuits: vec![broker.clone()],
        relay: None,
        inbound: vec![("statements".into(), status.clone())],
        max_lag: (Duration::from_secs(30), 1_000),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let server = tokio::spawn(async move {
        axum::serve(listener, services::router(probes))
            .await
            .expect("serve");
    });

    let (code, content_type, body) = get(address, "/health/ready").await;
    assert_eq!((code, body["ready"].as_bool()), (200, Some(true)), "{body}");
    assert_eq!(content_type, "application/json");
    assert_eq!(check(&body, "inbound statements")["ok"], true);
    let (code, _, body) = get(address, "/health/live").await;
    assert_eq!((code, body["live"].as_bool()), (200, Some(true)), "{body}");

    // The broker fails once: the breaker opens, the service is not ready, and still alive.
    let _ = broker
        .run(Operation::BrokerPublish, || async {
            Err::<(), _>(factum::Error::transient("publish", "connection reset"))
        })
        .await;
    let (code, _, body) = get(address, "/health/ready").await;
    assert_eq!(code, 503, "{body}");
    let circuit = check(&body, "circuit bus");
    assert_eq!(circuit["ok"], false);
    assert!(
        circuit["detail"].as_str().unwrap_or("").starts_with("open"),
        "{circuit}"
    );
    assert_eq!(get(address, "/health/live").await.0, 200);

    // The consumer stops: it will not resume by itself, so the instance is not alive.
    stop.send(()).expect("stop");
    running.await.expect("join").expect("run");
    let (code, _, body) = get(address, "/health/live").await;
    assert_eq!((code, body["live"].as_bool()), (503, Some(false)), "{body}");
    assert_eq!(check(&body, "inbound statements")["detail"], "stopped");
    server.abort();
}
