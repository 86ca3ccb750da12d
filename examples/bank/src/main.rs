//! A bank account, run end to end on the in-memory backend:
//! `cargo run -p bank`.

#![allow(
    clippy::print_stdout,
    reason = "an example program: its output is the point"
)]

use bank::{Account, AccountCommand};
use factum::{CommandError, InMemoryStore, Repository};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let store = InMemoryStore::new();
    let accounts = Repository::<Account, _>::new(store.clone());
    let account = "ada-001".to_string();

    let steps = [
        AccountCommand::Open {
            account: account.clone(),
            owner: "Ada Lovelace".into(),
        },
        AccountCommand::Deposit {
            account: account.clone(),
            amount: 10_000,
        },
        AccountCommand::Withdraw {
            account: account.clone(),
            amount: 2_500,
        },
        // Rejected: the balance is 7 500 cents.
        AccountCommand::Withdraw {
            account: account.clone(),
            amount: 9_000,
        },
        // Rejected: money is left.
        AccountCommand::Close {
            account: account.clone(),
        },
        AccountCommand::Withdraw {
            account: account.clone(),
            amount: 7_500,
        },
        AccountCommand::Close {
            account: account.clone(),
        },
        // Rejected: a closed account rejects everything.
        AccountCommand::Deposit {
            account: account.clone(),
            amount: 100,
        },
    ];

    for command in steps {
        let shown = format!("{command:?}");
        match accounts.execute(command).await {
            Ok(done) => println!(
                "ok       {shown}\n         -> {:?}; balance {} cents, version {}",
                done.events, done.state.balance, done.version
            ),
            Err(CommandError::Rejected(reason)) => {
                println!("rejected {shown}\n         -> {reason}")
            }
            Err(other) => return Err(other.into()),
        }
    }

    let account = accounts.load(&account).await?;
    println!(
        "\n{} holds {} cents and is {}; {} events stored in {}",
        account.state.owner,
        account.state.balance,
        if account.state.closed {
            "closed"
        } else {
            "open"
        },
        store.len(),
        account.stream_id,
    );
    Ok(())
}
