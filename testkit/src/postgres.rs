//! A throwaway PostgreSQL database per test, with the project's migrations applied.
//!
//! ```no_run
//! use factum_testkit::postgres::TestDatabase;
//!
//! # async fn test() {
//! let db = TestDatabase::create().await; // a fresh database, migrated, dropped on drop
//! let store = db.store();
//! # let _ = store;
//! # }
//! ```
//!
//! Where the server comes from:
//! * `DATABASE_URL`, when set: an admin URL (a role that may `CREATE DATABASE`), e.g.
//!   `postgres://postgres@127.0.0.1:5432/postgres`. Each test gets its own database on it.
//! * otherwise a throwaway cluster, started once per test process with the machine's `initdb`
//!   and `pg_ctl` (found through `FACTUM_PG_BIN_DIR`, `PATH`, or `/usr/lib/postgresql/*/bin`) in
//!   a temporary directory on a free port — under the `postgres` account when running as root.
//!   A watchdog stops it when the process exits, and the next run removes any cluster whose
//!   process is gone.
//!
//! Databases are named `factum_test_{pid}_{n}`; each is dropped when its [`TestDatabase`] is
//! dropped, and databases left behind by processes that no longer exist (a crashed or killed
//! test run) are dropped by the next run.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use factum_postgres::{PostgresStore, SchemaName, StoreOptions};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};
use tokio::sync::OnceCell;

pub mod replica;

const NOT_INSTALLED: &str = "install PostgreSQL (apt-get install -y postgresql) or set DATABASE_URL to a server where the user may CREATE DATABASE";

/// The admin URL of the server every test database is created on (or why there is none).
static SERVER: OnceCell<Result<String, String>> = OnceCell::const_new();
static NEXT: AtomicU64 = AtomicU64::new(0);

/// How long the [`TestDatabase::patient_store`]'s `read_all` waits for transactions that were in
/// flight when it was called (10 s).
pub const PATIENT_READ_SETTLE: Duration = Duration::from_secs(10);

/// A freshly created, migrated database that is dropped when this value is dropped.
pub struct TestDatabase {
    pool: PgPool,
    name: String,
    url: String,
    admin_url: String,
}

impl std::fmt::Debug for TestDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestDatabase")
            .field("name", &self.name)
            .finish()
    }
}

impl TestDatabase {
    /// Creates a database with the store's migrations applied in the default schema (`factum`).
    ///
    /// # Panics
    /// When no server can be reached or started, with a message saying what to install or set.
    pub async fn create() -> Self {
        match Self::try_create().await {
            Ok(db) => db,
            Err(e) => panic!("cannot create a PostgreSQL test database: {e}"),
        }
    }

    /// Like [`create`](Self::create), returning the reason instead of panicking.
    pub async fn try_create() -> Result<Self, String> {
        let admin_url = SERVER
            .get_or_init(|| async { server().await })
            .await
            .clone()?;
        let name = format!(
            "factum_test_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let admin: PgConnectOptions = admin_url
            .parse()
            .map_err(|e| format!("DATABASE_URL is not a PostgreSQL URL: {e}"))?;
        let mut conn = admin
            .clone()
            .connect()
            .await
            .map_err(|e| format!("cannot connect to {admin_url}: {e}; {NOT_INSTALLED}"))?;
        // The name is ours (digits and `_`): nothing to escape.
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut conn)
            .await
            .map_err(|e| format!("cannot create database {name}: {e}"))?;
        let _ = conn.close().await;
        let options = admin.database(&name);
        let url = options.to_url_lossy().to_string();
        // No ping before each statement, as `factum_postgres::PoolConfig` builds pools.
        let pool = PgPoolOptions::new()
            .max_connections(24)
            .acquire_timeout(Duration::from_secs(30))
            .test_before_acquire(false)
            .connect_with(options)
            .await
            .map_err(|e| format!("cannot connect to test database {name}: {e}"))?;
        let db = TestDatabase {
            pool,
            name,
            url,
            admin_url,
        };
        factum_postgres::migrate(&db.pool, &SchemaName::default())
            .await
            .map_err(|e| format!("migrating {} failed: {e}", db.name))?;
        Ok(db)
    }

