//! A throwaway primary with a streaming replica, for tests of read replicas.
//!
//! ```no_run
//! use factum_testkit::postgres::replica::ReplicatedDatabase;
//!
//! # async fn test() -> Result<(), factum::Error> {
//! let db = ReplicatedDatabase::create().await; // primary + hot standby, migrated, removed on drop
//! let store = db.primary_store();
//! let reader = db.reader(&store).await?; // reads the standby
//! db.pause_replay().await; // make the replica lag on purpose
//! db.resume_replay().await;
//! db.wait_for_replay().await; // the replica applied everything the primary wrote
//! # drop(reader); Ok(()) }
//! ```
//!
//! Two clusters of their own in a temporary directory, on free ports (never the machine's
//! 5432 server): a primary started with `wal_level=replica`, `max_wal_senders` and a
//! `replication` entry in `pg_hba.conf`, and a replica made by `pg_basebackup -R -X stream` from
//! it into a second data directory, started as a hot standby. The machine's server binaries
//! are used (`FACTUM_PG_BIN_DIR`, else the newest `/usr/lib/postgresql/*/bin`, else `PATH`),
//! under the `postgres` account when running as root. Both servers are stopped and the
//! directory removed when the [`ReplicatedDatabase`] is dropped; a watchdog does it when the
//! test process dies first, and the next run removes what a killed watchdog left.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use factum_postgres::{PgReader, PostgresStore, SchemaName, StoreOptions};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};

use super::{PATIENT_READ_SETTLE, free_port, is_root, run};

const PREFIX: &str = "factum-testkit-replica-";
const DATABASE: &str = "factum_replica";
static NEXT: AtomicU32 = AtomicU32::new(0);

/// The directory holding `initdb`, `pg_ctl` and `pg_basebackup`.
fn bin_dir() -> Result<PathBuf, String> {
    let has = |d: &Path| {
        ["initdb", "pg_ctl", "pg_basebackup"]
            .iter()
            .all(|tool| d.join(tool).is_file())
    };
    if let Some(dir) = std::env::var_os("FACTUM_PG_BIN_DIR") {
        let dir = PathBuf::from(dir);
        return if has(&dir) {
            Ok(dir)
        } else {
            Err(format!(
                "FACTUM_PG_BIN_DIR={} has no initdb/pg_ctl/pg_basebackup",
                dir.display()
            ))
        };
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let dir = e.path().join("bin");
            has(&dir).then_some((version, dir))
        })
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions.pop() {
        return Ok(dir);
    }
    std::env::var_os("PATH")
        .and_then(|path| std::env::split_paths(&path).find(|d| has(d)))
        .ok_or_else(|| {
            "no PostgreSQL server binaries (initdb, pg_ctl, pg_basebackup) in FACTUM_PG_BIN_DIR, /usr/lib/postgresql/*/bin or PATH: install PostgreSQL (apt-get install -y postgresql)".to_owned()
        })
}

/// A primary cluster and its streaming replica, stopped and removed on drop.
#[derive(Debug)]
pub struct ReplicatedCluster {
    dir: PathBuf,
    bin: PathBuf,
    as_postgres: bool,
    primary_port: u16,
    replica_port: u16,
}

impl ReplicatedCluster {
    /// Creates the primary, takes a base backup of it into the replica's data directory
    /// (`pg_basebackup -R`), and starts the replica. Blocking (run it off the async runtime).
    pub fn start() -> Result<Self, String> {
        let bin = bin_dir()?;
        let as_postgres = is_root();
        if as_postgres
            && !Command::new("id")
                .args(["-u", "postgres"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        {
            return Err(
                "running as root, PostgreSQL must run under a `postgres` account and there is none"
                    .to_owned(),
            );
        }
        remove_stale(&bin, as_postgres);
        let dir = std::env::temp_dir().join(format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let cluster = Self {
            dir,
            bin,
            as_postgres,
            primary_port: free_port()?,
            replica_port: free_port()?,
        };
        if as_postgres {
            let mut chown = Command::new("chown");
            chown.arg("postgres:postgres").arg(&cluster.dir);
            run(chown, "chown of the replication test directory")?;
        }
        cluster.watchdog();

        let mut initdb = cluster.tool("initdb");
        initdb.arg("-D").arg(cluster.primary_data()).args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
        ]);
        run(initdb, "initdb (primary)")?;
        // initdb's template already lets local connections replicate; say it anyway, so the
        // harness does not depend on that default.
        let hba = cluster.primary_data().join("pg_hba.conf");
        let mut text = std::fs::read_to_string(&hba)
            .map_err(|e| format!("cannot read {}: {e}", hba.display()))?;
        text.push_str("\nhost replication all 127.0.0.1/32 trust\n");
        std::fs::write(&hba, text).map_err(|e| format!("cannot write {}: {e}", hba.display()))?;
        cluster.start_server(
            &cluster.primary_data(),
            cluster.primary_port,
            "-c wal_level=replica -c max_wal_senders=5",
            "primary",
        )?;

        let mut backup = cluster.tool("pg_basebackup");
        backup
            .args(["-h", "127.0.0.1", "-p", &cluster.primary_port.to_string()])
            .args(["-U", "postgres", "-D"])
            .arg(cluster.replica_data())
            .args(["-R", "-X", "stream", "-c", "fast", "--no-sync"]);
        run(backup, "pg_basebackup -R (replica)")?;
        cluster.start_server(
            &cluster.replica_data(),
            cluster.replica_port,
            "-c hot_standby=on -c hot_standby_feedback=on",
            "replica",
        )?;
        Ok(cluster)
    }

    fn primary_data(&self) -> PathBuf {
        self.dir.join("primary")
    }

    fn replica_data(&self) -> PathBuf {
        self.dir.join("replica")
    }

    fn tool(&self, name: &str) -> Command {
        super::pg_command(&self.bin.join(name), self.as_postgres)
    }

    fn start_server(&self, data: &Path, port: u16, extra: &str, what: &str) -> Result<(), String> {
        let mut start = self.tool("pg_ctl");
        start
            .arg("-D")
            .arg(data)
            .arg("-l")
            .arg(self.dir.join(format!("{what}.log")))
            .args(["-w", "-t", "120", "-o"])
            .arg(format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c max_connections=100 \
                 -c fsync=off -c synchronous_commit=off -c full_page_writes=off {extra}",
                self.dir.display()
            ))
            .arg("start");
        run(start, &format!("starting the {what} (pg_ctl start)"))
    }

