//! A scripted operator session against a real PostgreSQL database: migrate, append through the
//! bank example, list and show streams, park and retry a dead letter, rebuild a projection with
//! progress to a non-terminal writer, and `--json` parsed back.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bank::{Account, AccountCommand, AccountEvent};
use factum::{BoxError, Envelope, Repository};
use factum_cli::{Failure, Io, Registry};
use factum_postgres::projection::{PgProjection, PgProjectionRunner, ProjectionTx};
use factum_postgres::sqlx;
use factum_postgres::{PostgresStore, SchemaName, StoreOptions};
use factum_testkit::postgres::TestDatabase;
use serde_json::Value;

/// Balances per account in `balances(account text primary key, balance bigint)`; fails on a
/// deposit of 13 cents while `poisoned` is set (a bug, fixed later).
struct Balances {
    poisoned: Arc<AtomicBool>,
}

impl PgProjection for Balances {
    const NAME: &'static str = "balances";
    const TABLES: &'static [&'static str] = &["balances"];
    type Event = AccountEvent;

    async fn apply(
        &mut self,
        tx: &mut ProjectionTx<'_>,
        event: &Envelope<AccountEvent>,
    ) -> Result<(), BoxError> {
        let delta: i64 = match &event.event {
            AccountEvent::Deposited(d)
                if d.amount == 13 && self.poisoned.load(Ordering::SeqCst) =>
            {
                return Err("poisoned deposit".into());
            }
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

struct Session {
    db: TestDatabase,
    registry: Registry,
    poisoned: Arc<AtomicBool>,
}

struct Output {
    out: String,
    err: String,
}

impl Session {
    async fn new() -> Self {
        let db = TestDatabase::create().await;
        sqlx::query("CREATE TABLE balances (account text PRIMARY KEY, balance bigint NOT NULL)")
            .execute(db.pool())
            .await
            .expect("create balances");
        let poisoned = Arc::new(AtomicBool::new(true));
        let flag = poisoned.clone();
        let registry = Registry::new().projection(move |store| {
            PgProjectionRunner::new(
                store,
                Balances {
                    poisoned: flag.clone(),
                },
            )
            .handler_retries(1, Duration::ZERO)
            .park_failures()
        });
        Self {
            db,
            registry,
            poisoned,
        }
    }

    /// Runs `factum --database-url <db> --schema bank <args>` with no terminal, answering
    /// `answers` to questions.
    async fn run_answering(
        &self,
        args: &[&str],
        interactive: bool,
        answers: &str,
    ) -> Result<Output, String> {
        let mut full = vec![
            "factum",
            "--database-url",
            self.db.url(),
            "--schema",
            "bank",
        ];
        full.extend_from_slice(args);
        let mut out = Vec::new();
        let mut err = Vec::new();
        let mut input = answers.as_bytes();
        let mut io = Io {
            out: &mut out,
            err: &mut err,
            input: &mut input,
            interactive,
        };
        let result = factum_cli::run_with(full, &self.registry, &mut io).await;
        let output = Output {
            out: String::from_utf8(out).expect("utf-8 output"),
            err: String::from_utf8(err).expect("utf-8 errors"),
        };
        match result {
            Ok(()) => Ok(output),
            Err(Failure::Command(e)) => Err(e.to_string()),
            Err(other) => Err(format!("{other:?}")),
        }
    }

    async fn run(&self, args: &[&str]) -> Output {
        match self.run_answering(args, false, "").await {
            Ok(output) => output,
            Err(e) => panic!("`factum {}` failed: {e}", args.join(" ")),
        }
    }

    async fn json(&self, args: &[&str]) -> Value {
        let mut with = args.to_vec();
        with.push("--json");
        let output = self.run(&with).await;
        serde_json::from_str(&output.out).unwrap_or_else(|e| {
            panic!("`{}` printed no JSON ({e}): {}", with.join(" "), output.out)
        })
    }

    fn store(&self) -> PostgresStore {
        self.db.store_with(
            StoreOptions::default().with_schema(SchemaName::new("bank").expect("valid")),
        )
    }

    async fn balance(&self, account: &str) -> i64 {
        sqlx::query_scalar("SELECT balance FROM balances WHERE account = $1")
            .bind(account)
            .fetch_one(self.db.pool())
            .await
            .expect("balance row")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_session_end_to_end() {
    let session = Session::new().await;

    // An empty schema: the CLI says what to do.
    let error = session
        .run_answering(&["streams", "list"], false, "")
        .await
        .err()
        .expect("an unmigrated schema is an error");
    assert!(
        error.contains("run `factum migrate apply --schema bank`"),
        "{error}"
    );

    let error = session
        .run_answering(&["health"], false, "")
        .await
        .err()
        .expect("an unmigrated schema is not healthy");
    assert_eq!(
        error,
        "schema `bank` is not up to date: run `factum migrate apply`"
    );

    // migrate apply asks first; with nobody to answer it needs --yes.
    let error = session
        .run_answering(&["migrate", "apply"], false, "")
        .await
        .err()
        .expect("no confirmation");
    assert!(error.contains("pass --yes"), "{error}");
    let applied = session.run(&["migrate", "apply", "--yes"]).await;
    let status = session.json(&["migrate", "status"]).await;
    let status = status.as_array().expect("a list");
    assert!(status.len() >= 4, "{status:?}");
    let applied_note = format!("{} migration(s) applied", status.len());
    assert!(applied.out.contains(&applied_note), "{}", applied.out);
    assert!(
        status
            .iter()
            .all(|m| m["applied_at"].is_string() && m["checksum_ok"] == true)
    );
    assert!(
        session
            .run(&["migrate", "verify"])
            .await
            .out
            .contains("checksums match")
    );

    // Append through the bank example's aggregate.
    let accounts = Repository::<Account, _>::new(session.store());
    for command in [
        AccountCommand::Open {
            account: "ada".into(),
            owner: "Ada".into(),
        },
        AccountCommand::Deposit {
            account: "ada".into(),
            amount: 100,
        },
        AccountCommand::Deposit {
            account: "ada".into(),
            amount: 13,
        },
        AccountCommand::Withdraw {
            account: "ada".into(),
            amount: 50,
        },
        AccountCommand::Open {
            account: "bob".into(),
            owner: "Bob".into(),
        },
        AccountCommand::Deposit {
            account: "bob".into(),
            amount: 7,
        },
    ] {
        accounts.execute(command).await.expect("command");
    }

    // List streams (table and JSON), show one.
    let table = session
        .run(&["streams", "list", "--category", "account"])
        .await
        .out;
    assert!(table.starts_with("stream "), "{table}");
    assert!(table.contains("account-ada  account   4"), "{table}");
    let streams = session.json(&["streams", "list"]).await;
    assert_eq!(
        streams,
        serde_json::json!([
            { "stream_id": "account-ada", "category": "account", "version": 4, "archived": false },
            { "stream_id": "account-bob", "category": "account", "version": 2, "archived": false },
        ])
    );
    let events = session.json(&["streams", "show", "account-ada"]).await;
    let events = events.as_array().expect("a list");
    assert_eq!(events.len(), 4);
    assert_eq!(events[1]["event_type"], "account.deposited");
    assert_eq!(events[1]["payload"], serde_json::json!({ "amount": 100 }));
    assert_eq!(events[1]["stream_version"], 2);
    assert!(events[1]["metadata"].is_object(), "{}", events[1]);
    let shown = session.run(&["streams", "show", "account-ada"]).await.out;
    assert!(shown.contains("#3 account.deposited v1"), "{shown}");
    assert!(shown.contains("payload:  {\"amount\":13}"), "{shown}");
    let error = session
        .run_answering(&["streams", "show", "account-nobody"], false, "")
        .await
        .err()
        .expect("no such stream");
    assert!(error.contains("has no events"), "{error}");

    // The projection parks the poisoned deposit and goes on.
    let mut runner = PgProjectionRunner::new(
        session.store(),
        Balances {
            poisoned: session.poisoned.clone(),
        },
    )
    .handler_retries(1, Duration::ZERO)
    .park_failures();
    runner.catch_up().await.expect("catch up");
    assert_eq!(session.balance("ada").await, 50);

    let consumers = session.json(&["subscriptions", "list"]).await;
    assert_eq!(consumers[0]["name"], "balances");
    assert_eq!(consumers[0]["parked"], 1);
    assert_eq!(consumers[0]["lag_events"], 0);
    assert_eq!(consumers[0]["state"], "not running");
    let projections = session.json(&["projections", "list"]).await;
    assert_eq!(projections[0]["name"], "balances");

    let parked = session.json(&["dead-letters", "list"]).await;
    let parked = parked.as_array().expect("a list");
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0]["subscription"], "balances");
    assert_eq!(parked[0]["stream_version"], 3);
    assert!(
        parked[0]["error"]
            .as_str()
            .expect("text")
            .contains("poisoned deposit")
    );
    let id = parked[0]["event_id"].as_str().expect("an id").to_owned();
    let shown = session
        .run(&["dead-letters", "show", "balances", &id])
        .await
        .out;
    assert!(
        shown.contains("poisoned deposit") && shown.contains("{\"amount\":13}"),
        "{shown}"
    );

    // Still failing: the retry reports it and the event stays parked.
    let error = session
        .run_answering(&["dead-letters", "retry", "balances", &id], false, "")
        .await
        .err()
        .expect("still poisoned");
    assert!(error.contains("poisoned deposit"), "{error}");
    assert_eq!(
        session
            .json(&["dead-letters", "list"])
            .await
            .as_array()
            .map(Vec::len),
        Some(1)
    );

    let all = session
        .json(&["dead-letters", "retry", "balances", "--all"])
        .await;
    assert_eq!(all["results"][0]["result"], "still failing", "{all}");
    assert!(
        all["results"][0]["error"]
            .as_str()
            .expect("text")
            .contains("poisoned deposit")
    );

    // After the fix, the retry applies it and removes it.
    session.poisoned.store(false, Ordering::SeqCst);
    let retried = session
        .json(&["dead-letters", "retry", "balances", &id])
        .await;
    assert_eq!(retried["applied"], true);
    assert_eq!(session.balance("ada").await, 63);
    assert_eq!(
        session.json(&["dead-letters", "list"]).await,
        serde_json::json!([])
    );

    // Rebuild: asks, then reports progress as lines to the non-terminal writer.
    let error = session
        .run_answering(&["projections", "rebuild", "balances"], false, "")
        .await
        .err()
        .expect("no confirmation");
    assert!(error.contains("pass --yes"), "{error}");
    sqlx::query("UPDATE balances SET balance = -1")
        .execute(session.db.pool())
        .await
        .expect("damage the read model");
    let rebuilt = session
        .run(&["projections", "rebuild", "balances", "--yes"])
        .await;
    let last = rebuilt.err.lines().last().expect("progress lines");
    assert!(
        last.starts_with("rebuild balances: 6/6 events (100%)"),
        "{}",
        rebuilt.err
    );
    assert!(
        rebuilt.out.contains("rebuilt `balances` up to position"),
        "{}",
        rebuilt.out
    );
    assert_eq!(session.balance("ada").await, 63);
    assert_eq!(session.balance("bob").await, 7);

    // A person at a terminal is asked; "n" changes nothing.
    let snapshot_count = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM bank.snapshots")
            .fetch_one(session.db.pool())
            .await
            .expect("count")
    };
    sqlx::query(
        "INSERT INTO bank.snapshots VALUES ('account-ada', 4, 1, '{\"balance\": 63}', now())",
    )
    .execute(session.db.pool())
    .await
    .expect("a snapshot");
    let status = session.json(&["snapshots", "status"]).await;
    assert_eq!(status[0]["category"], "account");
    assert_eq!(status[0]["count"], 1);
    let error = session
        .run_answering(&["snapshots", "purge"], true, "n\n")
        .await
        .err()
        .expect("declined");
    assert_eq!(error, "not confirmed: nothing was changed");
    assert_eq!(snapshot_count().await, 1);
    let purged = session
        .run_answering(&["snapshots", "purge", "--json"], true, "y\n")
        .await
        .expect("confirmed");
    assert!(
        purged.err.contains("delete every snapshot? [y/N]"),
        "{}",
        purged.err
    );
    assert_eq!(
        serde_json::from_str::<Value>(&purged.out).expect("json")["purged"],
        1
    );
    assert_eq!(snapshot_count().await, 0);

    // Reset a checkpoint to the start: the next catch-up applies everything again.
    let reset = session
        .json(&["subscriptions", "reset", "balances", "--to-start", "--yes"])
        .await;
    assert_eq!(reset["after"]["global"], 0);
    let consumers = session.json(&["subscriptions", "list"]).await;
    assert_eq!(consumers[0]["lag_events"], 6);

    // Partitions.
    let partitions = session.json(&["partitions", "status"]).await;
    assert_eq!(partitions[0]["name"], "events_p0");
    assert_eq!(partitions.as_array().map(Vec::len), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_flag_refuses_another_services_schema() {
    let session = Session::new().await;
    session
        .run(&["--service", "bank", "migrate", "apply", "--yes"])
        .await;
    // The owner recorded by the first migrate: the right service goes ahead.
    let health = session.json(&["--service", "bank", "health"]).await;
    assert!(health.is_object(), "{health}");
    // Another service's operator pointed at this schema is stopped, whatever the command.
    for command in [&["streams", "list"][..], &["migrate", "apply", "--yes"][..]] {
        let mut args = vec!["--service", "billing"];
        args.extend_from_slice(command);
        let error = session
            .run_answering(&args, false, "")
            .await
            .err()
            .unwrap_or_else(|| panic!("`{}` must be refused", args.join(" ")));
        assert!(
            error.contains("billing") && error.contains("bank"),
            "the error names both services: {error}"
        );
    }
}

#[tokio::test]
async fn usage_errors_say_what_to_do() {
    let registry = Registry::new();
    let mut out = Vec::new();
    let mut err = Vec::new();
    let mut input: &[u8] = b"";
    let mut io = Io {
        out: &mut out,
        err: &mut err,
        input: &mut input,
        interactive: false,
    };
    let bad_schema = factum_cli::run_with(
        [
            "factum",
            "--database-url",
            "postgres://127.0.0.1:1/x",
            "--schema",
            "Bad",
            "health",
        ],
        &registry,
        &mut io,
    )
    .await;
    match bad_schema {
        Err(Failure::Command(e)) => assert!(
            e.to_string().contains("schema name \"Bad\" is invalid"),
            "{e}"
        ),
        other => panic!("expected a command error, got {other:?}"),
    }
    let unreachable = factum_cli::run_with(
        [
            "factum",
            "--database-url",
            "postgres://postgres@127.0.0.1:1/x",
            "health",
        ],
        &registry,
        &mut io,
    )
    .await;
    match unreachable {
        Err(Failure::Command(e)) => {
            let e = e.to_string();
            assert!(e.starts_with("cannot connect to the database"), "{e}");
            assert!(e.contains("check --database-url / DATABASE_URL"), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
        other => panic!("expected a command error, got {other:?}"),
    }
    let usage = factum_cli::run_with(["factum", "streams", "frobnicate"], &registry, &mut io).await;
    assert!(matches!(usage, Err(Failure::Usage(_))), "{usage:?}");
}
