//! The pipeline on three PostgreSQL databases (one per service), NATS JetStream and Redis
//! (realtime's sessions and feeds), with the knowledge-graph service in a child process killed
//! with `kill -9` mid-run and restarted: the graph and the feeds end equal to the folds of the
//! services' logs, and to a run of the same documents without the kill (the embedded pipeline).
//!
//! The graph service under test is this test binary itself, re-executed as a child process
//! running the ignored test `graph_child`.

mod support;

use std::process::Stdio;
use std::time::Duration;

use content_pipeline::graph::{self, GraphQueries, PgGraph};
use content_pipeline::postgres::{self as pg, ContentService, GraphService, RedisRealtimeService};
use content_pipeline::realtime::{self, RealtimeView};
use content_pipeline::{content, embedded, observe};
use factum::saga::TestClock;
use factum_nats::JetStreamBus;
use factum_testkit::nats::NatsServer;
use factum_testkit::postgres::TestDatabase;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout};
use tokio::sync::watch;

use support::*;

const PREFIX: &str = "graph-child: ";
const REQUEUE_AFTER: Duration = Duration::from_secs(60);

/// The child: the knowledge-graph service, run only when re-executed with `GRAPH_CHILD_DB` set.
#[test]
#[ignore = "the child process of the restart test, run by it"]
fn graph_child() {
    let Ok(url) = std::env::var("GRAPH_CHILD_DB") else {
        return;
    };
    let nats = std::env::var("GRAPH_CHILD_NATS").expect("GRAPH_CHILD_NATS");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let store = pg::connect(&url, graph::service()).await.expect("connect");
        let bus = JetStreamBus::connect(&nats).await.expect("connect to NATS");
        let connected = bus.clone();
        let service = GraphService::new(store, bus, move || connected.is_connected())
            .await
            .expect("the graph service");
        println!("{PREFIX}running");
        let (_stop, shutdown) = watch::channel(false);
        let ran = service.run(shutdown).await;
        panic!("the graph service stopped: {ran:?}");
    });
}

fn without_documents(
    feeds: std::collections::BTreeMap<String, Vec<realtime::Notification>>,
) -> std::collections::BTreeMap<String, Vec<realtime::Notification>> {
    feeds
        .into_iter()
        .map(|(user, feed)| {
            let mut feed: Vec<_> = feed
                .into_iter()
                .map(|n| match n {
                    realtime::Notification::Entity { topic, entity, .. } => {
                        realtime::Notification::Entity {
                            topic,
                            entity,
                            document: String::new(),
                        }
                    }
                    other => other,
                })
                .collect();
            feed.sort();
            (user, feed)
        })
        .collect()
}

fn spawn(db: &str, nats: &str) -> (Child, tokio::io::Lines<BufReader<ChildStdout>>) {
    let mut child = tokio::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "graph_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("GRAPH_CHILD_DB", db)
        .env("GRAPH_CHILD_NATS", nats)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the graph service");
    let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    (child, lines)
}

async fn running(lines: &mut tokio::io::Lines<BufReader<ChildStdout>>) {
    let next = async {
        while let Some(line) = lines.next_line().await.expect("read the child") {
            if line.contains(PREFIX) {
                return;
            }
        }
        panic!("the graph service ended before running");
    };
    tokio::time::timeout(PATIENCE, next)
        .await
        .expect("the graph service starts in time");
}

