//! Two services, each with its own store, cooperating only through events on the bus:
//!
//! * **bank** keeps accounts (the bank example) and publishes its account events through its
//!   relay;
//! * **statements** receives them through an inbound consumer and keeps a monthly statement line
//!   per deposit, each message handled once through its inbox.
//!
//! Runs on the in-memory stores and the in-process bus: `cargo run -p services`. The same code
//! runs on PostgreSQL (`PostgresStore`, `PgInbox`) and NATS JetStream (`factum_nats::JetStreamBus`);
//! see the book's chapter on the event bus.
//!
//! At the end it prints what the services' health endpoints serve; `-- --serve 127.0.0.1:8080`
//! then keeps serving them (`/health/ready`, `/health/live`).

#![allow(clippy::print_stdout)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bank::{Account, AccountCommand, AccountEvent};
use factum::bus::{
    Bus, ConsumerConfig, InMemoryInbox, InProcessBus, InboundConsumer, PublicEvents, Relay,
    ServiceName, StreamConfig,
};
use factum::resilience::Resilience;
use factum::subscription::{EventHandler, Subscription};
use factum::{BoxError, InMemoryStore, RecordedEvent, Repository};

/// The statements service's read model: one line per deposit, in arrival order.
#[derive(Clone, Default)]
struct Statements {
    lines: Arc<Mutex<Vec<String>>>,
}

impl EventHandler for Statements {
    async fn handle(&mut self, event: &RecordedEvent) -> Result<(), BoxError> {
        // The bank's event, decoded into this service's view of the contract.
        let envelope = event.decode::<AccountEvent>()?;
        if let AccountEvent::Deposited(deposit) = &envelope.event {
            let line = format!(
                "{}: +{} (bank event {}, workflow {})",
                event.stream_id,
                deposit.amount,
                event.event_id,
                envelope
                    .metadata
                    .correlation_id
                    .map(|c| c.to_string())
                    .unwrap_or_default()
            );
            println!("  statements ← {line}");
            self.lines.lock().expect("lock").push(line);
        }
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let bank = ServiceName::new("bank")?;
    let bus = InProcessBus::new();
    // No duplicate window on this stream, so that the inbox is what drops repeats below (a
    // broker drops those within its window itself).
    bus.ensure_stream(&StreamConfig::for_service(&bank).duplicate_window(Duration::ZERO))
        .await?;

    // The bank service: its own store; commands as usual.
    let bank_store = InMemoryStore::new();
    let accounts = Repository::<Account, _>::new(bank_store.clone());
    println!("bank: opening an account and depositing twice");
    accounts
        .execute(AccountCommand::Open {
            account: "ada".into(),
            owner: "Ada".into(),
        })
        .await?;
    accounts
        .execute(AccountCommand::Deposit {
            account: "ada".into(),
            amount: 100,
        })
        .await?;
    accounts
        .execute(AccountCommand::Deposit {
            account: "ada".into(),
            amount: 250,
        })
        .await?;

    // Its relay: a subscription of its log publishing the public events.
    let routes = PublicEvents::new(bank.clone()).publish_event::<AccountEvent>("account")?;
    let broker = Resilience::new("bus");
    let mut relay = Relay::new(bus.clone(), routes).with_resilience(broker.clone());
    let mut subscription =
        Subscription::new(relay.name(), bank_store.clone()).filter(relay.filter());
    subscription.catch_up(&mut relay).await?;
    println!(
        "bank: relay published {} events",
        relay.status().borrow().published
    );

    // The statements service: its own inbox, a durable consumer of the bank's account events.
    let statements = Statements::default();
    let mut consumer = InboundConsumer::new(
        bus.clone(),
        InMemoryInbox::new(),
        ConsumerConfig::new("BANK", "statements-from-bank").filter_subject("bank.account.>"),
    );
    let mut status = consumer.status();
    let done = async move {
        let _ = status.wait_for(|s| s.handled == 3).await;
    };
    consumer.run(statements.clone(), done).await?;

    // The relay rewound publishes everything again: the inbox drops the repeats.
    subscription = subscription.start_from(factum::subscription::StartFrom::Beginning);
    subscription.catch_up(&mut relay).await?;
    let mut status = consumer.status();
    let done = async move {
        let _ = status.wait_for(|s| s.duplicates == 3).await;
    };
    tokio::time::timeout(
        Duration::from_secs(5),
        consumer.run(statements.clone(), done),
    )
    .await??;
    let final_status = consumer.status().borrow().clone();
    println!(
        "statements: {} handled, {} repeats dropped by the inbox, {} lines",
        final_status.handled,
        final_status.duplicates,
        statements.lines.lock().expect("lock").len()
    );
    assert_eq!(
        statements.lines.lock().expect("lock").len(),
        2,
        "each deposit once"
    );

    // The statements service keeps consuming, as a deployed service does; what its health
    // endpoints and the bank's serve (`services::router`):
    let mut inbound = consumer.status();
    let inbound_status = inbound.clone();
    let consuming =
        tokio::spawn(async move { consumer.run(statements, std::future::pending::<()>()).await });
    inbound
        .wait_for(|s| s.state == factum::bus::InboundState::Running)
        .await?;
    let probes = services::Probes {
        circuits: vec![broker],
        relay: Some((relay.status(), subscription.status())),
        inbound: vec![("statements".into(), inbound_status)],
        max_lag: (Duration::from_secs(30), 1_000),
    };
    let ready = probes.readiness();
    println!("health: ready = {}", ready.is_ready());
    for check in ready.checks() {
        let ok = if check.ok { "ok  " } else { "FAIL" };
        println!("  {ok} {}: {}", check.name, check.detail);
    }
    println!("health: live = {}", probes.liveness().is_live());
    if let Some(address) = std::env::args().skip_while(|a| a != "--serve").nth(1) {
        let listener = tokio::net::TcpListener::bind(&address).await?;
        println!("serving /health/ready and /health/live on http://{address} (Ctrl-C stops)");
        axum::serve(listener, services::router(probes)).await?;
    }
    consuming.abort();
    Ok(())
}
