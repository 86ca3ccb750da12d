//! The whole pipeline on the in-process bus and in-memory stores: N documents in; the graph and
//! every user's feed equal a fold of the services' logs; the re-queue timeout fires on a test
//! clock; the health endpoints and graph queries answer over HTTP.

mod support;

use std::time::Duration;

use content_pipeline::embedded;
use content_pipeline::graph::GraphQueries;
use content_pipeline::http::graph_routes;
use content_pipeline::observe;
use content_pipeline::realtime::RealtimeView;
use factum::saga::TestClock;
use tokio::sync::watch;

use support::*;

const REQUEUE_AFTER: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_graph_and_the_feeds_equal_a_fold_of_the_services_events() {
    let clock = TestClock::default();
    let (pipeline, loops) = embedded::start(clock.clone()).await.expect("start");
    let (stop, stopped) = watch::channel(false);
    let documents = documents(40);

    let scenario = async {
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

        // Every job classified, or re-queued with its timeout pending: the clock has not moved.
        let requeued = eventually!("every job classified or re-queued", {
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
            (classified + retried == documents.len() && waiting == retried).then_some(retried)
        });
        assert!(requeued > 0, "some documents need the second attempt");
        assert_eq!(
            observe::count(&pipeline.content, "job.failed")
                .await
                .expect("count"),
            0,
            "nothing fails before the timeout"
        );
        assert_eq!(pipeline.processing.status().borrow().fired, 0);

        // The timeout fires: the second, relaxed attempt classifies some and fails the others.
        clock.advance(REQUEUE_AFTER + Duration::from_secs(1));
        eventually!(
            "the pipeline settled",
            pipeline.settled().await.expect("settled").then_some(())
        );
        let failed = observe::count(&pipeline.content, "job.failed")
            .await
            .expect("count");
        assert!(
            failed > 0 && failed < requeued,
            "{failed} of {requeued} re-queued jobs failed"
        );
        assert_eq!(
            pipeline.processing.status().borrow().fired as usize,
            requeued
        );

        // The read models equal the folds of the logs.
        let graph = pipeline.graph.snapshot().await.expect("graph");
        let expected = expected_graph(&pipeline.content).await;
        assert!(
            expected.edges.len() > 20,
            "a graph worth the name: {expected:?}"
        );
        assert_eq!(graph, expected);
        let feeds = sorted(pipeline.realtime.feeds().await.expect("feeds"));
        let expected_feeds = expected_feeds(
            &pipeline.content,
            &pipeline.graph_store,
            &pipeline.realtime_store,
        )
        .await;
        assert_eq!(
            expected_feeds.keys().collect::<Vec<_>>(),
            ["ada", "alan", "grace"],
            "everybody but nobody"
        );
        assert_eq!(feeds, expected_feeds);
        let delivered: usize = feeds.values().map(Vec::len).sum();
        assert!(delivered > 50, "{delivered}");

        // Queries: neighbours as the edges say, paths as short as a breadth-first walk says.
        for entity in ["Ada", "Darwin", "Einstein", "Turing"] {
            let neighbours = pipeline.graph.neighbours(entity).await.expect("neighbours");
            let mut expected: Vec<(String, u32)> = graph
                .edges
                .iter()
                .filter_map(|((a, b), w)| {
                    (a == entity)
                        .then(|| (b.clone(), *w))
                        .or_else(|| (b == entity).then(|| (a.clone(), *w)))
                })
                .collect();
            expected.sort_by(|x, y| y.1.cmp(&x.1).then_with(|| x.0.cmp(&y.0)));
            let found: Vec<(String, u32)> = neighbours
                .into_iter()
                .map(|n| (n.entity, n.weight))
                .collect();
            assert_eq!(found, expected, "neighbours of {entity}");
        }
        for (from, to) in [
            ("Ada", "Darwin"),
            ("Lovelace", "Franklin"),
            ("Turing", "Curie"),
            ("FitzRoy", "Ada"),
            ("Ada", "Nobody"),
        ] {
            let path = pipeline.graph.shortest_path(from, to).await.expect("path");
            assert_shortest(&graph, from, to, path);
        }

        // Health: every service ready, as a value and over HTTP; the graph's queries over HTTP.
        for health in &pipeline.health {
            let ready = health.ready().await;
            assert!(ready.is_ready(), "{}: {ready:?}", health.service());
            assert!(health.live().is_live(), "{}", health.service());
        }
        let graph_api =
            serve(graph_routes(pipeline.graph.clone()).merge(pipeline.health[1].clone().router()))
                .await;
        let (status, body) = get(graph_api, "/health/ready").await;
        assert_eq!(status, 200, "{body}");
        let body: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(body["ready"], true);
        let names: Vec<&str> = body["checks"]
            .as_array()
            .expect("checks")
            .iter()
            .filter_map(|c| c["name"].as_str())
            .collect();
        assert!(
            names.contains(&"inbound graph-from-content")
                && names.contains(&"consumer graph")
                && names.iter().any(|n| n.starts_with("relay ")),
            "{names:?}"
        );
        let (status, body) = get(graph_api, "/graph/path/Ada/Darwin").await;
        assert_eq!(status, 200, "{body}");
        let path: Vec<String> = serde_json::from_str(&body).expect("a path");
        assert_shortest(&graph, "Ada", "Darwin", Some(path));
        let (status, _) = get(graph_api, "/graph/path/Ada/Nobody").await;
        assert_eq!(status, 404);
        let (status, body) = get(graph_api, "/graph/neighbours/Darwin").await;
        assert_eq!(status, 200);
        assert!(body.contains("\"entity\":\"Charles\""), "{body}");
        let (status, body) = get(graph_api, "/health/live").await;
        assert_eq!(status, 200, "{body}");
        let body: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(body["live"], true);

        let _ = stop.send(true);
    };
    let (ran, ()) = tokio::join!(loops.run(stopped), scenario);
    ran.expect("the services ran");
}