    /// A pool on this database.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// This database's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// This database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A store on this database's pool, in the migrated default schema.
    pub fn store(&self) -> PostgresStore {
        PostgresStore::new(self.pool.clone())
    }

    /// A store on this database's pool, in the migrated default schema, whose
    /// [`read_all`](factum::EventStore::read_all) waits up to [`PATIENT_READ_SETTLE`] for the
    /// transactions in flight when it was called.
    ///
    /// The gap-safe horizon is cluster-wide: on a loaded machine, other tests' transactions can
    /// hold it back longer than the default 250 ms, so a test that appends and then reads the
    /// global log (read-your-writes) should use this store. Waiting longer changes no result,
    /// only how long a read may wait; a test that reads while it holds a transaction open on
    /// purpose should not use it (each such read would wait the whole timeout).
    pub fn patient_store(&self) -> PostgresStore {
        self.store_with(StoreOptions::default().with_read_settle_timeout(PATIENT_READ_SETTLE))
    }

    /// A store on this database's pool with `options` (its schema must be migrated first, e.g.
    /// with [`PostgresStore::migrate`]).
    pub fn store_with(&self, options: StoreOptions) -> PostgresStore {
        PostgresStore::with_options(self.pool.clone(), options)
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = std::mem::take(&mut self.name);
        // Drop runs inside the test's runtime, which must not be blocked on: a short-lived thread
        // with its own runtime drops the database (FORCE ends this pool's connections).
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async move { drop_database(&admin_url, &name).await.ok() })
        })
        .join();
        if !matches!(dropped, Ok(Some(()))) {
            // Not fatal: the next run drops databases of dead processes.
            eprintln!("factum-testkit: could not drop a test database; the next run will");
        }
    }
}

async fn drop_database(admin_url: &str, name: &str) -> Result<(), sqlx::Error> {
    let mut conn = PgConnection::connect(admin_url).await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
    )))
    .execute(&mut conn)
    .await?;
    conn.close().await
}

/// Finds or starts the server, then drops databases left by dead test processes.
async fn server() -> Result<String, String> {
    let url = match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => tokio::task::spawn_blocking(start_cluster)
            .await
            .map_err(|e| format!("starting PostgreSQL panicked: {e}"))??,
    };
    if let Ok(mut conn) = PgConnection::connect(&url).await {
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT datname FROM pg_database WHERE datname LIKE 'factum\\_test\\_%'",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap_or_default();
        for name in names.into_iter().filter(|n| owner_is_gone(n)) {
            let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
            )))
            .execute(&mut conn)
            .await;
        }
        let _ = conn.close().await;
    }
    Ok(url)
}

/// True for `factum_test_{pid}_{n}` when process `pid` no longer exists on this machine.
fn owner_is_gone(name: &str) -> bool {
    let pid = name
        .strip_prefix("factum_test_")
        .and_then(|rest| rest.split('_').next())
        .and_then(|pid| pid.parse::<u32>().ok());
    match pid {
        Some(pid) => {
            pid != std::process::id()
                && Path::new("/proc/self").exists()
                && !Path::new(&format!("/proc/{pid}")).exists()
        }
        None => false,
    }
}

