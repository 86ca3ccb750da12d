//! `#[derive(Projection)]`: the projection's name and events, delegating `apply` to an inherent
//! method of the same name (or to the function the attribute names).

use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned};
use syn::spanned::Spanned as _;
use syn::{Data, DeriveInput, LitStr, Path, Type};

use crate::attr::{self, Ctxt};

const KEYS: &str = "`name`, `event`, `apply` or `reads`";

/// Expands `#[derive(Projection)]`.
pub(crate) fn expand(input: DeriveInput) -> syn::Result<TokenStream> {
    let mut cx = Ctxt::new();
    let krate = attr::crate_path(&mut cx, &input.attrs);
    if let Data::Union(data) = &input.data {
        cx.error(
            data.union_token,
            "`#[derive(Projection)]` supports structs and enums, not unions",
        );
        return Ok(cx.into_compile_errors());
    }

    let mut name: Option<LitStr> = None;
    let mut event: Option<Type> = None;
    let mut apply: Option<Path> = None;
    // The aggregates whose categories the projection reads whole (`Projection::known_events`).
    let mut reads: Option<Vec<Path>> = None;
    // Keys given, even with a bad value (which has its own error).
    let mut seen: Vec<String> = Vec::new();
    let attr_span = input
        .attrs
        .iter()
        .find(|a| a.path().is_ident("projection"))
        .map(|a| a.path().span());
    attr::for_each_meta(&mut cx, &input.attrs, "projection", |cx, meta| {
        seen.push(attr::key_name(&meta));
        if meta.path.is_ident("name") {
            attr::check_duplicate(cx, &meta, &name);
            if let Some(lit) = attr::string_value(cx, &meta, "name = \"balances\"")? {
                if lit.value().trim().is_empty() {
                    cx.error(&lit, "the projection name must not be empty: it keys the projection's checkpoint");
                }
                name = Some(lit);
            }
        } else if meta.path.is_ident("event") {
            attr::check_duplicate(cx, &meta, &event);
            event = attr::type_value(cx, &meta)?.or(event.take());
        } else if meta.path.is_ident("apply") {
            attr::check_duplicate(cx, &meta, &apply);
            apply = attr::path_value(cx, &meta)?.or(apply.take());
        } else if meta.path.is_ident("reads") {
            attr::check_duplicate(cx, &meta, &reads);
            if !meta.input.peek(syn::token::Paren) {
                cx.error(
                    &meta.path,
                    "write `reads(Account, ...)`: the aggregates whose events this projection reads",
                );
                return attr::skip_value(&meta);
            }
            let content;
            syn::parenthesized!(content in meta.input);
            let aggregates: Vec<Path> =
                syn::punctuated::Punctuated::<Path, syn::Token![,]>::parse_terminated(&content)?
                    .into_iter()
                    .collect();
            if aggregates.is_empty() {
                cx.error(
                    &meta.path,
                    "`reads()` names no aggregate: name at least one, or leave `reads` out",
                );
            }
            reads = Some(aggregates);
        } else if meta.path.is_ident("handle") {
            cx.error(
                &meta.path,
                "`handle` is now `apply`, like the `Projection` method it implements: write `apply = ...`",
            );
            return attr::skip_value(&meta);
        } else {
            return attr::unknown_key(cx, &meta, "projection", KEYS);
        }
        Ok(())
    });
    let hint = "#[projection(name = \"balances\", event = BalanceEvent)]";
    match attr_span {
        None => cx.error_at(
            Span::call_site(),
            format_args!("`#[derive(Projection)]` needs `{hint}`"),
        ),
        Some(span) => {
            if !seen.iter().any(|k| k == "name") {
                cx.error_at(span, "missing `name = \"...\"` in `#[projection(...)]`: the stable key of the projection's checkpoint");
            }
            if !seen.iter().any(|k| k == "event") {
                cx.error_at(span, "missing `event = EventType` in `#[projection(...)]`: the events the projection handles");
            }
        }
    }

    let ident = &input.ident;
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    let private = quote!(#krate::__private);
    let name_value = name.as_ref().map_or_else(String::new, LitStr::value);
    let event_ty = match &event {
        Some(ty) => quote!(#ty),
        None => quote!(#private::Unparsed),
    };
    let body = if cx.has_errors() {
        quote!(::core::unreachable!())
    } else {
        // A missing `apply` is an error on the type naming the method to write; see
        // `__private::Delegate` for why `Self::apply` alone would recurse instead.
        let call = crate::aggregate::delegate(
            &private,
            &quote!(#krate::Projection),
            ident,
            &apply,
            "apply",
            quote!(self, event),
        );
        // The result's trait bound is checked on the attribute, or on the type.
        let span = match &apply {
            Some(path) => path.span(),
            None => attr_span.unwrap_or_else(|| ident.span()),
        };
        quote_spanned!(span=> #private::HandlerResult::into_result(#call))
    };
    // Declared aggregates: their categories are read whole, so a stored event of a type none of
    // them registers stops the projection instead of being hidden by a filter on types.
    let known = reads.map(|aggregates| {
        quote! {
            fn known_events() -> ::core::option::Option<#krate::subscription::KnownEvents> {
                ::core::option::Option::Some(
                    #krate::subscription::KnownEvents::new()
                        #(.aggregate::<#aggregates>())*
                )
            }
        }
    });
    let errors = cx.into_compile_errors();
    let impl_attrs = attr::impl_attrs();
    Ok(quote! {
        #errors
        const _: () = {
            #impl_attrs
            impl #impl_generics #krate::Projection for #ident #ty_generics #where_clause {
                const NAME: &'static str = #name_value;
                type Event = #event_ty;

                #known

                fn apply(
                    &mut self,
                    event: &#krate::Envelope<Self::Event>,
                ) -> ::core::result::Result<(), #krate::BoxError> {
                    #body
                }
            }
        };
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attr::emitted_errors;
    use syn::parse_quote;

    #[test]
    fn reads_declares_the_known_events() {
        let tokens = expand(parse_quote! {
            #[projection(name = "balances", event = BalanceEvent, reads(Account, crate::Customer))]
            struct Balances {}
        })
        .expect("expands");
        assert!(emitted_errors(&tokens).is_empty());
        let code = tokens.to_string();
        assert!(code.contains("fn known_events ()"), "{code}");
        assert!(code.contains(". aggregate :: < Account > ()"), "{code}");
        assert!(
            code.contains(". aggregate :: < crate :: Customer > ()"),
            "{code}"
        );

        let tokens = expand(parse_quote! {
            #[projection(name = "balances", event = BalanceEvent, reads = Account)]
            struct Balances {}
        })
        .expect("expands");
        let errors = emitted_errors(&tokens);
        assert!(
            errors
                .iter()
                .any(|e| e.contains("write `reads(Account, ...)`")),
            "{errors:?}"
        );

        let tokens = expand(parse_quote! {
            #[projection(name = "balances", event = BalanceEvent)]
            struct Balances {}
        })
        .expect("expands");
        assert!(!tokens.to_string().contains("known_events"));
    }

    #[test]
    fn name_event_and_apply() {
        let tokens = expand(parse_quote! {
            #[projection(name = "balances", event = BalanceEvent)]
            struct Balances {}
        })
        .expect("expands");
        assert!(emitted_errors(&tokens).is_empty());
        let code = tokens.to_string();
        assert!(code.contains(r#"const NAME : & 'static str = "balances" ;"#));
        assert!(code.contains("type Event = BalanceEvent ;"));
        assert!(code.contains("Self :: apply (self , event)"), "{code}");
        assert!(code.contains(
            "(Self :: apply , < Self as :: factum :: Projection > :: apply)) . check_apply ()"
        ));
        assert!(code.contains("HandlerResult :: into_result ({"));
    }

    #[test]
    fn errors_are_reported_together() {
        let errors = emitted_errors(
            &expand(parse_quote! {
                #[projection(name = "", apply = 5, extra)]
                struct P {}
            })
            .expect("expands"),
        );
        assert_eq!(errors.len(), 4, "{errors:#?}");
        assert!(errors[0].starts_with("the projection name must not be empty"));
        assert!(errors[1].starts_with("expected a path to a function"));
        assert!(errors[2].starts_with("unknown `projection` attribute `extra`"));
        assert!(errors[3].starts_with("missing `event = EventType`"));
    }

    #[test]
    fn the_old_key_says_its_new_name() {
        let errors = emitted_errors(
            &expand(parse_quote! {
                #[projection(name = "p", event = E, handle = Self::on)]
                struct P {}
            })
            .expect("expands"),
        );
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert!(
            errors[0].starts_with("`handle` is now `apply`"),
            "{errors:#?}"
        );
    }
}
