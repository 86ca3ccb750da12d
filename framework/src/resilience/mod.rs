//! Resilience: retry with backoff and jitter under a budget, and a circuit breaker.
