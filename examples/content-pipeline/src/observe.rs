//! Reading what the services did: their logs, whole, for printing, waiting and folding.

use factum::{Error, EventFilter, EventStore, LogPosition, RecordedEvent};

/// Every event of `store`'s log that `filter` lets through, in log order.
pub async fn events<S: EventStore>(
    store: &S,
    filter: &EventFilter,
) -> Result<Vec<RecordedEvent>, Error> {
    let mut all = Vec::new();
    let mut after = LogPosition::START;
    loop {
        let page = store.read_all(after, 1_000, filter).await?;
        match page.last() {
            Some(last) => after = last.position,
            None => return Ok(all),
        }
        all.extend(page);
    }
}

/// How many events of `event_type` `store`'s log holds.
pub async fn count<S: EventStore>(store: &S, event_type: &str) -> Result<usize, Error> {
    Ok(
        events(store, &EventFilter::all().with_event_types([event_type]))
            .await?
            .len(),
    )
}

/// Whether every submitted job of content's `store` is classified or failed; with how many of
/// each.
pub async fn jobs_done<S: EventStore>(store: &S) -> Result<(bool, usize, usize), Error> {
    let submitted = count(store, "job.submitted").await?;
    let classified = count(store, "job.classified").await?;
    let failed = count(store, "job.failed").await?;
    Ok((submitted == classified + failed, classified, failed))
}

/// The position of the last event of `event_type` in `store`'s log (the start when none): how
/// far a consumer of that type must have come to have seen them all.
pub async fn last_position<S: EventStore>(
    store: &S,
    event_type: &str,
) -> Result<LogPosition, Error> {
    Ok(
        events(store, &EventFilter::all().with_event_types([event_type]))
            .await?
            .last()
            .map_or(LogPosition::START, |e| e.position),
    )
}
