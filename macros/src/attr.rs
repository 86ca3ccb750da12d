//! Attribute parsing shared by the derives: an error accumulator and value parsers that never
//! stop at the first mistake.

use std::fmt::Display;

use proc_macro2::{Span, TokenStream, TokenTree};
use quote::{ToTokens, quote};
use syn::meta::ParseNestedMeta;
use syn::{Attribute, Expr, Ident, Lit, LitInt, LitStr, Path, Token, Type};

/// Collects every error of one derive input so they are reported together, each on its own
/// token (serde's `Ctxt`).
#[derive(Default)]
pub(crate) struct Ctxt {
    errors: Option<syn::Error>,
}

impl Ctxt {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Records an error.
    pub(crate) fn push(&mut self, error: syn::Error) {
        match &mut self.errors {
            Some(errors) => errors.combine(error),
            None => self.errors = Some(error),
        }
    }

    /// Records an error spanned on `tokens`.
    pub(crate) fn error(&mut self, tokens: impl ToTokens, message: impl Display) {
        self.push(syn::Error::new_spanned(tokens, message));
    }

    /// Records an error at `span`.
    pub(crate) fn error_at(&mut self, span: Span, message: impl Display) {
        self.push(syn::Error::new(span, message));
    }

    /// Runs a parse, recording its error instead of stopping.
    pub(crate) fn check<T>(&mut self, result: syn::Result<T>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(error) => {
                self.push(error);
                None
            }
        }
    }

    pub(crate) fn has_errors(&self) -> bool {
        self.errors.is_some()
    }

    /// All errors recorded so far, as one combined error.
    pub(crate) fn finish(self) -> syn::Result<()> {
        match self.errors {
            Some(errors) => Err(errors),
            None => Ok(()),
        }
    }

    /// The combined errors as `compile_error!` invocations (empty when there are none).
    pub(crate) fn into_compile_errors(self) -> TokenStream {
        self.errors
            .map(|e| e.to_compile_error())
            .unwrap_or_default()
    }
}

/// A parsed attribute value with the tokens it came from (to span later errors on).
pub(crate) struct Spanned<T> {
    pub(crate) value: T,
    pub(crate) span: Span,
}

