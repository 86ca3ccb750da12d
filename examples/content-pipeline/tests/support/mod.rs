//! What the pipeline tests share: documents to feed, the expected read models folded from the
//! services' logs (independently of the services' code), and an HTTP GET.

#![allow(dead_code, unreachable_pub)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use content_pipeline::content::{Document, JobEvent};
use content_pipeline::graph::{EntityNode, GraphSnapshot};
use content_pipeline::observe;
use content_pipeline::realtime::{Notification, SessionEvent};
use factum::{EventFilter, EventStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long a test waits for a condition before failing.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// Polls `$probe` (an expression yielding `Option<T>`, awaited inside) until it is `Some`, and
/// fails naming `$what` after [`PATIENCE`].
#[macro_export]
macro_rules! eventually {
    ($what:expr, $probe:expr) => {{
        let deadline = tokio::time::Instant::now() + $crate::support::PATIENCE;
        loop {
            if let Some(found) = $probe {
                break found;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "gave up waiting for {}",
                $what
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }};
}

/// The sessions opened before any document: (session, user, topics, alerts).
pub const SESSIONS: &[(&str, &str, &[&str], bool)] = &[
    ("s-ada", "ada", &["computing"], true),
    ("s-ada-2", "ada", &["physics"], false),
    ("s-grace", "grace", &["physics", "biology"], false),
    ("s-alan", "alan", &["computing", "biology"], true),
    ("s-nobody", "nobody", &[], false),
];

const NAMES: &[&str] = &[
    "Ada", "Babbage", "Turing", "Hopper", "Knuth", "Curie", "Einstein", "Bohr", "Noether",
    "Feynman", "Darwin", "Mendel", "Franklin", "Crick", "Watson", "Wallace", "Lamarck", "Pasteur",
];
const KEYWORDS: &[&str] = &[
    "algorithm",
    "machine",
    "program",
    "energy",
    "particle",
    "light",
    "gene",
    "cell",
    "species",
];

/// The built-in corpus and `extra` generated documents (each with 2 to 5 names and 0 to 3
/// keywords, picked by a fixed pseudo-random sequence), so some classify at once, some on the
/// second attempt and some not at all.
pub fn documents(extra: usize) -> Vec<Document> {
    let mut documents = content_pipeline::content::corpus();
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    };
    for i in 0..extra {
        let names: BTreeSet<&str> = (0..2 + next(4)).map(|_| NAMES[next(NAMES.len())]).collect();
        let keywords: Vec<&str> = (0..next(4))
            .map(|_| KEYWORDS[next(KEYWORDS.len())])
            .collect();
        let text = format!(
            "{} met. They spoke of {}.",
            names.iter().copied().collect::<Vec<_>>().join(" and "),
            if keywords.is_empty() {
                "the weather".to_owned()
            } else {
                keywords.join(", ")
            }
        );
        documents.push(Document::new(
            &format!("gen-{i}"),
            format!("note {i}"),
            text,
        ));
    }
    documents
}

/// The graph as a fold of content-processing's log: for each classified document, in log
/// order, each of its entities gains a mention and its topic, and each pair of them an edge.
pub async fn expected_graph<S: EventStore>(content: &S) -> GraphSnapshot {
    let mut entities: BTreeMap<String, EntityNode> = BTreeMap::new();
    let mut edges: BTreeMap<(String, String), u32> = BTreeMap::new();
    for event in job_events(content).await {
        if let JobEvent::Classified { topic, terms, .. } = event.1 {
            for term in &terms {
                let node = entities.entry(term.clone()).or_default();
                node.mentions += 1;
                node.topics.insert(topic.clone());
            }
            for a in &terms {
                for b in &terms {
                    if a < b {
                        *edges.entry((a.clone(), b.clone())).or_default() += 1;
                    }
                }
            }
        }
    }
    GraphSnapshot { entities, edges }
}

async fn job_events<S: EventStore>(content: &S) -> Vec<(String, JobEvent)> {
    observe::events(content, &EventFilter::all().with_categories(["job"]))
        .await
        .expect("read content's log")
        .iter()
        .map(|e| {
            let decoded = e.decode::<JobEvent>().expect("a job event");
            (decoded.stream_id.aggregate_id().to_owned(), decoded.event)
        })
        .collect()
}

/// The feeds as a fold of the logs: realtime's (who follows what), content's (each classified
/// document's topic and entities; failed documents) and, for which document first showed an
/// entity in a topic, the order in which the graph indexed the documents (its log: after a crash
/// the broker may redeliver a message after later ones, so that order is the graph's, not
/// content's). Each user's feed sorted.
pub async fn expected_feeds<C: EventStore, G: EventStore, R: EventStore>(
    content: &C,
    graph: &G,
    realtime: &R,
) -> BTreeMap<String, Vec<Notification>> {
    let mut follows: BTreeMap<String, (BTreeSet<String>, bool)> = BTreeMap::new();
    let sessions = observe::events(realtime, &EventFilter::all().with_categories(["session"]))
        .await
        .expect("read realtime's log");
    let mut open: BTreeMap<String, (String, BTreeSet<String>, bool)> = BTreeMap::new();
    for event in sessions {
        let decoded = event.decode::<SessionEvent>().expect("a session event");
        match decoded.event {
            SessionEvent::Opened {
                user,
                topics,
                alerts,
            } => {
                open.insert(
                    decoded.stream_id.aggregate_id().to_owned(),
                    (user, topics, alerts),
                );
            }
            SessionEvent::Closed => {
                open.remove(decoded.stream_id.aggregate_id());
            }
        }
    }
    for (user, topics, alerts) in open.into_values() {
        let entry = follows.entry(user).or_default();
        entry.0.extend(topics);
        entry.1 |= alerts;
    }
    let mut classified: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    let mut told: Vec<Notification> = Vec::new();
    for (job, event) in job_events(content).await {
        match event {
            JobEvent::Classified { topic, terms, .. } => {
                classified.insert(job, (topic, terms));
            }
            JobEvent::Failed { reason } => told.push(Notification::Failure {
                document: job,
                reason,
            }),
            _ => {}
        }
    }
    let indexed = observe::events(
        graph,
        &EventFilter::all().with_event_types(["topic.document_indexed"]),
    )
    .await
    .expect("read the graph's log");
    let order: Vec<String> = indexed
        .iter()
        .map(|e| {
            let payload: serde_json::Value =
                serde_json::from_str(e.payload.get()).expect("a JSON payload");
            payload["document"]
                .as_str()
                .expect("a document id")
                .to_owned()
        })
        .collect();
    let mut sorted_order = order.clone();
    sorted_order.sort();
    assert_eq!(
        sorted_order,
        classified.keys().cloned().collect::<Vec<_>>(),
        "the graph indexed each classified document once"
    );
    let mut seen: BTreeSet<(String, String)> = BTreeSet::new();
    for document in order {
        let (topic, terms) = &classified[&document];
        for term in terms {
            if seen.insert((topic.clone(), term.clone())) {
                told.push(Notification::Entity {
                    topic: topic.clone(),
                    entity: term.clone(),
                    document: document.clone(),
                });
            }
        }
    }
    let mut feeds = BTreeMap::new();
    for (user, (topics, alerts)) in follows {
        let mut feed: Vec<Notification> = told
            .iter()
            .filter(|n| match n {
                Notification::Entity { topic, .. } => topics.contains(topic),
                Notification::Failure { .. } => alerts,
            })
            .cloned()
            .collect();
        if !feed.is_empty() {
            feed.sort();
            feeds.insert(user, feed);
        }
    }
    feeds
}

/// Each user's feed, sorted (notifications from two streams interleave in any order).
pub fn sorted(
    mut feeds: BTreeMap<String, Vec<Notification>>,
) -> BTreeMap<String, Vec<Notification>> {
    feeds.values_mut().for_each(|f| f.sort());
    feeds
}

/// The number of edges of a shortest path from `from` to `to` in `graph`, breadth first over
/// its edges.
pub fn distance(graph: &GraphSnapshot, from: &str, to: &str) -> Option<usize> {
    let mut seen = BTreeSet::from([from.to_owned()]);
    let mut queue = VecDeque::from([(from.to_owned(), 0)]);
    while let Some((at, d)) = queue.pop_front() {
        if at == to {
            return Some(d);
        }
        for (a, b) in graph.edges.keys() {
            let next = if *a == at {
                b
            } else if *b == at {
                a
            } else {
                continue;
            };
            if seen.insert(next.clone()) {
                queue.push_back((next.clone(), d + 1));
            }
        }
    }
    None
}

/// Checks a path the service returned: from `from` to `to`, along edges of `graph`, as short as
/// [`distance`].
pub fn assert_shortest(graph: &GraphSnapshot, from: &str, to: &str, path: Option<Vec<String>>) {
    let expected = distance(graph, from, to).filter(|d| *d <= content_pipeline::graph::MAX_HOPS);
    match (expected, path) {
        (None, None) => {}
        (Some(d), Some(path)) => {
            assert_eq!(
                path.len(),
                d + 1,
                "{from} → {to}: {path:?} is not a shortest path"
            );
            assert_eq!(path.first().map(String::as_str), Some(from));
            assert_eq!(path.last().map(String::as_str), Some(to));
            for pair in path.windows(2) {
                let key = if pair[0] < pair[1] {
                    (pair[0].clone(), pair[1].clone())
                } else {
                    (pair[1].clone(), pair[0].clone())
                };
                assert!(
                    graph.edges.contains_key(&key),
                    "{from} → {to}: no edge {key:?} in {path:?}"
                );
            }
        }
        (expected, path) => {
            panic!("{from} → {to}: expected a path of {expected:?} edges, got {path:?}")
        }
    }
}

/// `GET path` over HTTP/1.1 on `address`: the status code and the body.
pub async fn get(address: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("send the request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("read the response");
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Serves `router` on a free port of 127.0.0.1 for the rest of the test.
pub async fn serve(router: axum::Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(content_pipeline::http::serve(
        listener,
        router,
        std::future::pending(),
    ));
    address
}