    /// Stops both servers and removes the directory once this process is gone, whatever ends
    /// it (the watchdog outlives the process by design).
    fn watchdog(&self) {
        let pg_ctl = format!(
            "{} {}",
            if self.as_postgres {
                "runuser -u postgres --"
            } else {
                ""
            },
            self.bin.join("pg_ctl").display()
        );
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
             {pg_ctl} -D '{replica}' -m immediate stop >/dev/null 2>&1; \
             {pg_ctl} -D '{primary}' -m immediate stop >/dev/null 2>&1; rm -rf '{dir}'",
            pid = std::process::id(),
            replica = self.replica_data().display(),
            primary = self.primary_data().display(),
            dir = self.dir.display(),
        );
        let _ = Command::new("setsid")
            .args(["sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
    }

    /// The primary's URL for database `db`.
    pub fn primary_url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.primary_port)
    }

    /// The replica's URL for database `db`.
    pub fn replica_url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.replica_port)
    }
}

impl Drop for ReplicatedCluster {
    fn drop(&mut self) {
        for data in [self.replica_data(), self.primary_data()] {
            let mut stop = self.tool("pg_ctl");
            stop.arg("-D").arg(data).args(["-m", "immediate", "stop"]);
            let _ = run(stop, "pg_ctl stop");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Stops and removes replication clusters whose test process and watchdog are gone.
fn remove_stale(bin: &Path, as_postgres: bool) {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        for data in ["replica", "primary"] {
            let mut stop = super::pg_command(&bin.join("pg_ctl"), as_postgres);
            stop.arg("-D")
                .arg(entry.path().join(data))
                .args(["-m", "immediate", "stop"]);
            let _ = run(stop, "stopping a stale replication cluster");
        }
        let _ = std::fs::remove_dir_all(entry.path());
    }
}

/// A migrated database on a throwaway primary, streamed to a hot standby: see the
/// [module docs](self). Everything is stopped and removed on drop.
pub struct ReplicatedDatabase {
    primary: PgPool,
    replica: PgPool,
    // Dropped last: the pools close first.
    cluster: ReplicatedCluster,
}

impl std::fmt::Debug for ReplicatedDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicatedDatabase")
            .field("cluster", &self.cluster)
            .finish_non_exhaustive()
    }
}

/// How long the harness waits for the replica to apply what the primary wrote.
const REPLAY_TIMEOUT: Duration = Duration::from_secs(60);

impl ReplicatedDatabase {
    /// Starts the primary and its replica, creates a database on the primary with the store's
    /// migrations in the default schema, and waits until the replica has it.
    ///
    /// # Panics
    /// When the clusters cannot be started, with the reason.
    pub async fn create() -> Self {
        match Self::try_create().await {
            Ok(db) => db,
            Err(e) => panic!("cannot start a replicated PostgreSQL pair: {e}"),
        }
    }

    /// Like [`create`](Self::create), returning the reason instead of panicking.
    pub async fn try_create() -> Result<Self, String> {
        let cluster = tokio::task::spawn_blocking(ReplicatedCluster::start)
            .await
            .map_err(|e| format!("starting the clusters panicked: {e}"))??;
        let mut admin = PgConnection::connect(&cluster.primary_url("postgres"))
            .await
            .map_err(|e| format!("cannot connect to the primary: {e}"))?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {DATABASE}")))
            .execute(&mut admin)
            .await
            .map_err(|e| format!("cannot create the test database: {e}"))?;
        let _ = admin.close().await;
        let pool = |url: String| async move {
            PgPoolOptions::new()
                .max_connections(24)
                .acquire_timeout(Duration::from_secs(30))
                .connect(&url)
                .await
                .map_err(|e| format!("cannot connect to {url}: {e}"))
        };
        let primary = pool(cluster.primary_url(DATABASE)).await?;
        factum_postgres::migrate(&primary, &SchemaName::default())
            .await
            .map_err(|e| format!("migrating the primary failed: {e}"))?;
        // The database exists on the replica once the replica applied its creation.
        let mut replica_admin = PgConnection::connect(&cluster.replica_url("postgres"))
            .await
            .map_err(|e| format!("cannot connect to the replica: {e}"))?;
        wait_for_replay(&primary, &mut replica_admin).await?;
        let _ = replica_admin.close().await;
        let replica = pool(cluster.replica_url(DATABASE)).await?;
        Ok(Self {
            primary,
            replica,
            cluster,
        })
    }