pub(crate) fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The directory holding `initdb` and `pg_ctl`.
fn find_bin_dir() -> Result<PathBuf, String> {
    let has_tools = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Some(dir) = std::env::var_os("FACTUM_PG_BIN_DIR") {
        let dir = PathBuf::from(dir);
        return if has_tools(&dir) {
            Ok(dir)
        } else {
            Err(format!(
                "FACTUM_PG_BIN_DIR={} has no initdb/pg_ctl; {NOT_INSTALLED}",
                dir.display()
            ))
        };
    }
    if let Some(path) = std::env::var_os("PATH")
        && let Some(dir) = std::env::split_paths(&path).find(|d| has_tools(d))
    {
        return Ok(dir);
    }
    // Debian/Ubuntu keep the server binaries off PATH; take the newest version.
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let dir = e.path().join("bin");
            has_tools(&dir).then_some((version, dir))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, dir)| dir).ok_or_else(|| {
        format!(
            "DATABASE_URL is not set and no PostgreSQL server binaries (initdb, pg_ctl) were found on PATH or in /usr/lib/postgresql/*/bin; {NOT_INSTALLED}"
        )
    })
}

/// A command run as the `postgres` account when we are root (PostgreSQL refuses root).
pub(crate) fn pg_command(program: &Path, as_postgres: bool) -> Command {
    if as_postgres {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

pub(crate) fn run(mut command: Command, what: &str) -> Result<(), String> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{what}: cannot run {command:?}: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

const CLUSTER_PREFIX: &str = "factum-testkit-pg-";

/// Stops and removes clusters whose test process is gone (killed before its watchdog ran).
fn remove_stale_clusters(bin: &Path, as_postgres: bool) {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(CLUSTER_PREFIX))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let mut stop = pg_command(&bin.join("pg_ctl"), as_postgres);
        stop.arg("-D")
            .arg(entry.path().join("data"))
            .args(["-m", "immediate", "stop"]);
        let _ = run(stop, "stopping a stale test cluster");
        let _ = std::fs::remove_dir_all(entry.path());
    }
}

pub(crate) fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("cannot find a free port: {e}"))
}

