//! `#[derive(Aggregate)]`: the aggregate type's name and types, delegating `decide` and
//! `evolve` to inherent methods of the same names (or to the functions the attribute names).

use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned};
use syn::spanned::Spanned as _;
use syn::{Data, DeriveInput, Ident, LitStr, Path, Type};

use crate::attr::{self, Ctxt, Spanned};

const KEYS: &str = "`type`, `command`, `event`, `error`, `decide`, `evolve` or `snapshot_version`";

#[derive(Default)]
struct AggregateAttrs {
    type_name: Option<LitStr>,
    command: Option<Type>,
    event: Option<Type>,
    error: Option<Type>,
    decide: Option<Path>,
    evolve: Option<Path>,
    snapshot_version: Option<Spanned<u32>>,
    /// The `aggregate` in `#[aggregate(...)]`, to point "missing key" errors at.
    attr_span: Option<Span>,
    /// Keys given, even with a bad value (which has its own error).
    seen: Vec<String>,
}

fn parse_attrs(cx: &mut Ctxt, input: &DeriveInput) -> AggregateAttrs {
    let mut out = AggregateAttrs {
        attr_span: input
            .attrs
            .iter()
            .find(|a| a.path().is_ident("aggregate"))
            .map(|a| a.path().span()),
        ..AggregateAttrs::default()
    };
    attr::for_each_meta(cx, &input.attrs, "aggregate", |cx, meta| {
        let key = attr::key_name(&meta);
        out.seen.push(key.clone());
        match key.as_str() {
            "type" => {
                attr::check_duplicate(cx, &meta, &out.type_name);
                if let Some(name) = attr::string_value(cx, &meta, "type = \"account\"")? {
                    let value = name.value();
                    if value.is_empty() {
                        cx.error(&name, "the aggregate type must not be empty");
                    } else if value.contains('-') {
                        cx.error(
                            &name,
                            format_args!(
                                "the aggregate type {value:?} must not contain `-`: it separates the type from the id in stream ids (`account-42`); try {:?}",
                                value.replace('-', "_")
                            ),
                        );
                    } else if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
                        cx.error(
                            &name,
                            format_args!("the aggregate type {value:?} must not contain whitespace or control characters"),
                        );
                    }
                    out.type_name = Some(name);
                }
            }
            "command" | "event" | "error" => {
                let slot = match key.as_str() {
                    "command" => &mut out.command,
                    "event" => &mut out.event,
                    _ => &mut out.error,
                };
                attr::check_duplicate(cx, &meta, slot);
                if let Some(ty) = attr::type_value(cx, &meta)? {
                    *slot = Some(ty);
                }
            }
            "decide" | "evolve" => {
                let slot = if key == "decide" {
                    &mut out.decide
                } else {
                    &mut out.evolve
                };
                attr::check_duplicate(cx, &meta, slot);
                if let Some(path) = attr::path_value(cx, &meta)? {
                    *slot = Some(path);
                }
            }
            "snapshot_version" => {
                attr::check_duplicate(cx, &meta, &out.snapshot_version);
                let value = meta.value()?;
                out.snapshot_version = attr::version_value(cx, value, "snapshot_version = 1")?;
            }
            "handle" | "apply" => {
                let new = if key == "handle" { "decide" } else { "evolve" };
                cx.error(
                    &meta.path,
                    format_args!(
                        "`{key}` is now `{new}`, like the `Aggregate` method it implements: write `{new} = ...`"
                    ),
                );
                return attr::skip_value(&meta);
            }
            _ => return attr::unknown_key(cx, &meta, "aggregate", KEYS),
        }
        Ok(())
    });
    out
}