/// Parses every `#[name(...)]` attribute in `attrs` with `each`, recording errors in `cx`.
///
/// `each` returns `Ok(())` after recording value errors itself, so one bad key does not hide
/// the next; a malformed attribute (bad syntax) stops only that attribute.
pub(crate) fn for_each_meta(
    cx: &mut Ctxt,
    attrs: &[Attribute],
    name: &str,
    mut each: impl FnMut(&mut Ctxt, ParseNestedMeta<'_>) -> syn::Result<()>,
) {
    for attr in attrs.iter().filter(|a| a.path().is_ident(name)) {
        if let syn::Meta::Path(path) = &attr.meta {
            cx.error(
                path,
                format_args!("expected `#[{name}(...)]` with arguments in parentheses"),
            );
            continue;
        }
        let mut errors = Vec::new();
        let result = attr.parse_nested_meta(|meta| {
            let mut inner = Ctxt::new();
            let result = each(&mut inner, meta);
            if let Err(e) = inner.finish() {
                errors.push(e);
            }
            result
        });
        for error in errors {
            cx.push(error);
        }
        cx.check(result);
    }
}

/// The name of a key, for messages.
pub(crate) fn key_name(meta: &ParseNestedMeta<'_>) -> String {
    meta.path.to_token_stream().to_string().replace(' ', "")
}

/// Records "unknown attribute" for the current key and skips its value.
pub(crate) fn unknown_key(
    cx: &mut Ctxt,
    meta: &ParseNestedMeta<'_>,
    attr: &str,
    expected: &str,
) -> syn::Result<()> {
    cx.error(
        &meta.path,
        format_args!(
            "unknown `{attr}` attribute `{}`; expected {expected}",
            key_name(meta)
        ),
    );
    skip_value(meta)
}

/// Consumes whatever follows a key: `= tokens...` up to the next comma, or a `(...)` group.
pub(crate) fn skip_value(meta: &ParseNestedMeta<'_>) -> syn::Result<()> {
    if meta.input.peek(Token![=]) {
        meta.input.parse::<Token![=]>()?;
        while !meta.input.is_empty() && !meta.input.peek(Token![,]) {
            meta.input.parse::<TokenTree>()?;
        }
    } else if meta.input.peek(syn::token::Paren) {
        meta.input.parse::<proc_macro2::Group>()?;
    }
    Ok(())
}

/// Records a "duplicate key" error when `slot` is already set.
pub(crate) fn check_duplicate<T>(cx: &mut Ctxt, meta: &ParseNestedMeta<'_>, slot: &Option<T>) {
    if slot.is_some() {
        cx.error(
            &meta.path,
            format_args!("duplicate `{}`: give it once", key_name(meta)),
        );
    }
}

/// `key = "string"`.
pub(crate) fn string_value(
    cx: &mut Ctxt,
    meta: &ParseNestedMeta<'_>,
    example: &str,
) -> syn::Result<Option<LitStr>> {
    let expr: Expr = meta.value()?.parse()?;
    match expr {
        Expr::Lit(syn::ExprLit {
            lit: Lit::Str(s), ..
        }) => Ok(Some(s)),
        other => {
            cx.error(
                other,
                format_args!("expected a string literal, e.g. `{example}`"),
            );
            Ok(None)
        }
    }
}

/// `key = 3` (a positive `u32`).
pub(crate) fn version_value(
    cx: &mut Ctxt,
    input: syn::parse::ParseStream<'_>,
    example: &str,
) -> syn::Result<Option<Spanned<u32>>> {
    let expr: Expr = input.parse()?;
    let Expr::Lit(syn::ExprLit {
        lit: Lit::Int(int), ..
    }) = &expr
    else {
        cx.error(
            &expr,
            format_args!("expected a positive integer, e.g. `{example}`"),
        );
        return Ok(None);
    };
    Ok(positive_u32(cx, int, example).map(|value| Spanned {
        value,
        span: int.span(),
    }))
}

fn positive_u32(cx: &mut Ctxt, int: &LitInt, example: &str) -> Option<u32> {
    match int.base10_parse::<u32>() {
        Ok(0) => {
            cx.error(int, "schema versions start at 1");
            None
        }
        Ok(v) => Some(v),
        Err(_) => {
            cx.error(
                int,
                format_args!("expected a positive integer that fits in u32, e.g. `{example}`"),
            );
            None
        }
    }
}

/// `key = SomeType`. A string literal is rejected with a hint (types are written bare).
pub(crate) fn type_value(cx: &mut Ctxt, meta: &ParseNestedMeta<'_>) -> syn::Result<Option<Type>> {
    let input = meta.value()?;
    if input.peek(LitStr) {
        let lit: LitStr = input.parse()?;
        cx.error(
            &lit,
            format_args!(
                "expected a type, not a string: write `{} = {}`",
                key_name(meta),
                lit.value()
            ),
        );
        return Ok(None);
    }
    Ok(Some(input.parse()?))
}

/// `key = path::to::function`.
pub(crate) fn path_value(cx: &mut Ctxt, meta: &ParseNestedMeta<'_>) -> syn::Result<Option<Path>> {
    let expr: Expr = meta.value()?.parse()?;
    match expr {
        Expr::Path(p) if p.qself.is_none() => Ok(Some(p.path)),
        other => {
            cx.error(
                other,
                format_args!(
                    "expected a path to a function, e.g. `{} = Self::on_event`",
                    key_name(meta)
                ),
            );
            Ok(None)
        }
    }
}

/// `key = ident`.
pub(crate) fn ident_value(
    cx: &mut Ctxt,
    meta: &ParseNestedMeta<'_>,
    example: &str,
) -> syn::Result<Option<Ident>> {
    let expr: Expr = meta.value()?.parse()?;
    match &expr {
        Expr::Path(p) if p.qself.is_none() && p.path.get_ident().is_some() => {
            Ok(p.path.get_ident().cloned())
        }
        _ => {
            cx.error(
                &expr,
                format_args!("expected a field name, e.g. `{example}`"),
            );
            Ok(None)
        }
    }
}

/// The path generated code uses to reach factum: `#[factum(crate = "...")]` or `::factum`.
pub(crate) fn crate_path(cx: &mut Ctxt, attrs: &[Attribute]) -> Path {
    let mut path = None;
    for_each_meta(cx, attrs, "factum", |cx, meta| {
        if meta.path.is_ident("crate") {
            check_duplicate(cx, &meta, &path);
            if let Some(lit) = string_value(cx, &meta, "crate = \"my_reexport::factum\"")? {
                match lit.parse::<Path>() {
                    Ok(p) => path = Some(p),
                    Err(_) => cx.error(
                        &lit,
                        "expected a path to the factum crate, e.g. `crate = \"my_reexport::factum\"`",
                    ),
                }
            }
            Ok(())
        } else {
            unknown_key(cx, &meta, "factum", "`crate`")
        }
    });
    path.unwrap_or_else(|| syn::parse_quote!(::factum))
}

/// `#[automatically_derived]` plus lint allowances for generated impls.
pub(crate) fn impl_attrs() -> TokenStream {
    quote! { #[automatically_derived] }
}

/// Every message of a combined error, in order.
#[cfg(test)]
pub(crate) fn messages(error: syn::Error) -> Vec<String> {
    error.into_iter().map(|e| e.to_string()).collect()
}

/// The `compile_error!` messages in generated tokens (errors are emitted beside a fallback impl).
#[cfg(test)]
pub(crate) fn emitted_errors(tokens: &TokenStream) -> Vec<String> {
    let file: syn::File = syn::parse2(tokens.clone()).expect("generated code parses");
    file.items
        .iter()
        .filter_map(|item| match item {
            syn::Item::Macro(m)
                if m.mac
                    .path
                    .segments
                    .last()
                    .is_some_and(|s| s.ident == "compile_error") =>
            {
                let lit: LitStr = m.mac.parse_body().expect("a string");
                Some(lit.value())
            }
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use syn::parse_quote;

    #[test]
    fn crate_path_defaults_to_factum() {
        let mut cx = Ctxt::new();
        let attrs: Vec<Attribute> = vec![parse_quote!(#[derive(Debug)])];
        let path = crate_path(&mut cx, &attrs);
        assert!(cx.finish().is_ok());
        assert_eq!(path.to_token_stream().to_string(), ":: factum");
    }

    #[test]
    fn crate_path_override_and_errors_accumulate() {
        let mut cx = Ctxt::new();
        let attrs: Vec<Attribute> = vec![
            parse_quote!(#[factum(crate = "reexport::factum")]),
            parse_quote!(#[factum(krate = "x", crate = 5)]),
        ];
        let path = crate_path(&mut cx, &attrs);
        assert_eq!(path.to_token_stream().to_string(), "reexport :: factum");
        let err = cx.finish().expect_err("two errors");
        let messages = messages(err);
        assert_eq!(messages.len(), 3, "{messages:?}");
        assert!(messages[0].contains("unknown `factum` attribute `krate`"));
        assert!(messages[1].contains("duplicate `crate`"));
        assert!(messages[2].contains("expected a string literal"));
    }
}
