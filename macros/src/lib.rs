//! Derive macros for [factum](https://docs.rs/factum). Use them through `factum` (its default
//! `derive` feature re-exports them), not directly.
//!
//! This crate is a thin proc-macro shim; the derive logic lives in plain functions that unit
//! tests call with `syn::parse_quote!`.
