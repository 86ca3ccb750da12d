//! Redis servers for tests: the machine's, when one answers, or one started from the installed
//! `redis-server` binary on a free port (no persistence).
//!
//! * [`shared_url`]: a server every test of the process can share (`REDIS_URL` when set, else
//!   `127.0.0.1:6379` when it answers `PING`, else one started for the process).
//! * [`namespace`]: a key prefix no other test (of this process or another) uses, so tests
//!   sharing a server run in parallel without seeing each other's keys.
//! * [`RedisServer`]: a server of the test's own, to kill (`kill -9`) and restart.
//!
//! A missing binary fails with what to install (`apt-get install -y redis-server`) or set.
//!
//! ```no_run
//! let url = factum_testkit::redis::shared_url();
//! let namespace = factum_testkit::redis::namespace("feeds");
//! assert!(url.starts_with("redis://"));
//! assert!(namespace.starts_with("test-feeds-"));
//! ```

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Child;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Whether a Redis server answers `PING` with `PONG` at `host:port`.
pub fn answers_ping(address: &str) -> bool {
    let Ok(addr) = address.parse() else {
        return false;
    };
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut reply = [0u8; 7];
    stream.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
}

/// The URL of a Redis server for tests to share: `REDIS_URL` when set; else the server on
/// `127.0.0.1:6379` when it answers `PING`; else a server started once for this process from the
/// installed binary (stopped when the process ends).
///
/// # Panics
/// When none answers and `redis-server` is not installed, saying what to install or set.
pub fn shared_url() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        if let Ok(url) = std::env::var("REDIS_URL") {
            return url;
        }
        if answers_ping("127.0.0.1:6379") {
            return "redis://127.0.0.1:6379".to_owned();
        }
        let server = RedisServer::start_watched();
        let url = server.url();
        // Kept for the life of the process; its watchdog stops it when the process ends.
        std::mem::forget(server);
        url
    })
    .clone()
}

/// A key namespace of the test's own: `test-{label}-{process id}-{n}-{nanoseconds}`, unique
/// across the tests of this process and of any other running at the same time.
pub fn namespace(label: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("test-{label}-{}-{n}-{nanos}", std::process::id())
}

/// The `redis-server` binary: `FACTUM_REDIS_SERVER` when set, else the first on `PATH`, else
/// `/usr/bin/redis-server` (Debian's package).
fn binary() -> PathBuf {
    if let Ok(path) = std::env::var("FACTUM_REDIS_SERVER") {
        return PathBuf::from(path);
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("redis-server"))
            .find(|p| p.is_file())
    });
    on_path.unwrap_or_else(|| PathBuf::from("/usr/bin/redis-server"))
}

/// A redis-server of the test's own on a free port, without persistence (`--save ''
/// --appendonly no`), killed when dropped.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
    watched: bool,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers `PING`.
    ///
    /// # Panics
    /// When `redis-server` is not installed or does not come up within 15 s.
    pub fn start() -> Self {
        let mut server = Self {
            port: crate::nats::free_port(),
            child: None,
            watched: false,
        };
        server.restart();
        server
    }

    /// Like [`start`](Self::start), under a watchdog shell that stops the server when this
    /// process ends (for a server that outlives every test of the process).
    fn start_watched() -> Self {
        let mut server = Self {
            port: crate::nats::free_port(),
            child: None,
            watched: true,
        };
        server.restart();
        server
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server with SIGKILL and waits for it to be gone (its data is gone with it).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (after [`kill`](Self::kill), empty), and waits
    /// until it answers `PING`.
    ///
    /// # Panics
    /// When it does not come up within 15 s.
    pub fn restart(&mut self) {
        self.kill();
        let binary = binary();
        assert!(
            binary.is_file(),
            "no redis-server binary at {}: install it (`apt-get install -y redis-server`), set FACTUM_REDIS_SERVER to its path, or set REDIS_URL to a running server",
            binary.display()
        );
        let args = [
            "--port".to_owned(),
            self.port.to_string(),
            "--bind".to_owned(),
            "127.0.0.1".to_owned(),
            "--save".to_owned(),
            String::new(),
            "--appendonly".to_owned(),
            "no".to_owned(),
        ];
        self.child = Some(crate::nats::spawn_server(
            &binary,
            &args,
            self.watched,
            self.port,
            "redis-server",
            "answer PING",
            answers_ping,
        ));
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
