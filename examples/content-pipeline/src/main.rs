//! The content pipeline: `cargo run -p content-pipeline` runs the three services in this process
//! on in-memory stores and the in-process bus (no server), printing what happens.
//!
//! ```text
//! cargo run -p content-pipeline -- [--docs DIR] [--serve] [--servers]
//! ```
//!
//! * `--docs DIR`: the `.txt` files of `DIR` instead of the built-in corpus;
//! * `--serve`: keep running afterwards, serving each service's health and the graph's queries
//!   over HTTP (content on 127.0.0.1:8081, graph on :8082, realtime on :8083) until Ctrl-C;
//! * `--servers`: run on PostgreSQL (`DATABASE_URL`, a database per service created on that
//!   server), NATS JetStream (`NATS_URL`) and Redis (`REDIS_URL`) instead; see the README.

#![allow(
    clippy::print_stdout,
    reason = "an example program: its output is the point"
)]

use std::time::Duration;

use content_pipeline::content::{self, Document};
use content_pipeline::embedded;
use content_pipeline::graph::GraphQueries;
use content_pipeline::http::{graph_routes, serve};
use content_pipeline::realtime::RealtimeView;
use factum::saga::SystemClock;
use tokio::sync::watch;

/// How long a job whose first classification failed waits for its second.
const REQUEUE_AFTER: Duration = Duration::from_millis(300);

/// The sessions the demo opens before any document arrives: (session, user, topics, alerts).
const SESSIONS: &[(&str, &str, &[&str], bool)] = &[
    ("s-ada", "ada", &["computing"], true),
    ("s-grace", "grace", &["physics", "biology"], false),
    ("s-alan", "alan", &["computing", "biology"], false),
];

struct Args {
    documents: Vec<Document>,
    serve: bool,
    servers: bool,
}

