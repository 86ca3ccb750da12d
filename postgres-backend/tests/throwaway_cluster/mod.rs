//! A throwaway PostgreSQL cluster of its own (`initdb` + `pg_ctl` in a temporary directory, under
//! the `postgres` account when running as root), for tests that need a whole cluster: a dump
//! restored into a *second* cluster, a server killed with `kill -9` and restarted.
//!
//! Also compiled into the fault campaign (`faults/`), so there is one copy.

#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

const PREFIX: &str = "factum-cluster-";
static NEXT: AtomicU32 = AtomicU32::new(0);

/// How the cluster trades durability for speed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Durability {
    /// `fsync`, `synchronous_commit` and full-page writes on: an acknowledged commit survives a
    /// `kill -9` of the server (what crash tests need).
    Durable,
    /// All three off: fast, for tests that never crash the server.
    Fast,
}

/// A running (or killed) throwaway cluster, stopped and removed on drop.
#[derive(Debug)]
pub struct Cluster {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    as_postgres: bool,
    durability: Durability,
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The directory of the server binaries: `FACTUM_PG_BIN_DIR`, else the newest
/// `/usr/lib/postgresql/*/bin`, else `PATH`. Unlike the test harness's lookup (PATH first), this
/// one prefers the packaged directory, which also holds `createdb`, `pg_dump` and `pg_restore`
/// (a machine may put `initdb`/`pg_ctl` wrappers alone on PATH).
pub fn bin_dir() -> Result<PathBuf, String> {
    let has = |d: &Path| d.join("initdb").is_file() && d.join("pg_ctl").is_file();
    if let Some(dir) = std::env::var_os("FACTUM_PG_BIN_DIR") {
        let dir = PathBuf::from(dir);
        return if has(&dir) {
            Ok(dir)
        } else {
            Err(format!(
                "FACTUM_PG_BIN_DIR={} has no initdb/pg_ctl",
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
            "no PostgreSQL server binaries (initdb, pg_ctl) in FACTUM_PG_BIN_DIR, /usr/lib/postgresql/*/bin or PATH: install PostgreSQL (apt-get install -y postgresql)".to_owned()
        })
}

fn run(mut command: Command, what: &str) -> Result<String, String> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{what}: cannot run {command:?}: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "{what} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("cannot find a free port: {e}"))
}

impl Cluster {
    /// Creates and starts a new cluster.
    pub fn start(durability: Durability) -> Result<Self, String> {
        let bin = bin_dir()?;
        let as_postgres = is_root();
        remove_stale(&bin, as_postgres);
        let dir = std::env::temp_dir().join(format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let cluster = Cluster {
            dir,
            bin,
            port: free_port()?,
            as_postgres,
            durability,
        };
        if as_postgres {
            let mut chown = Command::new("chown");
            chown.arg("postgres:postgres").arg(&cluster.dir);
            run(chown, "chown of the cluster directory")?;
        }
        let mut initdb = cluster.server_tool("initdb");
        initdb
            .arg("-D")
            .arg(cluster.data())
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8"]);
        if durability == Durability::Fast {
            initdb.arg("--no-sync");
        }
        run(initdb, "initdb")?;
        cluster.restart()?;
        Ok(cluster)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// A directory the test may write files to (dumps).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The TCP port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A server binary (initdb, pg_ctl) run as the `postgres` account when we are root.
    fn server_tool(&self, name: &str) -> Command {
        if self.as_postgres {
            let mut command = Command::new("runuser");
            command
                .args(["-u", "postgres", "--"])
                .arg(self.bin.join(name));
            command
        } else {
            Command::new(self.bin.join(name))
        }
    }

    /// A client binary (pg_dump, pg_restore, psql) aimed at this cluster.
    pub fn client_tool(&self, name: &str) -> Command {
        let mut command = Command::new(self.bin.join(name));
        command.args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
        ]);
        command
    }

    /// Runs a client tool to completion, failing with its output.
    pub fn run_client(&self, name: &str, args: &[&str]) -> Result<String, String> {
        let mut command = self.client_tool(name);
        command.args(args);
        run(command, name)
    }

    /// The URL of database `db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Starts the server (again, after [`kill9`](Self::kill9) or a stop), waiting until it
    /// accepts connections (crash recovery included).
    pub fn restart(&self) -> Result<(), String> {
        let settings = match self.durability {
            Durability::Durable => "",
            Durability::Fast => " -c fsync=off -c synchronous_commit=off -c full_page_writes=off",
        };
        let mut start = self.server_tool("pg_ctl");
        start
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.join("server.log"))
            .args(["-w", "-t", "120", "-o"])
            .arg(format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200{settings}",
                self.port,
                self.dir.display()
            ))
            .arg("start");
        run(start, "pg_ctl start").map(drop)
    }

    /// The postmaster's process id (first line of `postmaster.pid`).
    pub fn postmaster_pid(&self) -> Result<u32, String> {
        let text = std::fs::read_to_string(self.data().join("postmaster.pid"))
            .map_err(|e| format!("no postmaster.pid: {e}"))?;
        text.lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .ok_or_else(|| format!("postmaster.pid is malformed: {text:?}"))
    }

    /// Kills the postmaster and every backend with SIGKILL (a crash: no shutdown checkpoint),
    /// and waits until they are gone.
    pub fn kill9(&self) -> Result<(), String> {
        let pid = self.postmaster_pid()?;
        // The backends are the postmaster's children: kill them too, as a machine crash would.
        let children = run(
            {
                let mut c = Command::new("pgrep");
                c.args(["-P", &pid.to_string()]);
                c
            },
            "pgrep",
        )
        .unwrap_or_default();
        let mut pids: Vec<String> = children.split_whitespace().map(str::to_owned).collect();
        pids.push(pid.to_string());
        let mut kill = Command::new("kill");
        kill.arg("-9").args(&pids);
        let _ = run(kill, "kill -9");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while pids
            .iter()
            .any(|p| Path::new(&format!("/proc/{p}")).exists())
        {
            if std::time::Instant::now() > deadline {
                return Err(format!("processes {pids:?} survived kill -9"));
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let mut stop = self.server_tool("pg_ctl");
        stop.arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "stop"]);
        let _ = run(stop, "pg_ctl stop");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Stops and removes clusters left by processes that no longer exist (killed before `Drop`).
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
        let mut stop = if as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(bin.join("pg_ctl"));
            c
        } else {
            Command::new(bin.join("pg_ctl"))
        };
        stop.arg("-D")
            .arg(entry.path().join("data"))
            .args(["-m", "immediate", "stop"]);
        let _ = run(stop, "stopping a stale cluster");
        let _ = std::fs::remove_dir_all(entry.path());
    }
}
