//! Bulk import through COPY against PostgreSQL: history with its own ids, times and metadata,
//! read back by the conformance reads; re-runs of an interrupted import; refusals; and gap safety
//! for a subscriber reading the log while the import and live appends run.

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use factum::{
    AppendRequest, BoxError, CorrelationId, Error, EventFilter, EventId, EventMetadata, EventStore,
    ExpectedVersion, LogPosition, Metadata, NewEvent, RawValue, StreamId, StreamVersion,
};
use factum_postgres::{ImportOptions, ImportProgress, ImportedEvent, PostgresStore};
use factum_testkit::conformance::verify_log;
use factum_testkit::postgres::TestDatabase;
use futures_util::{StreamExt, stream};

async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(180), f)
        .await
        .expect("the test finished in time")
}

fn stream_id(id: &str) -> StreamId {
    StreamId::new(id).expect("stream id")
}

/// Legacy event `n` of `streams` interleaved streams: its own id, a time in 2019, metadata, a
/// correlation id per stream, a ~300-byte payload.
fn legacy(n: u64, streams: u64) -> ImportedEvent {
    let s = n % streams;
    let mut user = Metadata::default();
    user.insert("tenant", &format!("t{}", s % 3))
        .expect("metadata");
    let payload = format!(
        r#"{{"n":{n},"account":"acc-{s}","note":"legacy \"quoted\"\ttext {}"}}"#,
        "x".repeat(220)
    );
    let event = NewEvent {
        event_id: EventId::from_uuid(uuid::Uuid::from_u128(0x1000_0000_0000 + u128::from(n))),
        event_type: "ledger.posted".into(),
        schema_version: 2,
        payload: RawValue::from_string(payload).expect("json"),
        metadata: EventMetadata {
            correlation_id: Some(CorrelationId::from_uuid(uuid::Uuid::from_u128(
                u128::from(s) + 7,
            ))),
            causation_id: None,
            user,
        },
    };
    ImportedEvent::new(stream_id(&format!("ledger-{s}")), event, recorded_at(n))
}

fn recorded_at(n: u64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2019, 3, 1, 0, 0, 0)
        .single()
        .expect("time")
        + chrono::Duration::milliseconds(n as i64 * 1500)
}

fn input(
    events: Vec<ImportedEvent>,
) -> impl futures_util::Stream<Item = Result<ImportedEvent, BoxError>> {
    stream::iter(events.into_iter().map(Ok))
}

async fn import_all(
    store: &PostgresStore,
    events: Vec<ImportedEvent>,
    chunk: usize,
) -> Result<(factum_postgres::ImportReport, Vec<ImportProgress>), Error> {
    let mut progress = Vec::new();
    let report = store
        .import(
            input(events),
            &ImportOptions::default().with_chunk_size(chunk),
            |p| progress.push(p.clone()),
        )
        .await?;
    Ok((report, progress))
}

