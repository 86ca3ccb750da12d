//! The PostgreSQL backend for [factum](https://docs.rs/factum), on sqlx.
//!
//! It will store events as JSONB with their metadata, append atomically with optimistic
//! concurrency in one round trip, read the global log gap-safely, keep snapshots, and evolve its
//! schema through the versioned migrations in the repository's `migrations/` folder.
