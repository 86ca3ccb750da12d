//! The application's projections, for the commands that run their code.

use std::future::Future;
use std::pin::Pin;

use factum::{Error, EventId, LogPosition};
use factum_postgres::PostgresStore;
use factum_postgres::projection::{PgProjection, PgProjectionRunner, Progress};

type Local<'a, T> = Pin<Box<dyn Future<Output = Result<T, Error>> + 'a>>;

/// What the CLI does with one registered projection.
pub(crate) trait Registered: Send + Sync {
    fn name(&self) -> &'static str;
    fn tables(&self) -> &'static [&'static str];
    fn rebuild<'a>(
        &'a self,
        store: PostgresStore,
        on_progress: &'a mut (dyn FnMut(&Progress) + Send),
    ) -> Local<'a, LogPosition>;
    fn retry_parked(&self, store: PostgresStore, event: EventId) -> Local<'_, bool>;
}

struct Entry<F> {
    name: &'static str,
    tables: &'static [&'static str],
    make: F,
}

impl<P, F> Registered for Entry<F>
where
    P: PgProjection,
    F: Fn(PostgresStore) -> PgProjectionRunner<P> + Send + Sync,
{
    fn name(&self) -> &'static str {
        self.name
    }

    fn tables(&self) -> &'static [&'static str] {
        self.tables
    }

    fn rebuild<'a>(
        &'a self,
        store: PostgresStore,
        on_progress: &'a mut (dyn FnMut(&Progress) + Send),
    ) -> Local<'a, LogPosition> {
        Box::pin(async move {
            let mut runner = (self.make)(store);
            runner.rebuild(on_progress).await
        })
    }

    fn retry_parked(&self, store: PostgresStore, event: EventId) -> Local<'_, bool> {
        Box::pin(async move {
            let mut runner = (self.make)(store);
            runner.retry_parked(event).await
        })
    }
}

/// The projections an application's binary knows, by [`PgProjection::NAME`]: what
/// `projections rebuild` and `dead-letters retry` run.
///
/// ```
/// # use factum::{BoxError, Envelope};
/// # use factum_postgres::projection::{PgProjection, PgProjectionRunner, ProjectionTx};
/// # #[derive(Debug)] struct Ping;
/// # impl factum::Event for Ping {
/// #     fn event_type(&self) -> &'static str { "ping" }
/// #     fn schema_version(&self) -> u32 { 1 }
/// #     fn event_types() -> &'static [&'static str] { &["ping"] }
/// #     fn encode(&self) -> Result<Box<factum::RawValue>, factum::EncodeError> { unimplemented!() }
/// #     fn decode(_: &factum::Stored<'_>) -> Result<Self, factum::DecodeError> { Ok(Ping) }
/// # }
/// # struct Pings;
/// # impl PgProjection for Pings {
/// #     const NAME: &'static str = "pings";
/// #     const TABLES: &'static [&'static str] = &["pings"];
/// #     type Event = Ping;
/// #     async fn apply(&mut self, _: &mut ProjectionTx<'_>, _: &Envelope<Ping>) -> Result<(), BoxError> { Ok(()) }
/// # }
/// // The runner as the service builds it (options included), on the CLI's store.
/// let registry = factum_cli::Registry::new()
///     .projection(|store| PgProjectionRunner::new(store, Pings).batch_size(1000));
/// assert_eq!(registry.names(), ["pings"]);
/// ```
#[derive(Default)]
pub struct Registry {
    projections: Vec<Box<dyn Registered>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("projections", &self.names())
            .finish()
    }
}

impl Registry {
    /// No projections: the commands of the plain `factum` binary.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers the projection that `make` builds a runner for, on the store the CLI connected
    /// to. A projection registered twice keeps its first registration.
    pub fn projection<P, F>(mut self, make: F) -> Self
    where
        P: PgProjection,
        F: Fn(PostgresStore) -> PgProjectionRunner<P> + Send + Sync + 'static,
    {
        if self.find(P::NAME).is_none() {
            self.projections.push(Box::new(Entry {
                name: P::NAME,
                tables: P::TABLES,
                make,
            }));
        }
        self
    }

    /// The registered projections' names, in registration order.
    pub fn names(&self) -> Vec<&'static str> {
        self.projections.iter().map(|p| p.name()).collect()
    }

    pub(crate) fn find(&self, name: &str) -> Option<&dyn Registered> {
        self.projections
            .iter()
            .find(|p| p.name() == name)
            .map(|p| p.as_ref())
    }
}