fn raw(json: &str) -> NewEvent {
    NewEvent {
        event_id: EventId::new(),
        event_type: "ledger.posted".into(),
        schema_version: 1,
        payload: RawValue::from_string(json.into()).expect("json"),
        metadata: EventMetadata::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_is_imported_with_its_ids_times_and_metadata_and_reads_back_whole() {
    bounded(async {
        let db = TestDatabase::create().await;
        let store = db.store();
        let (n, streams) = (2_500_u64, 40_u64);
        let events: Vec<ImportedEvent> = (0..n).map(|i| legacy(i, streams)).collect();
        let (report, progress) = import_all(&store, events.clone(), 300)
            .await
            .expect("import");
        assert_eq!(report.imported, n);
        assert_eq!(report.skipped, 0);
        assert_eq!(report.streams_created, streams);
        assert_eq!(report.chunks, 9, "2500 events in chunks of 300");
        assert_eq!(progress.len(), 9);
        assert!(progress.windows(2).all(|w| w[0].done < w[1].done));
        assert_eq!(progress.last().map(|p| p.done), Some(n));
        assert!(report.first_position < report.last_position);

        // The conformance reads: every id once, versions gapless, stream reads match the log;
        // and the log is the input, in input order, with everything it carried.
        let mut i = 0_usize;
        let summary = verify_log(&store, 700, |e| {
            let expected = &events[i];
            assert_eq!(
                e.event_id, expected.event.event_id,
                "log order is input order"
            );
            assert_eq!(e.stream_id, expected.stream_id);
            assert_eq!(e.stream_version.get(), (i as u64 / streams) + 1);
            assert_eq!(e.recorded_at, expected.recorded_at);
            assert_eq!(e.event_type, "ledger.posted");
            assert_eq!(e.schema_version, 2);
            assert_eq!(e.metadata, expected.event.metadata);
            let (a, b): (serde_json::Value, serde_json::Value) = (
                serde_json::from_str(e.payload.get()).expect("json"),
                serde_json::from_str(expected.event.payload.get()).expect("json"),
            );
            assert_eq!(a, b, "payload of input event #{i}");
            i += 1;
        })
        .await;
        assert_eq!((summary.events, summary.streams), (n, streams));
        // The streams rows are the version authority afterwards: appends continue them.
        let first = stream_id("ledger-0");
        let at = store.stream_version(&first).await.expect("version");
        assert_eq!(at.get(), n / streams + u64::from(n % streams > 0));
        store
            .append(
                AppendRequest::new(first.clone(), vec![raw(r#"{"n":-1}"#)])
                    .expected_version(ExpectedVersion::Exact(at)),
            )
            .await
            .expect("an append after the import");
        let stale = store
            .append(
                AppendRequest::new(stream_id("ledger-1"), vec![raw("{}")])
                    .expected_version(ExpectedVersion::NoStream),
            )
            .await
            .expect_err("the stream exists");
        assert!(stale.is_conflict(), "{stale:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rerun_of_an_interrupted_import_stores_every_event_once() {
    bounded(async {
        let db = TestDatabase::create().await;
        let store = db.store();
        let events: Vec<ImportedEvent> = (0..1_000).map(|i| legacy(i, 7)).collect();

        // The input fails at event #450: chunks of 200, so 400 events are committed and the
        // chunk being read is not sent at all.
        let failing = stream::iter(events.clone().into_iter().enumerate().map(|(i, e)| {
            if i == 450 {
                Err::<ImportedEvent, BoxError>("the legacy export is truncated".into())
            } else {
                Ok(e)
            }
        }));
        let mut committed = 0;
        let error = store
            .import(
                failing,
                &ImportOptions::default().with_chunk_size(200),
                |p| committed = p.done,
            )
            .await
            .expect_err("the input failed");
        assert_eq!(committed, 400);
        let text = format!(
            "{error} / {}",
            std::error::Error::source(&error)
                .map(|s| s.to_string())
                .unwrap_or_default()
        );
        assert!(text.contains("#450"), "{text}");
        let count = |db: &TestDatabase| {
            let pool = db.pool().clone();
            async move {
                sqlx::query_scalar::<_, i64>("SELECT count(*) FROM factum.events")
                    .fetch_one(&pool)
                    .await
                    .expect("count")
            }
        };
        assert_eq!(count(&db).await, 400);

        // A chunk the database refuses (a NUL escape, which jsonb cannot store) is rolled back
        // whole, and the error names the input event.
        let mut poisoned = events.clone();
        poisoned[650].event.payload =
            RawValue::from_string(r#"{"bad":"\u0000"}"#.into()).expect("json");
        let error = import_all(&store, poisoned, 200)
            .await
            .expect_err("refused");
        let chain = format!(
            "{error}: {}",
            std::error::Error::source(&error)
                .map(|s| s.to_string())
                .unwrap_or_default()
        );
        assert!(chain.contains("input event #650"), "{chain}");
        assert!(chain.contains("chunk 4"), "{chain}");
        assert_eq!(
            count(&db).await,
            600,
            "chunks 1-3 stored (400 before, 200 new), chunk 4 not"
        );

        // The re-run with the intact input skips what is stored and stores the rest once.
        let (report, _) = import_all(&store, events.clone(), 200)
            .await
            .expect("re-run");
        assert_eq!((report.skipped, report.imported), (600, 400));
        let (again, _) = import_all(&store, events.clone(), 333)
            .await
            .expect("a third run");
        assert_eq!(
            (again.skipped, again.imported, again.last_position),
            (1000, 0, None)
        );
        let mut i = 0;
        let summary = verify_log(&store, 1000, |e| {
            assert_eq!(e.event_id, events[i].event.event_id);
            i += 1;
        })
        .await;
        assert_eq!(summary.events, 1000);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_closed_streams_and_wrong_versions_are_refused_and_store_nothing() {
    bounded(async {
        let db = TestDatabase::create().await;
        let store = db.store();
        let live = stream_id("ledger-live");
        let appended = raw(r#"{"n":1}"#);
        store
            .append(AppendRequest::new(
                live.clone(),
                vec![appended.clone(), raw(r#"{"n":2}"#)],
            ))
            .await
            .expect("live events");
        let at = |stream: &StreamId, n: u64, event: NewEvent| {
            ImportedEvent::new(stream.clone(), event, recorded_at(n))
        };
        let other = stream_id("ledger-other");
        // Events stored, counted in the table: `head()` is the gap-safe head, which another
        // test's open transaction (anywhere on the cluster) may hold back.
        let stored = || {
            let pool = db.pool().clone();
            async move {
                sqlx::query_scalar::<_, i64>("SELECT count(*) FROM factum.events")
                    .fetch_one(&pool)
                    .await
                    .expect("count")
            }
        };
        let head_before = stored().await;

        // An id stored as another event (other stream): refused, naming it.
        let mut same_id = raw(r#"{"n":1}"#);
        same_id.event_id = appended.event_id;
        let error = import_all(
            &store,
            vec![at(&other, 0, raw("{}")), at(&other, 1, same_id.clone())],
            10,
        )
        .await
        .expect_err("duplicate id");
        assert!(
            matches!(&error, Error::DuplicateEventId { event_id, existing_stream, .. }
                if *event_id == appended.event_id && *existing_stream == live),
            "{error:?}"
        );
        assert!(error.to_string().contains(&appended.event_id.to_string()));
        // Personal fields in plaintext form: the import does not encrypt, so it refuses them.
        let error = import_all(
            &store,
            vec![
                at(&other, 0, raw("{}")),
                at(
                    &other,
                    1,
                    raw(r#"{"name":{"factum:personal":"Ada","subject":"c-1"}}"#),
                ),
            ],
            10,
        )
        .await
        .expect_err("plaintext personal data");
        assert!(
            matches!(&error, Error::InvalidArgument(why)
                if why.contains("input event #1") && why.contains("plaintext")),
            "{error:?}"
        );
        assert_eq!(stored().await, head_before, "nothing stored");
        // The same id with another payload in the same stream: not the same event either.
        let mut changed = raw(r#"{"n":99}"#);
        changed.event_id = appended.event_id;
        let error = import_all(&store, vec![at(&live, 0, changed)], 10)
            .await
            .expect_err("changed payload");
        assert!(matches!(error, Error::DuplicateEventId { .. }), "{error:?}");
        // The same event again (same stream, type, version and payload): skipped.
        let (report, _) = import_all(
            &store,
            vec![at(&live, 0, appended.clone()).at_version(StreamVersion::new(1))],
            10,
        )
        .await
        .expect("the same event");
        assert_eq!((report.skipped, report.imported), (1, 0));
        // An id twice in the input.
        let twice = raw("{}");
        let error = import_all(
            &store,
            vec![at(&other, 0, twice.clone()), at(&other, 1, twice)],
            10,
        )
        .await
        .expect_err("twice");
        assert!(
            matches!(error, Error::InvalidArgument(ref m) if m.contains("twice")),
            "{error:?}"
        );
        // A version the stream is not at.
        let error = import_all(
            &store,
            vec![at(&live, 0, raw("{}")).at_version(StreamVersion::new(5))],
            10,
        )
        .await
        .expect_err("wrong version");
        assert!(
            matches!(error, Error::Conflict { actual, .. } if actual.get() == 2),
            "{error:?}"
        );
        // Archived and deleted streams.
        let archived = stream_id("ledger-archived");
        let deleted = stream_id("ledger-deleted");
        for s in [&archived, &deleted] {
            store
                .append(AppendRequest::new(s.clone(), vec![raw("{}")]))
                .await
                .expect("append");
        }
        store.archive_stream(&archived).await.expect("archive");
        store.delete_stream(&deleted).await.expect("delete");
        let head_closed = stored().await;
        assert!(head_closed > head_before);
        let error = import_all(
            &store,
            vec![at(&other, 0, raw("{}")), at(&archived, 1, raw("{}"))],
            10,
        )
        .await
        .expect_err("archived");
        assert!(
            matches!(error, Error::StreamArchived { ref stream } if *stream == archived),
            "{error:?}"
        );
        let error = import_all(&store, vec![at(&deleted, 0, raw("{}"))], 10)
            .await
            .expect_err("deleted");
        assert!(
            matches!(error, Error::StreamDeleted { ref stream } if *stream == deleted),
            "{error:?}"
        );

        // Nothing of any refused chunk was stored: no stream row, no event.
        assert_eq!(stored().await, head_closed);
        assert_eq!(store.stream_version(&other).await.expect("v").get(), 0);
        assert_eq!(store.stream_version(&live).await.expect("v").get(), 2);

        // An import continues an existing stream from its version.
        let (report, _) = import_all(
            &store,
            vec![
                at(&live, 10, raw(r#"{"n":3}"#)).at_version(StreamVersion::new(3)),
                at(&live, 11, raw(r#"{"n":4}"#)),
            ],
            10,
        )
        .await
        .expect("continue");
        assert_eq!(
            (
                report.imported,
                report.streams_extended,
                report.streams_created
            ),
            (2, 1, 0)
        );
        assert_eq!(store.stream_version(&live).await.expect("v").get(), 4);
    })
    .await;
}

/// An id in a chunk that the chunk before it stores: the next chunk is looked up while that one
/// is still being stored (pipelined), so it must look again rather than miss it. The same event
/// again is skipped; another event under the id is refused, and the chunk before it stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_stored_by_the_chunk_before_is_judged_like_any_stored_id() {
    bounded(async {
        let db = TestDatabase::create().await;
        let store = db.store();
        let at = |stream: &StreamId, n: u64, event: NewEvent| {
            ImportedEvent::new(stream.clone(), event, recorded_at(n))
        };
        let a = stream_id("ledger-a");
        let (e1, e2, e3) = (raw(r#"{"n":1}"#), raw(r#"{"n":2}"#), raw(r#"{"n":3}"#));
        // Chunks of two: [e1, e2] then [e2 again, e3].
        let (report, progress) = import_all(
            &store,
            vec![
                at(&a, 0, e1.clone()),
                at(&a, 1, e2.clone()),
                at(&a, 1, e2.clone()),
                at(&a, 2, e3.clone()),
            ],
            2,
        )
        .await
        .expect("the repeat is skipped");
        assert_eq!((report.imported, report.skipped, report.chunks), (3, 1, 2));
        assert_eq!(progress.len(), 2);
        let versions: Vec<(EventId, u64)> = store
            .read_stream(&a, StreamVersion::INITIAL)
            .map(|e| {
                let e = e.expect("event");
                (e.event_id, e.stream_version.get())
            })
            .collect::<Vec<_>>()
            .await;
        assert_eq!(
            versions,
            [(e1.event_id, 1), (e2.event_id, 2), (e3.event_id, 3)]
        );

        // [f1, f2] then [f2 with another payload]: the second chunk is refused by name.
        let b = stream_id("ledger-b");
        let (f1, f2) = (raw(r#"{"n":1}"#), raw(r#"{"n":2}"#));
        let mut changed = raw(r#"{"n":99}"#);
        changed.event_id = f2.event_id;
        let error = import_all(
            &store,
            vec![at(&b, 0, f1), at(&b, 1, f2.clone()), at(&b, 2, changed)],
            2,
        )
        .await
        .expect_err("another event under a stored id");
        assert!(
            matches!(&error, Error::DuplicateEventId { event_id, .. } if *event_id == f2.event_id),
            "{error:?}"
        );
        assert_eq!(store.stream_version(&b).await.expect("v").get(), 2);
    })
    .await;
}

/// A subscriber reads the log while an import (in chunks) and live appends run on other
/// connections: it sees every event exactly once, in log order, with nothing skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subscriber_reading_during_an_import_and_appends_sees_every_event_once() {
    bounded(async {
        let db = TestDatabase::create().await;
        let store = db.store();
        let n = 6_000_u64;
        let events: Vec<ImportedEvent> = (0..n).map(|i| legacy(i, 50)).collect();
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));

        let reader = {
            let store = store.clone();
            let done = done.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut after = LogPosition::START;
                loop {
                    let finished = done.load(std::sync::atomic::Ordering::SeqCst);
                    let page = store
                        .read_all(after, 500, &EventFilter::all())
                        .await
                        .expect("read_all");
                    if let Some(last) = page.last() {
                        after = last.position;
                    } else if finished {
                        return seen;
                    } else {
                        // A poll interval, not a synchronisation: the loop ends on `done`.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    seen.extend(page.into_iter().map(|e| e.event_id));
                }
            })
        };
        let writers: Vec<_> = (0..3)
            .map(|w| {
                let store = store.clone();
                tokio::spawn(async move {
                    let id = stream_id(&format!("live-{w}"));
                    for v in 0..60_u64 {
                        store
                            .append(
                                AppendRequest::new(id.clone(), vec![raw(r#"{"live":true}"#)])
                                    .expected_version(ExpectedVersion::Exact(StreamVersion::new(
                                        v,
                                    ))),
                            )
                            .await
                            .expect("live append");
                    }
                })
            })
            .collect();
        let (report, _) = import_all(&store, events, 400).await.expect("import");
        assert_eq!(report.imported, n);
        for w in writers {
            w.await.expect("writer");
        }
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        let seen = reader.await.expect("reader");
        let unique: HashSet<_> = seen.iter().collect();
        assert_eq!(
            unique.len(),
            seen.len(),
            "the subscriber saw an event twice"
        );
        assert_eq!(seen.len() as u64, n + 180, "the subscriber missed events");
        let mut log = Vec::new();
        let summary = verify_log(&store, 1000, |e| log.push(e.event_id)).await;
        assert_eq!(summary.events, n + 180);
        assert_eq!(log, seen, "the subscriber read the log's order");
    })
    .await;
}