/// Starts a throwaway cluster for this process and returns its admin URL.
fn start_cluster() -> Result<String, String> {
    let bin = find_bin_dir()?;
    let as_postgres = is_root();
    if as_postgres
        && !Command::new("id")
            .args(["-u", "postgres"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    {
        return Err(format!(
            "running as root, PostgreSQL must run under a `postgres` account and there is none; {NOT_INSTALLED}"
        ));
    }
    remove_stale_clusters(&bin, as_postgres);

    let pid = std::process::id();
    let dir = std::env::temp_dir().join(format!("{CLUSTER_PREFIX}{pid}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    if as_postgres {
        let mut chown = Command::new("chown");
        chown.args(["postgres:postgres"]).arg(&dir);
        run(chown, "chown of the test cluster directory")?;
    }
    let data = dir.join("data");
    let mut initdb = pg_command(&bin.join("initdb"), as_postgres);
    initdb
        .arg("-D")
        .arg(&data)
        .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"]);
    run(initdb, "initdb")?;

    let port = free_port()?;
    let mut start = pg_command(&bin.join("pg_ctl"), as_postgres);
    start
        .arg("-D")
        .arg(&data)
        .arg("-l")
        .arg(dir.join("server.log"))
        .args(["-w", "-t", "60", "-o"])
        .arg(format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c max_connections=300 \
             -c fsync=off -c synchronous_commit=off -c full_page_writes=off",
            dir.display()
        ))
        .arg("start");
    run(start, "starting the test cluster (pg_ctl start)")?;

    // The watchdog outlives this process by design: it waits for it to exit, then stops the
    // cluster and removes its directory, so clusters cannot accumulate.
    let stop = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {} {} -D '{}' -m immediate stop >/dev/null 2>&1; rm -rf '{}'",
        if as_postgres {
            "runuser -u postgres --"
        } else {
            ""
        },
        bin.join("pg_ctl").display(),
        data.display(),
        dir.display(),
    );
    let mut watchdog = Command::new("setsid");
    watchdog
        .args(["sh", "-c", &stop])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if watchdog.spawn().is_err() {
        let _ = Command::new("sh")
            .args(["-c", &stop])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
    }
    Ok(format!("postgres://postgres@127.0.0.1:{port}/postgres"))
}

/// A [`PostgresStore`] that owns its [`TestDatabase`]: the database lives as long as any clone
/// of the store, which is what [`conformance_tests!`](crate::conformance_tests) needs.
///
/// ```no_run
/// // tests/conformance.rs of a crate with factum-testkit's `postgres` feature:
/// factum_testkit::conformance_tests!(|| factum_testkit::postgres::TestStore::create());
/// ```
#[derive(Clone, Debug)]
pub struct TestStore {
    store: PostgresStore,
    database: std::sync::Arc<TestDatabase>,
}

impl TestStore {
    /// A store on a fresh, migrated [`TestDatabase`].
    ///
    /// # Panics
    /// Like [`TestDatabase::create`].
    pub async fn create() -> Self {
        let database = TestDatabase::create().await;
        // Read-your-writes checks must not depend on other tests' transactions ending within the
        // default 250 ms: see `TestDatabase::patient_store`.
        Self {
            store: database.patient_store(),
            database: std::sync::Arc::new(database),
        }
    }

    /// A store with `options` on a fresh, migrated [`TestDatabase`] (e.g. to run the suite
    /// with group commit on). Pass [`PATIENT_READ_SETTLE`] to
    /// [`StoreOptions::with_read_settle_timeout`] for the read-your-writes checks.
    ///
    /// # Panics
    /// Like [`TestDatabase::create`].
    pub async fn create_with(options: StoreOptions) -> Self {
        let database = TestDatabase::create().await;
        Self {
            store: database.store_with(options),
            database: std::sync::Arc::new(database),
        }
    }

    /// The database under the store.
    pub fn database(&self) -> &TestDatabase {
        &self.database
    }
}

impl std::ops::Deref for TestStore {
    type Target = PostgresStore;
    fn deref(&self) -> &PostgresStore {
        &self.store
    }
}

impl factum::EventStore for TestStore {
    fn append(
        &self,
        request: factum::AppendRequest,
    ) -> impl std::future::Future<Output = Result<factum::AppendResult, factum::Error>> + Send {
        self.store.append(request)
    }

    fn idempotency_outcome(
        &self,
        key: &factum::IdempotencyKey,
    ) -> impl std::future::Future<Output = Result<Option<factum::AppendResult>, factum::Error>> + Send
    {
        self.store.idempotency_outcome(key)
    }

    fn read_stream<'a>(
        &'a self,
        stream: &'a factum::StreamId,
        after: factum::StreamVersion,
    ) -> factum::EventStream<'a> {
        self.store.read_stream(stream, after)
    }

    fn read_stream_payloads<'a>(
        &'a self,
        stream: &'a factum::StreamId,
        after: factum::StreamVersion,
    ) -> factum::PayloadStream<'a> {
        self.store.read_stream_payloads(stream, after)
    }

    fn head(
        &self,
    ) -> impl std::future::Future<Output = Result<factum::LogPosition, factum::Error>> + Send {
        self.store.head()
    }

    fn position_at(
        &self,
        time: chrono::DateTime<chrono::Utc>,
    ) -> impl std::future::Future<Output = Result<factum::LogPosition, factum::Error>> + Send {
        self.store.position_at(time)
    }

    fn read_all(
        &self,
        after: factum::LogPosition,
        limit: usize,
        filter: &factum::EventFilter,
    ) -> impl std::future::Future<Output = Result<Vec<factum::RecordedEvent>, factum::Error>> + Send
    {
        self.store.read_all(after, limit, filter)
    }
}

impl factum::SnapshotStore for TestStore {
    fn save_snapshot(
        &self,
        snapshot: factum::StoredSnapshot,
    ) -> impl std::future::Future<Output = Result<(), factum::Error>> + Send {
        self.store.save_snapshot(snapshot)
    }

    fn load_snapshot(
        &self,
        stream: &factum::StreamId,
    ) -> impl std::future::Future<Output = Result<Option<factum::StoredSnapshot>, factum::Error>> + Send
    {
        self.store.load_snapshot(stream)
    }
}
