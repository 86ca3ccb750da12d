//! Service isolation: a store opened for one service refuses another service's schema, and a
//! service's role (from `ServiceRole`) can neither read nor write another service's tables —
//! with a database per service, and with two services in one database.

use factum::bus::ServiceName;
use factum::{AppendRequest, EventId, EventStore, ExpectedVersion, NewEvent, RawValue, StreamId};
use factum_postgres::{PostgresStore, SchemaName, ServiceRole, StoreOptions};
use factum_testkit::postgres::TestDatabase;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn event() -> NewEvent {
    NewEvent {
        event_id: EventId::new(),
        event_type: "thing.happened".into(),
        schema_version: 1,
        payload: RawValue::from_string("{}".into()).expect("json"),
        metadata: Default::default(),
    }
}

fn service(name: &str) -> ServiceName {
    ServiceName::new(name).expect("valid")
}

/// A role name unique to this run (roles are cluster-wide).
fn role(base: &str) -> String {
    let id = EventId::new().as_uuid().simple().to_string();
    format!("{base}_{}", &id[id.len() - 10..])
}

async fn drop_role(admin: &sqlx::PgPool, role: &str) {
    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP OWNED BY \"{role}\" CASCADE; DROP ROLE IF EXISTS \"{role}\""
    )))
    .execute(admin)
    .await;
}

async fn pool_as(db: &TestDatabase, role: &str) -> sqlx::PgPool {
    let options: PgConnectOptions = db.url().parse().expect("url");
    PgPoolOptions::new()
        .max_connections(2)
        .connect_with(options.username(role))
        .await
        .expect("connect as the service's role")
}

#[test]
fn a_store_opened_for_one_service_refuses_another_services_schema() {
    runtime().block_on(async {
        let db = TestDatabase::create().await;
        let orders = db.store_with(StoreOptions::default().for_service(service("orders")));
        orders.migrate().await.expect("migrate claims the schema");
        assert_eq!(
            orders.service_owner().await.expect("owner").as_deref(),
            Some("orders")
        );
        orders
            .append(AppendRequest::new(StreamId::new("order-1").unwrap(), vec![event()]))
            .await
            .expect("the owner appends");

        // Billing pointed at the orders schema by mistake: every way in is refused.
        let options = StoreOptions::default().for_service(service("billing"));
        let err = PostgresStore::connect_with(db.url(), &Default::default(), options.clone())
            .await
            .unwrap_err();
        assert!(
            matches!(&err, factum::Error::WrongService { expected, owner, .. } if expected == "billing" && owner == "orders"),
            "{err}"
        );
        assert!(err.to_string().contains("belongs to service `orders`"), "{err}");
        let billing = db.store_with(options);
        let err = billing.migrate().await.unwrap_err();
        assert!(matches!(err, factum::Error::WrongService { .. }), "{err}");
        let err = billing
            .append(AppendRequest::new(StreamId::new("invoice-1").unwrap(), vec![event()]))
            .await
            .unwrap_err();
        assert!(matches!(err, factum::Error::WrongService { .. }), "{err}");
        let mut conn = db.pool().acquire().await.expect("conn");
        let err = billing
            .append_in(
                &mut conn,
                AppendRequest::new(StreamId::new("invoice-1").unwrap(), vec![event()]),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, factum::Error::WrongService { .. }), "{err}");
        assert_eq!(
            orders
                .stream_version(&StreamId::new("invoice-1").unwrap())
                .await
                .expect("version")
                .get(),
            0,
            "nothing was written"
        );
        assert!(billing.health().await.is_err(), "health says so too");

        // A store opened for no service (an operator's tool) still works on it.
        db.store()
            .append(
                AppendRequest::new(StreamId::new("order-1").unwrap(), vec![event()])
                    .expected_version(ExpectedVersion::Exact(factum::StreamVersion::new(1))),
            )
            .await
            .expect("an operator's store");
    });
}

