//! NATS servers for tests: the machine's, when one with JetStream answers, or one started from the
//! installed `nats-server` binary on a free port with a store directory of its own.
//!
//! * [`shared_url`]: a server every test of the process can share (`NATS_URL` when set, else
//!   `127.0.0.1:4222` when it answers with JetStream, else one started for the process).
//! * [`NatsServer`]: a server of the test's own, to kill (`kill -9`) and restart on the same port
//!   and store — never the machine's shared one.
//!
//! A missing binary fails with what to install (`apt-get install -y nats-server`) or set.

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Whether a NATS server with JetStream answers at `host:port`: it sends its `INFO` line on
/// connect, which says `"jetstream":true` when JetStream is enabled.
pub fn answers_with_jetstream(address: &str) -> bool {
    let Ok(addr) = address.parse() else {
        return false;
    };
    let Ok(stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).is_ok()
        && line.starts_with("INFO")
        && line.contains("\"jetstream\":true")
}

/// The URL of a NATS server with JetStream for tests to share: `NATS_URL` when set; else the
/// server on `127.0.0.1:4222` when it answers with JetStream; else a server started once for this
/// process from the installed binary (stopped when the process ends).
///
/// # Panics
/// When none answers and `nats-server` is not installed, saying what to install or set.
pub fn shared_url() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        if let Ok(url) = std::env::var("NATS_URL") {
            return url;
        }
        if answers_with_jetstream("127.0.0.1:4222") {
            return "nats://127.0.0.1:4222".to_owned();
        }
        let server = NatsServer::start_watched();
        let url = server.url();
        // Kept for the life of the process; its watchdog stops it when the process ends.
        std::mem::forget(server);
        url
    })
    .clone()
}

/// The `nats-server` binary: `FACTUM_NATS_SERVER` when set, else the first on `PATH`, else
/// `/usr/sbin/nats-server` (Debian's package).
fn binary() -> PathBuf {
    if let Ok(path) = std::env::var("FACTUM_NATS_SERVER") {
        return PathBuf::from(path);
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("nats-server"))
            .find(|p| p.is_file())
    });
    on_path.unwrap_or_else(|| PathBuf::from("/usr/sbin/nats-server"))
}

/// A port free now and never handed out before in this process: tests run in parallel, and a
/// port released by one test's probe could otherwise go to two servers (the second one's start
/// would then find the first one answering, and the two tests would share a broker).
pub(crate) fn free_port() -> u16 {
    static TAKEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut taken = TAKEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port on 127.0.0.1");
        if !taken.contains(&port) {
            taken.push(port);
            return port;
        }
    }
}

/// A nats-server with JetStream of the test's own: its own port and store directory, killed
/// when dropped.
#[derive(Debug)]
pub struct NatsServer {
    port: u16,
    store: PathBuf,
    child: Option<Child>,
    watched: bool,
}

impl NatsServer {
    /// Starts a server on a free port with a fresh store directory and waits until it answers.
    ///
    /// # Panics
    /// When `nats-server` is not installed or does not come up within 15 s.
    pub fn start() -> Self {
        let mut server = Self::unstarted();
        server.restart();
        server
    }

    /// Like [`start`](Self::start), under a watchdog shell that stops the server when this
    /// process ends (for a server that outlives every test of the process).
    fn start_watched() -> Self {
        let mut server = Self::unstarted();
        server.watched = true;
        server.restart();
        server
    }

    fn unstarted() -> Self {
        let port = free_port();
        Self {
            port,
            store: std::env::temp_dir().join(format!("factum-nats-{}-{port}", std::process::id())),
            child: None,
            watched: false,
        }
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server with SIGKILL (no shutdown of any kind) and waits for it to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port with the same store (after [`kill`](Self::kill)),
    /// and waits until it answers with JetStream.
    ///
    /// # Panics
    /// When it does not come up within 15 s.
    pub fn restart(&mut self) {
        self.kill();
        let binary = binary();
        assert!(
            binary.is_file(),
            "no nats-server binary at {}: install it (`apt-get install -y nats-server`), set FACTUM_NATS_SERVER to its path, or set NATS_URL to a server with JetStream",
            binary.display()
        );
        std::fs::create_dir_all(&self.store).expect("create the server's store directory");
        let args = [
            "-js".to_owned(),
            "-a".to_owned(),
            "127.0.0.1".to_owned(),
            "-p".to_owned(),
            self.port.to_string(),
            "-sd".to_owned(),
            self.store.display().to_string(),
        ];
        self.child = Some(spawn_server(
            &binary,
            &args,
            self.watched,
            self.port,
            "nats-server",
            "answer with JetStream",
            answers_with_jetstream,
        ));
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        if !self.watched {
            let _ = std::fs::remove_dir_all(&self.store);
        }
    }
}

/// Starts `binary` with `args` for a test server on `port` (when `watched`, under a shell that
/// kills it once this process is gone), waits up to 15 s until `answers` says it is up, and
/// checks that the server answering is this one, not another that held the port before.
pub(crate) fn spawn_server(
    binary: &std::path::Path,
    args: &[String],
    watched: bool,
    port: u16,
    name: &str,
    answering: &str,
    answers: fn(&str) -> bool,
) -> Child {
    let mut child = if watched {
        // The shell's parent is this process: when it is gone, the trap stops the server.
        Command::new("sh")
            .arg("-c")
            .arg(
                r#""$0" "$@" & server=$!; trap 'kill -9 $server' EXIT; parent=$PPID; while kill -0 $parent 2>/dev/null && kill -0 $server 2>/dev/null; do sleep 1; done"#,
            )
            .arg(binary)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
    } else {
        Command::new(binary)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
    }
    .unwrap_or_else(|e| panic!("could not start {}: {e}", binary.display()));
    let address = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !answers(&address) {
        assert!(
            Instant::now() < deadline,
            "{name} on {address} did not {answering} within 15 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let exited = child.try_wait().ok().flatten();
    assert!(
        exited.is_none(),
        "{name} for {address} exited ({exited:?}): is the port taken by another server?"
    );
    child
}
