//! factum's metrics in Prometheus' text format: a recorder from `metrics-exporter-prometheus`
//! installed, a few bank commands run, and the scrape printed (what `GET /metrics` would serve).
//!
//! `cargo run -p bank --example prometheus`

#![allow(
    clippy::print_stdout,
    reason = "an example program: its output is the point"
)]

use bank::{Account, AccountCommand};
use factum::{InMemoryStore, Repository};
use metrics_exporter_prometheus::PrometheusBuilder;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // In a service: `.with_http_listener(...)` (feature `http-listener`) serves this on a port.
    let prometheus = PrometheusBuilder::new().install_recorder()?;
    factum::telemetry::describe_metrics();

    let accounts = Repository::<Account, _>::new(InMemoryStore::new()).with_cache(100);
    let account = || "ada".to_string();
    accounts
        .execute(AccountCommand::Open {
            account: account(),
            owner: "Ada".into(),
        })
        .await?;
    accounts
        .execute(AccountCommand::Deposit {
            account: account(),
            amount: 100,
        })
        .await?;
    // Rejected: the balance is 100.
    let _ = accounts
        .execute(AccountCommand::Withdraw {
            account: account(),
            amount: 500,
        })
        .await;

    let scrape = prometheus.render();
    print!("{scrape}");
    assert!(scrape.contains(r#"factum_commands_total{aggregate="account",outcome="executed"} 2"#));
    assert!(scrape.contains(r#"factum_commands_total{aggregate="account",outcome="rejected"} 1"#));
    Ok(())
}
