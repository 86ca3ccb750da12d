//! Registers a customer, forgets them, and shows what is left: on the in-memory backend, with
//! in-memory keys (no database needed).

use customers::{Customer, CustomerCommand};
use factum::personal::{InMemoryKeyStore, Shredder, SubjectId};
use factum::{InMemoryStore, Repository};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let shredder = Shredder::new(InMemoryKeyStore::new());
    let store = InMemoryStore::new().with_shredder(shredder.clone());
    let customers = Repository::<Customer, _>::new(store.clone())
        .with_cache(1_000)
        .with_shredder(shredder);

    customers
        .execute(CustomerCommand::Register {
            customer_id: "c-7".into(),
            name: "Ada Lovelace".into(),
            email: "ada@example.com".into(),
            plan: "gold".into(),
        })
        .await?;
    let before = customers.load("c-7").await?.state;
    println!(
        "before: {} <{}> on {}",
        before.name, before.email, before.plan
    );

    store.forget_subject(&SubjectId::new("c-7")?).await?;
    let after = customers.load("c-7").await?.state;
    println!("after:  {} <{}> on {}", after.name, after.email, after.plan);
    assert_eq!(after.name, factum::personal::PLACEHOLDER);
    assert_eq!(after.plan, "gold");
    Ok(())
}