    /// A pool on the primary's database.
    pub fn primary_pool(&self) -> &PgPool {
        &self.primary
    }

    /// A pool on the replica's copy of the database (read only).
    pub fn replica_pool(&self) -> &PgPool {
        &self.replica
    }

    /// The primary database's URL.
    pub fn primary_url(&self) -> String {
        self.cluster.primary_url(DATABASE)
    }

    /// The replica database's URL.
    pub fn replica_url(&self) -> String {
        self.cluster.replica_url(DATABASE)
    }

    /// A store on the primary, whose `read_all` waits up to [`PATIENT_READ_SETTLE`] for the
    /// transactions in flight when it was called.
    pub fn primary_store(&self) -> PostgresStore {
        PostgresStore::with_options(
            self.primary.clone(),
            StoreOptions::default().with_read_settle_timeout(PATIENT_READ_SETTLE),
        )
    }

    /// A [`PgReader`] of the replica for `store` (a store on this primary).
    pub async fn reader(&self, store: &PostgresStore) -> Result<PgReader, factum::Error> {
        PgReader::on_replica(store, self.replica.clone()).await
    }

    /// Pauses the replica's replay (`pg_wal_replay_pause()`): it keeps receiving WAL but applies
    /// none, so it lags by whatever the primary writes next. Returns once replay is paused.
    ///
    /// # Panics
    /// When the replica refuses.
    pub async fn pause_replay(&self) {
        let mut conn = self.replica_admin().await;
        sqlx::query("SELECT pg_wal_replay_pause()")
            .execute(&mut conn)
            .await
            .expect("pg_wal_replay_pause");
        let started = Instant::now();
        loop {
            let state: String = sqlx::query_scalar("SELECT pg_get_wal_replay_pause_state()")
                .fetch_one(&mut conn)
                .await
                .expect("pg_get_wal_replay_pause_state");
            if state == "paused" {
                return;
            }
            assert!(
                started.elapsed() < REPLAY_TIMEOUT,
                "replay did not pause: {state}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Resumes the replica's replay (`pg_wal_replay_resume()`).
    ///
    /// # Panics
    /// When the replica refuses.
    pub async fn resume_replay(&self) {
        let mut conn = self.replica_admin().await;
        sqlx::query("SELECT pg_wal_replay_resume()")
            .execute(&mut conn)
            .await
            .expect("pg_wal_replay_resume");
    }

    /// Promotes the replica to a primary of its own (`pg_promote()`), as a failover would, and
    /// returns once it accepts writes. The old primary keeps running: the two now diverge.
    ///
    /// # Panics
    /// When the replica refuses or does not finish promoting within 60 s.
    pub async fn promote(&self) {
        let mut conn = self.replica_admin().await;
        let promoted: bool = sqlx::query_scalar("SELECT pg_promote(true, 60)")
            .fetch_one(&mut conn)
            .await
            .expect("pg_promote");
        assert!(promoted, "the replica did not finish promoting within 60 s");
    }

    /// Waits until the replica has applied everything the primary had written when this was
    /// called.
    ///
    /// # Panics
    /// After 60 s.
    pub async fn wait_for_replay(&self) {
        let mut conn = self.replica_admin().await;
        if let Err(e) = wait_for_replay(&self.primary, &mut conn).await {
            panic!("{e}");
        }
    }

    async fn replica_admin(&self) -> PgConnection {
        PgConnection::connect(&self.cluster.replica_url(DATABASE))
            .await
            .expect("connect to the replica")
    }
}

async fn wait_for_replay(primary: &PgPool, replica: &mut PgConnection) -> Result<(), String> {
    let target: i64 =
        sqlx::query_scalar("SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::int8")
            .fetch_one(primary)
            .await
            .map_err(|e| format!("primary WAL position: {e}"))?;
    let started = Instant::now();
    loop {
        let replayed: Option<i64> =
            sqlx::query_scalar("SELECT (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::int8")
                .fetch_one(&mut *replica)
                .await
                .map_err(|e| format!("replica replay position: {e}"))?;
        if replayed.is_some_and(|r| r >= target) {
            return Ok(());
        }
        if started.elapsed() > REPLAY_TIMEOUT {
            return Err(format!(
                "the replica did not replay up to {target} within {REPLAY_TIMEOUT:?} (at {replayed:?})"
            ));
        }
        // Waiting for another process (the standby's startup process), not for our own tasks.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
