//! Testing tools for [factum](https://docs.rs/factum): given-when-then fixtures for aggregates,
//! projections and process managers, the conformance suite every backend must pass, and the
//! throwaway-PostgreSQL harness for database tests.

pub mod conformance;
#[cfg(feature = "postgres")]
pub mod postgres;