#[test]
fn a_services_role_cannot_reach_another_services_database() {
    runtime().block_on(async {
        let orders_db = TestDatabase::create().await;
        let billing_db = TestDatabase::create().await;
        let (orders_role, billing_role) = (role("orders"), role("billing"));
        // The test databases are migrated in `factum` by the administrator: give each service a
        // schema of its own, as a deployment would.
        let schema = SchemaName::new("svc").expect("schema");
        ServiceRole::new(&orders_role, orders_db.name(), schema.clone())
            .apply(orders_db.pool())
            .await
            .expect("orders role");
        ServiceRole::new(&billing_role, billing_db.name(), schema.clone())
            .apply(billing_db.pool())
            .await
            .expect("billing role");

        let orders_pool = pool_as(&orders_db, &orders_role).await;
        let orders = PostgresStore::with_options(
            orders_pool.clone(),
            StoreOptions::default()
                .with_schema(schema.clone())
                .for_service(service("orders")),
        );
        orders
            .migrate()
            .await
            .expect("the role migrates its own schema");
        orders
            .append(AppendRequest::new(
                StreamId::new("order-1").unwrap(),
                vec![event()],
            ))
            .await
            .expect("and appends to it");

        // The orders role cannot even connect to the billing database.
        let options: PgConnectOptions = billing_db.url().parse().expect("url");
        let err = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(options.username(&orders_role))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("permission denied"), "{err}");

        let admin = orders_db.pool().clone();
        drop((orders, orders_pool));
        drop_role(&admin, &orders_role).await;
        drop_role(billing_db.pool(), &billing_role).await;
    });
}

#[test]
fn two_services_in_one_database_cannot_read_or_write_each_others_tables() {
    runtime().block_on(async {
        let db = TestDatabase::create().await;
        let (orders_role, billing_role) = (role("orders"), role("billing"));
        let (orders_schema, billing_schema) = (
            SchemaName::new("orders").expect("schema"),
            SchemaName::new("billing").expect("schema"),
        );
        ServiceRole::new(&orders_role, db.name(), orders_schema.clone())
            .apply(db.pool())
            .await
            .expect("orders role");
        ServiceRole::new(&billing_role, db.name(), billing_schema.clone())
            .apply(db.pool())
            .await
            .expect("billing role");

        let orders_pool = pool_as(&db, &orders_role).await;
        let billing_pool = pool_as(&db, &billing_role).await;
        let orders = PostgresStore::with_options(
            orders_pool.clone(),
            StoreOptions::default()
                .with_schema(orders_schema.clone())
                .for_service(service("orders")),
        );
        let billing = PostgresStore::with_options(
            billing_pool.clone(),
            StoreOptions::default()
                .with_schema(billing_schema.clone())
                .for_service(service("billing")),
        );
        orders.migrate().await.expect("orders migrates its schema");
        billing
            .migrate()
            .await
            .expect("billing migrates its schema");
        orders
            .append(AppendRequest::new(
                StreamId::new("order-1").unwrap(),
                vec![event()],
            ))
            .await
            .expect("orders appends");

        // Billing's role on orders' tables: no read, no write, whatever the SQL.
        for sql in [
            "SELECT count(*) FROM orders.events",
            "SELECT * FROM orders.streams",
            "INSERT INTO orders.streams (stream_id, version) VALUES ('x-1', 0)",
            "DELETE FROM orders.inbox",
        ] {
            let err = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&billing_pool)
                .await
                .unwrap_err();
            assert!(
                err.to_string().contains("permission denied"),
                "{sql}: {err}"
            );
        }
        // Nor through factum: a billing-role store pointed at the orders schema.
        let wrong = PostgresStore::with_options(
            billing_pool.clone(),
            StoreOptions::default().with_schema(orders_schema.clone()),
        );
        let err = wrong
            .append(AppendRequest::new(
                StreamId::new("order-2").unwrap(),
                vec![event()],
            ))
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("permission denied")
                || format!("{err:?}").contains("permission denied"),
            "{err:?}"
        );
        assert_eq!(
            orders
                .stream_version(&StreamId::new("order-2").unwrap())
                .await
                .expect("version")
                .get(),
            0
        );

        drop((orders, billing, wrong, orders_pool, billing_pool));
        drop_role(db.pool(), &orders_role).await;
        drop_role(db.pool(), &billing_role).await;
    });
}
