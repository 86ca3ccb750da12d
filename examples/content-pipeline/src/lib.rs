//! A content pipeline of three services, each with its own store, cooperating only through
//! events on the bus:
//!
//! * [`content`] — **content-processing** ingests documents and runs a processing job per
//!   document (submitted, extracted, classified; re-queued once when classification fails, then
//!   failed after a durable timeout), driven by the [`content::Processing`] saga. It publishes
//!   `document.classified` and `document.failed`.
//! * [`graph`] — **knowledge-graph** indexes classified documents in their topics, publishes
//!   `entity.discovered` for each entity new to a topic, and keeps a graph read model (entities,
//!   co-occurrence edges) with neighbour and shortest-path queries.
//! * [`realtime`] — **realtime-communication** keeps user sessions and per-user notification
//!   feeds, told of new entities in the topics a user follows and of failed documents.
//!
//! [`embedded`] runs it all in one process (in-memory stores, the in-process bus):
//! `cargo run -p content-pipeline`. [`postgres`] runs each service on a PostgreSQL database of its
//! own, over any bus (NATS JetStream with `factum-nats`), realtime's view in Redis
//! ([`redis_view`], on `factum-redis`). [`http`] serves each service's health
//! and the graph's queries with axum. The book's chapter "A content pipeline" walks through it.

pub mod content;
pub mod embedded;
pub mod graph;
pub mod http;
pub mod observe;
pub mod postgres;
pub mod realtime;
pub mod redis_view;

/// The book's chapter on this example, compiled so it cannot drift from the code.
#[cfg(doctest)]
#[doc = include_str!("../../../docs/src/content-pipeline.md")]
mod chapter {}
