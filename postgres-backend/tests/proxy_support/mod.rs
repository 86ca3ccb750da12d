//! A fault-injecting TCP proxy between a store's pool and the test's throwaway database: it can
//! be cut (every connection dropped, new ones refused) and restored, or armed to lose the next
//! answer, or the answer to the request that carries a marker (the request ran on the server, its
//! answer never reaches the client, and the proxy is cut). The machine's PostgreSQL service is
//! never touched.
//!
//! Shared by the test files that need it (`mod proxy_support;`); not every file uses every part.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use factum_testkit::postgres::TestDatabase;
use sqlx::postgres::PgConnectOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub(crate) struct Proxy {
    pub(crate) addr: SocketAddr,
    state: Arc<ProxyState>,
    accept: JoinHandle<()>,
}

struct ProxyState {
    up: AtomicBool,
    /// Lose the answer to the next request that contains these bytes.
    marker: Mutex<Option<Vec<u8>>>,
    /// Lose the next answer on any connection.
    lose_next: AtomicBool,
    /// After losing an answer, keep accepting connections (drop only the one that lost it).
    stay_up: AtomicBool,
    /// How many answers were lost.
    lost: std::sync::atomic::AtomicUsize,
    connections: Mutex<Vec<JoinHandle<()>>>,
}

impl ProxyState {
    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for connection in self.connections.lock().expect("lock").drain(..) {
            connection.abort();
        }
    }
}

impl Proxy {
    pub(crate) async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(ProxyState {
            up: AtomicBool::new(true),
            marker: Mutex::new(None),
            lose_next: AtomicBool::new(false),
            stay_up: AtomicBool::new(false),
            lost: Default::default(),
            connections: Mutex::new(Vec::new()),
        });
        let accept = tokio::spawn({
            let state = state.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    if !state.up.load(Ordering::SeqCst) {
                        drop(client); // refused: the client sees the connection closed
                        continue;
                    }
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        continue;
                    };
                    let connection = tokio::spawn(forward(client, server, state.clone()));
                    let mut connections = state.connections.lock().expect("lock");
                    connections.retain(|c| !c.is_finished());
                    connections.push(connection);
                }
            }
        });
        Proxy {
            addr,
            state,
            accept,
        }
    }

    /// Drops every connection and refuses new ones until [`restore`](Self::restore).
    pub(crate) fn cut(&self) {
        self.state.cut();
    }

    /// The next answer the server sends on any connection is lost, and the proxy cut.
    pub(crate) fn lose_next_answer(&self) {
        self.state.lose_next.store(true, Ordering::SeqCst);
    }

    /// Lets connections through again.
    pub(crate) fn restore(&self) {
        self.state.up.store(true, Ordering::SeqCst);
    }

    /// The answer to the next request containing `marker` is lost, and the proxy cut.
    pub(crate) fn lose_answer_to(&self, marker: &[u8]) {
        *self.state.marker.lock().expect("lock") = Some(marker.to_vec());
    }

    /// Like [`lose_answer_to`](Self::lose_answer_to), but only the connection that carried the
    /// request is dropped: the client can reconnect at once (and look its write up).
    pub(crate) fn lose_answer_to_and_stay_up(&self, marker: &[u8]) {
        self.state.stay_up.store(true, Ordering::SeqCst);
        self.lose_answer_to(marker);
    }

    /// How many answers were lost so far.
    pub(crate) fn lost(&self) -> usize {
        self.state.lost.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.state.cut();
    }
}

async fn forward(client: TcpStream, server: TcpStream, state: Arc<ProxyState>) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    // Set when a request with the marker went to the server: its answer is the next one.
    let armed = Arc::new(AtomicBool::new(false));
    let requests = {
        let state = state.clone();
        let armed = armed.clone();
        async move {
            let mut buffer = vec![0u8; 64 * 1024];
            loop {
                let n = client_read.read(&mut buffer).await?;
                if n == 0 {
                    return Ok::<_, std::io::Error>(());
                }
                {
                    let mut marker = state.marker.lock().expect("lock");
                    if marker
                        .as_deref()
                        .is_some_and(|m| buffer[..n].windows(m.len()).any(|w| w == m))
                    {
                        *marker = None;
                        armed.store(true, Ordering::SeqCst);
                    }
                }
                server_write.write_all(&buffer[..n]).await?;
            }
        }
    };
    let answers = async {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let n = server_read.read(&mut buffer).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            if armed.swap(false, Ordering::SeqCst) || state.lose_next.swap(false, Ordering::SeqCst)
            {
                // The server ran the request and answered; the client never hears it.
                state.lost.fetch_add(1, Ordering::SeqCst);
                if !state.stay_up.swap(false, Ordering::SeqCst) {
                    state.cut();
                }
                return Ok(());
            }
            client_write.write_all(&buffer[..n]).await?;
        }
    };
    tokio::select! {
        _ = requests => {}
        _ = answers => {}
    }
}

/// The test database's connect options and its address, to point a proxy at.
pub(crate) fn upstream(db: &TestDatabase) -> (PgConnectOptions, SocketAddr) {
    // Plaintext even when the `tls` feature is on and the server offers TLS: the proxy reads the
    // protocol's frames (to lose the answer to one statement).
    let options: PgConnectOptions = db
        .url()
        .parse::<PgConnectOptions>()
        .expect("a PostgreSQL URL")
        .ssl_mode(sqlx::postgres::PgSslMode::Disable);
    let host = options.get_host().to_owned();
    let port = options.get_port();
    let addr = format!("{host}:{port}")
        .parse()
        .expect("the test server listens on an IP address");
    (options, addr)
}