/// Expands `#[derive(Aggregate)]`.
pub(crate) fn expand(input: DeriveInput) -> syn::Result<TokenStream> {
    let mut cx = Ctxt::new();
    let krate = attr::crate_path(&mut cx, &input.attrs);
    if let Data::Union(data) = &input.data {
        cx.error(
            data.union_token,
            "`#[derive(Aggregate)]` supports structs and enums, not unions",
        );
        return Ok(cx.into_compile_errors());
    }
    let attrs = parse_attrs(&mut cx, &input);
    let missing_span = attrs.attr_span.unwrap_or_else(Span::call_site);
    let hint = "#[aggregate(type = \"account\", command = AccountCommand, event = AccountEvent, error = AccountError)]";
    if attrs.attr_span.is_none() {
        cx.error_at(
            Span::call_site(),
            format_args!("`#[derive(Aggregate)]` needs `{hint}`"),
        );
    } else {
        for (key, example) in [
            ("type", "type = \"account\""),
            ("command", "command = AccountCommand"),
            ("event", "event = AccountEvent"),
            ("error", "error = AccountError"),
        ] {
            if !attrs.seen.iter().any(|k| k == key) {
                let key = example;
                cx.error_at(
                    missing_span,
                    format_args!("missing `{key}` in `#[aggregate(...)]`"),
                );
            }
        }
    }

    let ident = &input.ident;
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    let private = quote!(#krate::__private);
    let or_never = |ty: &Option<Type>| match ty {
        Some(ty) => quote!(#ty),
        None => quote!(#private::Unparsed),
    };
    let command = or_never(&attrs.command);
    let event = or_never(&attrs.event);
    let error = or_never(&attrs.error);
    let type_name = attrs
        .type_name
        .as_ref()
        .map_or_else(String::new, LitStr::value);

    if cx.has_errors() {
        let errors = cx.into_compile_errors();
        return Ok(quote! {
            #errors
            const _: () = {
                impl #impl_generics #krate::Aggregate for #ident #ty_generics #where_clause {
                    const TYPE: &'static str = #type_name;
                    type Command = #command;
                    type Event = #event;
                    type Error = #error;
                    fn decide(&self, _: &Self::Command) -> ::core::result::Result<#private::Vec<Self::Event>, Self::Error> {
                        ::core::unreachable!()
                    }
                    fn evolve(&mut self, _: &Self::Event) { ::core::unreachable!() }
                }
            };
        });
    }

    // The user's method, or the function the attribute names. A missing method is a compile
    // error spanned on the type (or on the attribute's path) that names the method to write;
    // see `__private::Delegate` for why `Self::decide` alone would recurse instead.
    let aggregate = quote!(#krate::Aggregate);
    let decide = delegate(
        &private,
        &aggregate,
        ident,
        &attrs.decide,
        "decide",
        quote!(self, command),
    );
    let evolve = delegate(
        &private,
        &aggregate,
        ident,
        &attrs.evolve,
        "evolve",
        quote!(self, event),
    );
    let snapshot = attrs.snapshot_version.map(|v| {
        let version = v.value;
        quote! {
            impl #impl_generics #krate::Snapshot for #ident #ty_generics #where_clause {
                const SNAPSHOT_VERSION: u32 = #version;
            }
        }
    });
    let impl_attrs = attr::impl_attrs();
    Ok(quote! {
        const _: () = {
            #impl_attrs
            impl #impl_generics #krate::Aggregate for #ident #ty_generics #where_clause {
                const TYPE: &'static str = #type_name;
                type Command = #command;
                type Event = #event;
                type Error = #error;

                #[inline]
                fn decide(
                    &self,
                    command: &Self::Command,
                ) -> ::core::result::Result<#private::Vec<Self::Event>, Self::Error> {
                    #decide
                }

                #[inline]
                fn evolve(&mut self, event: &Self::Event) {
                    #evolve
                }
            }
            #snapshot
        };
    })
}

