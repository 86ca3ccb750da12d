//! An application's admin binary: every `factum` command, plus the commands that run the
//! application's projections (`projections rebuild balances`, `dead-letters retry balances ID`),
//! and a command of its own (`seed N`: N deposits through the bank example's aggregate).
//!
//! ```text
//! export DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres
//! cargo run -p factum-cli --example bank_admin -- seed 100000
//! cargo run -p factum-cli --example bank_admin -- projections rebuild balances
//! ```

use std::process::ExitCode;

use bank::{Account, AccountCommand, AccountEvent};
use factum::{BoxError, Envelope, Repository};
use factum_cli::Registry;
use factum_postgres::PostgresStore;
use factum_postgres::projection::{PgProjection, PgProjectionRunner, ProjectionTx};
use factum_postgres::sqlx;

/// Balances per account, in `balances(account text primary key, balance bigint)`.
struct Balances;

impl PgProjection for Balances {
    const NAME: &'static str = "balances";
    const TABLES: &'static [&'static str] = &["balances"];
    type Event = AccountEvent;

    async fn apply(
        &mut self,
        tx: &mut ProjectionTx<'_>,
        event: &Envelope<AccountEvent>,
    ) -> Result<(), BoxError> {
        let delta = match &event.event {
            AccountEvent::Deposited(d) => i64::try_from(d.amount)?,
            AccountEvent::Withdrawn(w) => -i64::try_from(w.amount)?,
            AccountEvent::Opened(_) | AccountEvent::Closed(_) => 0,
        };
        let sql = format!(
            "INSERT INTO {0} AS b (account, balance) VALUES ($1, $2) \
             ON CONFLICT (account) DO UPDATE SET balance = b.balance + $2",
            tx.table("balances")
        );
        sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
            .bind(event.stream_id.aggregate_id())
            .bind(delta)
            .execute(tx.conn())
            .await?;
        Ok(())
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("seed") {
        let count = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(10_000);
        return match tokio::runtime::Runtime::new()
            .map_err(BoxError::from)
            .and_then(|rt| rt.block_on(seed(count)))
        {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let registry = Registry::new().projection(|store| PgProjectionRunner::new(store, Balances));
    factum_cli::run_main(args, &registry)
}

/// Migrates, creates the read model's table, and deposits `count` times into 100 accounts.
async fn seed(count: u64) -> Result<(), BoxError> {
    let url = std::env::var("DATABASE_URL").map_err(|_| "set DATABASE_URL")?;
    let store = PostgresStore::connect(&url).await?;
    store.migrate().await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS balances (account text PRIMARY KEY, balance bigint NOT NULL)",
    )
    .execute(store.pool())
    .await?;
    let accounts = Repository::<Account, _>::new(store);
    for i in 0..100 {
        let account = format!("seed{i}");
        // Already open from an earlier seed: fine.
        let _ = accounts
            .execute(AccountCommand::Open {
                account,
                owner: format!("owner {i}"),
            })
            .await;
    }
    for i in 0..count {
        accounts
            .execute(AccountCommand::Deposit {
                account: format!("seed{}", i % 100),
                amount: 1,
            })
            .await?;
    }
    println!("seeded {count} deposits");
    Ok(())
}