fn args() -> Result<Args, Box<dyn std::error::Error>> {
    let mut parsed = Args {
        documents: content::corpus(),
        serve: false,
        servers: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--docs" => {
                let dir = args.next().ok_or("--docs needs a directory")?;
                parsed.documents = content::read_dir(std::path::Path::new(&dir))?;
                if parsed.documents.is_empty() {
                    return Err(format!("no .txt file in {dir}").into());
                }
            }
            "--serve" => parsed.serve = true,
            "--servers" => parsed.servers = true,
            other => return Err(format!("unknown argument {other:?} (see the README)").into()),
        }
    }
    Ok(parsed)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = args()?;
    if args.servers {
        return servers::run(args.documents, args.serve).await;
    }
    let (pipeline, loops) = embedded::start(SystemClock).await?;
    let (stop, stopped) = watch::channel(false);
    let mut pushes = pipeline.realtime.subscribe();
    let scenario = async {
        for (session, user, topics, alerts) in SESSIONS {
            pipeline
                .open_session(session, user, topics, *alerts)
                .await?;
        }
        while pipeline.realtime.sessions().await?.len() < SESSIONS.len() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        println!("realtime: {} sessions open", SESSIONS.len());
        println!(
            "content: submitting {} documents (a failed classification is re-queued for {} ms)",
            args.documents.len(),
            REQUEUE_AFTER.as_millis()
        );
        pipeline.submit(&args.documents, REQUEUE_AFTER).await?;
        if std::env::var_os("PIPELINE_DEBUG").is_some() {
            eprintln!("submitted");
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !pipeline.settled().await? {
            if std::env::var_os("PIPELINE_DEBUG").is_some() {
                eprintln!(
                    "not settled: {:?}",
                    content_pipeline::observe::jobs_done(&pipeline.content).await?
                );
            }
            if tokio::time::Instant::now() > deadline {
                return Err("the pipeline did not settle within 30 s".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        report(
            &pipeline.content,
            &pipeline.graph,
            &pipeline.realtime,
            &pipeline.health,
        )
        .await?;
        if args.serve {
            let routers = [
                pipeline.health[0].clone().router(),
                graph_routes(pipeline.graph.clone()).merge(pipeline.health[1].clone().router()),
                pipeline.health[2].clone().router(),
            ];
            for (port, router) in (8081..).zip(routers) {
                let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
                let mut stopped = stop.subscribe();
                tokio::spawn(serve(listener, router, async move {
                    let _ = stopped.wait_for(|s| *s).await;
                }));
            }
            println!(
                "serving: curl 127.0.0.1:8081/health/ready, 127.0.0.1:8082/graph/neighbours/Ada, \
                 127.0.0.1:8082/graph/path/Ada/Darwin, 127.0.0.1:8083/health/live (Ctrl-C stops)"
            );
            tokio::signal::ctrl_c().await?;
        }
        Ok::<_, Box<dyn std::error::Error>>(())
    };
    let printer = async {
        let mut stopped = stopped.clone();
        loop {
            tokio::select! {
                pushed = pushes.recv() => match pushed {
                    Ok(p) => println!("  → {} ({}): {}", p.user, p.session, p.notification),
                    Err(_) => break,
                },
                _ = stopped.wait_for(|s| *s) => break,
            }
        }
    };
    // The scenario stops the services when it ends, whatever its outcome; a service that
    // stops on its own ends the program with its error.
    let scenario = async {
        let outcome = scenario.await;
        let _ = stop.send(true);
        outcome
    };
    let services = loops.run(stopped.clone());
    let work = async { tokio::join!(scenario, printer).0 };
    tokio::pin!(services, work);
    tokio::select! {
        ran = &mut services => {
            // Stopped on request (the scenario ended), or on an error.
            ran.map_err(|e| format!("a service stopped: {e}"))?;
            work.await
        }
        outcome = &mut work => {
            outcome?;
            services.await?;
            Ok(())
        }
    }
}

/// Prints each job's log, the graph, the feeds and each service's readiness.
async fn report(
    content: &impl factum::EventStore,
    graph: &impl GraphQueries,
    view: &impl RealtimeView,
    health: &[content_pipeline::http::ServiceHealth],
) -> Result<(), Box<dyn std::error::Error>> {
    use factum::EventFilter;
    println!("\ncontent-processing, its log:");
    let jobs =
        content_pipeline::observe::events(content, &EventFilter::all().with_categories(["job"]))
            .await?;
    for event in jobs {
        let job = event.decode::<content::JobEvent>()?;
        let what = match &job.event {
            content::JobEvent::Submitted { document, .. } => {
                format!("submitted {:?}", document.title)
            }
            content::JobEvent::Extracted { terms } => format!("extracted {}", terms.join(", ")),
            content::JobEvent::Classified { topic, relaxed, .. } => format!(
                "classified as {topic}{}",
                if *relaxed {
                    " (second, relaxed attempt)"
                } else {
                    ""
                }
            ),
            content::JobEvent::Retried { reason, .. } => format!("re-queued: {reason}"),
            content::JobEvent::Failed { reason } => format!("FAILED: {reason}"),
        };
        println!("  {:<16} {what}", job.stream_id.as_str());
    }
    let snapshot = graph.snapshot().await?;
    println!(
        "\nknowledge-graph: {} entities, {} relationships",
        snapshot.entities.len(),
        snapshot.edges.len()
    );
    for entity in ["Ada", "Einstein", "Darwin"] {
        let neighbours = graph.neighbours(entity).await?;
        let names: Vec<String> = neighbours
            .iter()
            .map(|n| format!("{} ({})", n.entity, n.weight))
            .collect();
        println!("  neighbours of {entity}: {}", names.join(", "));
    }
    for (from, to) in [
        ("Ada", "Turing"),
        ("Lovelace", "Darwin"),
        ("Mendel", "Franklin"),
    ] {
        match graph.shortest_path(from, to).await? {
            Some(path) => println!("  path {from} → {to}: {}", path.join(" → ")),
            None => println!("  path {from} → {to}: none"),
        }
    }
    println!("\nrealtime-communication, the feeds:");
    for (user, feed) in view.feeds().await? {
        println!("  {user}: {} notifications", feed.len());
        for notification in feed
            .iter()
            .filter(|n| matches!(n, content_pipeline::realtime::Notification::Failure { .. }))
        {
            println!("    {notification}");
        }
    }
    println!("\nhealth:");
    for health in health {
        let ready = health.ready().await;
        println!(
            "  {}: ready={} {}",
            health.service(),
            ready.is_ready(),
            serde_json::to_string(&ready)?
        );
    }
    Ok(())
}

/// `--servers`: the three services on PostgreSQL (a database each) and NATS JetStream.
mod servers {
    use std::time::Duration;

    use content_pipeline::content::{self, Document};
    use content_pipeline::graph;
    use content_pipeline::http::{graph_routes, serve};
    use content_pipeline::observe;
    use content_pipeline::postgres::{
        self as pg, ContentService, GraphService, RedisRealtimeService,
    };
    use content_pipeline::realtime::{self, RealtimeView};
    use factum::saga::SystemClock;
    use factum_nats::JetStreamBus;
    use tokio::sync::watch;

    pub(crate) async fn run(
        documents: Vec<Document>,
        serve_http: bool,
    ) -> Result<(), Box<dyn std::error::Error>> {
        let admin = std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
        let nats = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
        let redis =
            std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
        let [content_url, graph_url, realtime_url] = pg::create_databases(&admin).await?;
        println!(
            "databases: {content_url}, {graph_url}, {realtime_url}; bus: {nats}; view: {redis}"
        );
        let content_store = pg::connect(&content_url, content::service()).await?;
        let graph_store = pg::connect(&graph_url, graph::service()).await?;
        let realtime_store = pg::connect(&realtime_url, realtime::service()).await?;
        let bus = JetStreamBus::connect(&nats).await?;
        pg::ensure_streams(&bus).await?;
        let connected = |bus: &JetStreamBus| {
            let bus = bus.clone();
            move || bus.is_connected()
        };
        let content = ContentService::new(
            content_store.clone(),
            bus.clone(),
            SystemClock,
            connected(&bus),
        );
        let graph = GraphService::new(graph_store.clone(), bus.clone(), connected(&bus)).await?;
        let keyspace = factum_redis::RedisKeyspace::connect(&redis, "pipeline-realtime").await?;
        let realtime = RedisRealtimeService::new(
            realtime_store.clone(),
            bus.clone(),
            &keyspace,
            connected(&bus),
        );
        let health = [
            content.health.clone(),
            graph.health.clone(),
            realtime.health.clone(),
        ];
        let (graph_view, view) = (graph.graph.clone(), realtime.view.clone());
        let projection = graph.projection_status();
        let [from_graph, from_content] = realtime.inbound_status();
        let (stop, stopped) = watch::channel(false);
        let scenario = async {
            for (session, user, topics, alerts) in super::SESSIONS {
                // Opened by an earlier run: fine.
                let _ = content_pipeline::embedded::open_session(
                    &realtime_store,
                    session,
                    user,
                    topics,
                    *alerts,
                )
                .await;
            }
            while view.sessions().await?.len() < super::SESSIONS.len() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            println!("content: submitting {} documents", documents.len());
            content_pipeline::embedded::submit(&content_store, &documents, super::REQUEUE_AFTER)
                .await?;
            let started = tokio::time::Instant::now();
            let deadline = started + Duration::from_secs(60);
            loop {
                let (done, classified, failed) = observe::jobs_done(&content_store).await?;
                let indexed = observe::count(&graph_store, "topic.document_indexed").await?;
                let discovered = observe::count(&graph_store, "topic.entity_discovered").await?;
                let head = observe::last_position(&graph_store, "topic.document_indexed").await?;
                let told = |s: &watch::Receiver<factum::bus::InboundStatus>| {
                    let s = s.borrow();
                    (s.handled + s.duplicates) as usize
                };
                // This process's counters: everything handled since it started...
                let handled_here = projection.borrow().position >= head
                    && told(&from_graph) >= discovered
                    && told(&from_content) >= failed;
                // ...or, for a run after an earlier one (nothing new to handle), every consumer
                // caught up for a while (the inbound consumers refresh their lag each second).
                let quiet = |s: &watch::Receiver<factum::bus::InboundStatus>| {
                    let s = s.borrow();
                    s.state == factum::bus::InboundState::Running && s.lag_messages == 0
                };
                let caught_up = started.elapsed() > Duration::from_secs(3)
                    && projection.borrow().state == factum::subscription::SubscriptionState::Live
                    && quiet(&from_graph)
                    && quiet(&from_content);
                if done && indexed == classified && (handled_here || caught_up) {
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    return Err("the pipeline did not settle within 60 s".into());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            super::report(&content_store, &graph_view, &view, &health).await?;
            if serve_http {
                let routers = [
                    health[0].clone().router(),
                    graph_routes(graph_view.clone()).merge(health[1].clone().router()),
                    health[2].clone().router(),
                ];
                for (port, router) in (8081..).zip(routers) {
                    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
                    let mut stopped = stop.subscribe();
                    tokio::spawn(serve(listener, router, async move {
                        let _ = stopped.wait_for(|s| *s).await;
                    }));
                }
                println!("serving on 127.0.0.1:8081-8083 (Ctrl-C stops)");
                tokio::signal::ctrl_c().await?;
            }
            Ok::<_, Box<dyn std::error::Error>>(())
        };
        let scenario = async {
            let outcome = scenario.await;
            let _ = stop.send(true);
            outcome
        };
        let services = async {
            tokio::try_join!(
                content.run(stopped.clone()),
                graph.run(stopped.clone()),
                realtime.run(stopped.clone()),
            )
        };
        let (ran, outcome) = tokio::join!(services, scenario);
        outcome?;
        ran?;
        Ok(())
    }
}