/// The call of `method`'s implementation: `Self::{method}(args)` or `{path}(args)`, preceded
/// by the check that it does not resolve to the trait method being implemented (when the path
/// could name it).
pub(crate) fn delegate(
    private: &TokenStream,
    trait_path: &TokenStream,
    ident: &Ident,
    path: &Option<Path>,
    method: &str,
    args: TokenStream,
) -> TokenStream {
    // Located on the user's tokens so errors point there, but marked as macro output so lints
    // on user code leave the generated lines alone.
    let span = Span::call_site().located_at(path.as_ref().map_or(ident.span(), |p| p.span()));
    let name = Ident::new(method, span);
    let callee = match path {
        Some(path) => quote!(#path),
        None => quote_spanned!(span=> Self::#name),
    };
    // Only `Self::decide` (the default), or a path through the trait (`Aggregate::decide`), can
    // name the trait method itself; a function in a module (`rules::decide`) cannot, and is left
    // unchecked so a generic one still has its parameters inferred from the call.
    let trait_name = trait_path
        .clone()
        .into_iter()
        .filter_map(|t| match t {
            proc_macro2::TokenTree::Ident(ident) => Some(ident),
            _ => None,
        })
        .last();
    let could_be_the_trait_method = match path {
        Some(path) => {
            path.segments.last().is_some_and(|s| s.ident == method)
                && path.segments.len() > 1
                && path
                    .segments
                    .iter()
                    .any(|s| s.ident == "Self" || Some(&s.ident) == trait_name.as_ref())
        }
        None => true,
    };
    let check = could_be_the_trait_method.then(|| {
        let check = Ident::new(&format!("check_{method}"), span);
        quote_spanned! {span=>
            {
                #[allow(unused_imports)]
                use #private::{DelegateIsAnotherFunction as _, DelegateIsTheTraitMethod as _};
                (&#private::delegate::<Self, _, _>(#callee, <Self as #trait_path>::#name)).#check();
            }
        }
    });
    quote_spanned! {span=>
        {
            #check
            #callee(#args)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attr::emitted_errors;
    use syn::parse_quote;

    #[test]
    fn delegates_to_decide_and_evolve() {
        let tokens = expand(parse_quote! {
            #[aggregate(type = "account", command = Cmd, event = Ev, error = Err)]
            struct Account { balance: u64 }
        })
        .expect("expands");
        assert!(emitted_errors(&tokens).is_empty());
        let code = tokens.to_string();
        assert!(code.contains(r#"const TYPE : & 'static str = "account" ;"#));
        assert!(code.contains("type Command = Cmd ;"));
        assert!(code.contains("Self :: decide (self , command)"), "{code}");
        assert!(code.contains("Self :: evolve (self , event)"));
        // Each call is checked not to be the trait method it implements.
        assert!(code.contains(
            "delegate :: < Self , _ , _ > (Self :: decide , < Self as :: factum :: Aggregate > :: decide)) . check_decide ()"
        ));
        assert!(code.contains(". check_evolve ()"));
        assert!(!code.contains("Snapshot"));
    }

    #[test]
    fn custom_functions_and_snapshot_version() {
        let code = expand(parse_quote! {
            #[aggregate(type = "a", command = C, event = E, error = X, decide = rules::decide, evolve = Self::on, snapshot_version = 3)]
            struct A<T> { t: T }
        })
        .expect("expands")
        .to_string();
        assert!(
            code.contains("{ rules :: decide (self , command) }"),
            "{code}"
        );
        assert!(code.contains("Self :: on (self , event)"));
        // Neither a function in a module nor one named otherwise can be the trait method.
        assert!(!code.contains("check_decide"), "{code}");
        assert!(!code.contains("check_evolve"));
        assert!(code.contains("impl < T > :: factum :: Snapshot for A < T > { const SNAPSHOT_VERSION : u32 = 3u32 ; }"), "{code}");
    }

    #[test]
    fn bad_type_and_missing_keys_are_reported_together() {
        let errors = emitted_errors(
            &expand(parse_quote! {
                #[aggregate(type = "bank-account", event = E, evnt = F)]
                struct A {}
            })
            .expect("expands"),
        );
        assert_eq!(errors.len(), 4, "{errors:#?}");
        assert!(errors[0].contains("must not contain `-`"));
        assert!(errors[0].contains("try \"bank_account\""));
        assert!(errors[1].starts_with("unknown `aggregate` attribute `evnt`"));
        assert!(errors[2].starts_with("missing `command = AccountCommand`"));
        assert!(errors[3].starts_with("missing `error = AccountError`"));
    }

    #[test]
    fn paths_that_could_name_the_trait_method_are_checked() {
        for path in [
            quote!(Self::decide),
            quote!(Aggregate::decide),
            quote!(factum::Aggregate::decide),
        ] {
            let input: DeriveInput = syn::parse2(quote! {
                #[aggregate(type = "a", command = C, event = E, error = X, decide = #path)]
                struct A {}
            })
            .expect("parses");
            let code = expand(input).expect("expands").to_string();
            assert!(code.contains(". check_decide ()"), "{path}: {code}");
        }
    }

    #[test]
    fn the_old_method_keys_say_their_new_names() {
        let errors = emitted_errors(
            &expand(parse_quote! {
                #[aggregate(type = "a", command = C, event = E, error = X, handle = Self::h, apply = Self::a)]
                struct A {}
            })
            .expect("expands"),
        );
        assert_eq!(errors.len(), 2, "{errors:#?}");
        assert!(
            errors[0].starts_with("`handle` is now `decide`"),
            "{errors:#?}"
        );
        assert!(
            errors[1].starts_with("`apply` is now `evolve`"),
            "{errors:#?}"
        );
    }

    #[test]
    fn the_fallback_uses_a_placeholder_for_unnamed_types() {
        let tokens = expand(parse_quote!(
            struct A {}
        ))
        .expect("expands");
        assert_eq!(emitted_errors(&tokens).len(), 1);
        assert!(
            tokens
                .to_string()
                .contains("type Command = :: factum :: __private :: Unparsed")
        );
    }
}
