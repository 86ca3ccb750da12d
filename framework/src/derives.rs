//! The derive macros, re-exported with their documentation.

/// Derives [`Event`](trait@crate::Event).
pub use factum_macros::Event;

/// Derives [`Command`](trait@crate::Command).
pub use factum_macros::Command;

/// Derives [`Aggregate`](trait@crate::Aggregate).
pub use factum_macros::Aggregate;

/// Derives [`Projection`](trait@crate::Projection).
pub use factum_macros::Projection;