async fn kill9(child: &mut Child) {
    child.start_kill().expect("SIGKILL");
    let status = child.wait().await.expect("wait for the child");
    assert!(!status.success(), "killed, not exited: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_graph_service_killed_mid_run_and_restarted_ends_as_a_run_without_the_kill() {
    let nats = NatsServer::start();
    let bus = JetStreamBus::connect(&nats.url())
        .await
        .expect("connect to NATS");
    pg::ensure_streams(&bus).await.expect("streams");
    let (content_db, graph_db, realtime_db) = (
        TestDatabase::create().await,
        TestDatabase::create().await,
        TestDatabase::create().await,
    );
    let clock = TestClock::default();
    let connected = |bus: &JetStreamBus| {
        let bus = bus.clone();
        move || bus.is_connected()
    };
    let content_store = pg::connect(content_db.url(), content::service())
        .await
        .expect("content");
    let realtime_store = pg::connect(realtime_db.url(), realtime::service())
        .await
        .expect("realtime");
    let content = ContentService::new(
        content_store.clone(),
        bus.clone(),
        clock.clone(),
        connected(&bus),
    );
    let processing = content.processing.clone();
    let content_health = content.health.clone();
    let keyspace = factum_redis::RedisKeyspace::connect(
        &factum_testkit::redis::shared_url(),
        &factum_testkit::redis::namespace("pipeline"),
    )
    .await
    .expect("connect to Redis");
    let realtime = RedisRealtimeService::new(
        realtime_store.clone(),
        bus.clone(),
        &keyspace,
        connected(&bus),
    );
    let view = realtime.view.clone();
    let realtime_health = realtime.health.clone();
    // What the test reads of the graph's database (the service itself runs in the child).
    let graph_store = graph_db.store();
    let graph_view = PgGraph::new(&graph_store);

    let documents = documents(40);
    let (first, second) = documents.split_at(20);
    let (stop, stopped) = watch::channel(false);
    let scenario = async {
        for (session, user, topics, alerts) in SESSIONS {
            embedded::open_session(&realtime_store, session, user, topics, *alerts)
                .await
                .expect("open");
        }
        eventually!(
            "the sessions in the view",
            (view.sessions().await.expect("sessions").len() == SESSIONS.len()).then_some(())
        );

        let (mut child, mut lines) = spawn(graph_db.url(), &nats.url());
        running(&mut lines).await;
        embedded::submit(&content_store, first, REQUEUE_AFTER)
            .await
            .expect("submit");
        eventually!(
            "a few documents indexed by the graph",
            (observe::count(&graph_store, "topic.document_indexed")
                .await
                .expect("count")
                >= 3)
                .then_some(())
        );
        // Killed while it works: the rest of the documents arrive while it is down.
        kill9(&mut child).await;
        embedded::submit(&content_store, second, REQUEUE_AFTER)
            .await
            .expect("submit");
        let indexed_while_down = observe::count(&graph_store, "topic.document_indexed")
            .await
            .expect("count");
        let (mut child, mut lines) = spawn(graph_db.url(), &nats.url());
        running(&mut lines).await;

        // Every job classified or waiting for its second attempt; then the timeouts fire.
        let requeued = eventually!("every job classified or re-queued", {
            let classified = observe::count(&content_store, "job.classified")
                .await
                .expect("count");
            let retried = observe::count(&content_store, "job.retried")
                .await
                .expect("count");
            let mut waiting = 0;
            for document in &documents {
                waiting += processing
                    .timeouts(&document.id)
                    .await
                    .expect("timeouts")
                    .len();
            }
            (classified + retried == documents.len() && waiting == retried).then_some(retried)
        });
        assert!(requeued > 0);
        clock.advance(REQUEUE_AFTER + Duration::from_secs(1));
        eventually!(
            "every job done",
            observe::jobs_done(&content_store)
                .await
                .expect("jobs")
                .0
                .then_some(())
        );

        // The graph and the feeds reach the folds of the logs...
        let expected = expected_graph(&content_store).await;
        let graph = eventually!("the graph equal to the fold of content's log", {
            let graph = graph_view.snapshot().await.expect("graph");
            (graph == expected).then_some(graph)
        });
        let expected_feeds = expected_feeds(&content_store, &graph_store, &realtime_store).await;
        let feeds = eventually!("the feeds equal to the fold of the logs", {
            let feeds = sorted(view.feeds().await.expect("feeds"));
            (feeds == expected_feeds).then_some(feeds)
        });
        // ...with each document indexed once, although some were handled around the kill.
        assert!(
            indexed_while_down < documents.len(),
            "killed mid-run: {indexed_while_down}"
        );
        let classified = observe::count(&content_store, "job.classified")
            .await
            .expect("count");
        assert_eq!(
            observe::count(&graph_store, "topic.document_indexed")
                .await
                .expect("count"),
            classified
        );
        let discovered = observe::count(&graph_store, "topic.entity_discovered")
            .await
            .expect("count");
        let entity_notes: usize = feeds
            .values()
            .flatten()
            .filter(|n| matches!(n, realtime::Notification::Entity { .. }))
            .count();
        assert!(discovered > 0 && entity_notes > 0);

        // The shortest path query (a recursive CTE) agrees with a breadth-first walk.
        for (from, to) in [
            ("Ada", "Darwin"),
            ("Lovelace", "Franklin"),
            ("Turing", "Curie"),
            ("Ada", "Nobody"),
        ] {
            assert_shortest(
                &graph,
                from,
                to,
                graph_view.shortest_path(from, to).await.expect("path"),
            );
        }
        let neighbours = graph_view.neighbours("Darwin").await.expect("neighbours");
        assert_eq!(neighbours, graph.neighbours("Darwin"));

        // Health: ready, over HTTP too.
        for health in [&content_health, &realtime_health] {
            let ready = health.ready().await;
            assert!(ready.is_ready(), "{}: {ready:?}", health.service());
        }
        let view_check = realtime_health.ready().await;
        assert!(
            view_check
                .checks()
                .iter()
                .any(|c| c.name == "view" && c.ok && c.detail == "redis answers"),
            "{view_check:?}"
        );
        let address = serve(content_health.clone().router()).await;
        let (status, body) = get(address, "/health/ready").await;
        assert_eq!(status, 200, "{body}");
        assert!(
            body.contains("\"name\":\"database\"") && body.contains("\"name\":\"bus\""),
            "{body}"
        );

        kill9(&mut child).await;
        let _ = stop.send(true);
        (graph, feeds)
    };
    let services =
        async { tokio::try_join!(content.run(stopped.clone()), realtime.run(stopped.clone())) };
    let (ran, (graph, feeds)) = tokio::join!(services, scenario);
    ran.expect("content and realtime ran");

    // The same documents through the embedded pipeline, nothing killed: the same read models.
    let clock = TestClock::default();
    let (pipeline, loops) = embedded::start(clock.clone()).await.expect("start");
    let (stop, stopped) = watch::channel(false);
    let baseline = async {
        for (session, user, topics, alerts) in SESSIONS {
            pipeline
                .open_session(session, user, topics, *alerts)
                .await
                .expect("open");
        }
        eventually!(
            "the sessions in the view",
            (pipeline.realtime.sessions().await.expect("sessions").len() == SESSIONS.len())
                .then_some(())
        );
        pipeline
            .submit(&documents, REQUEUE_AFTER)
            .await
            .expect("submit");
        eventually!("every job classified or re-queued", {
            let classified = observe::count(&pipeline.content, "job.classified")
                .await
                .expect("count");
            let retried = observe::count(&pipeline.content, "job.retried")
                .await
                .expect("count");
            let mut waiting = 0;
            for document in &documents {
                waiting += pipeline
                    .processing
                    .timeouts(&document.id)
                    .await
                    .expect("timeouts")
                    .len();
            }
            (classified + retried == documents.len() && waiting == retried).then_some(())
        });
        clock.advance(REQUEUE_AFTER + Duration::from_secs(1));
        eventually!(
            "settled",
            pipeline.settled().await.expect("settled").then_some(())
        );
        let result = (
            pipeline.graph.snapshot().await.expect("graph"),
            sorted(pipeline.realtime.feeds().await.expect("feeds")),
        );
        let _ = stop.send(true);
        result
    };
    let (ran, (baseline_graph, baseline_feeds)) = tokio::join!(loops.run(stopped), baseline);
    ran.expect("the embedded pipeline ran");
    assert_eq!(graph, baseline_graph, "the graph");
    // Which document first showed an entity depends on the order the jobs finished in, which
    // differs between two runs; what each user is told about does not.
    assert_eq!(
        without_documents(feeds),
        without_documents(baseline_feeds),
        "the feeds"
    );
    drop(nats);
}
