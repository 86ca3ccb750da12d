//! Derive macros for [factum](https://docs.rs/factum). Use them through `factum` (its default
//! `derive` feature re-exports them, with their documentation), not directly.
//!
//! This crate is a thin proc-macro shim; the derive logic lives in plain modules whose
//! `expand(syn::DeriveInput) -> syn::Result<TokenStream>` functions unit tests call with
//! `syn::parse_quote!`.

use proc_macro::TokenStream;
use syn::{DeriveInput, parse_macro_input};

mod aggregate;
mod attr;
mod case;
mod command;
mod event;
mod projection;

fn run(
    input: TokenStream,
    expand: fn(DeriveInput) -> syn::Result<proc_macro2::TokenStream>,
) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    expand(input)
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}

/// The derive for factum's `Event` trait.
#[proc_macro_derive(Event, attributes(event, factum, personal))]
pub fn derive_event(input: TokenStream) -> TokenStream {
    run(input, event::expand)
}

/// The derive for factum's `Command` trait.
#[proc_macro_derive(Command, attributes(command, factum))]
pub fn derive_command(input: TokenStream) -> TokenStream {
    run(input, command::expand)
}

/// The derive for factum's `Aggregate` trait.
#[proc_macro_derive(Aggregate, attributes(aggregate, factum))]
pub fn derive_aggregate(input: TokenStream) -> TokenStream {
    run(input, aggregate::expand)
}

/// The derive for factum's `Projection` trait.
#[proc_macro_derive(Projection, attributes(projection, factum))]
pub fn derive_projection(input: TokenStream) -> TokenStream {
    run(input, projection::expand)
}
