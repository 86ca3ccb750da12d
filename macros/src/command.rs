//! `#[derive(Command)]`: the command's name and where its aggregate id is.

use proc_macro2::TokenStream;
use quote::{ToTokens, quote, quote_spanned};
use syn::spanned::Spanned as _;
use syn::{Data, DeriveInput, Fields, Ident, LitStr, Member, Path};

use crate::attr::{self, Ctxt};

/// Where the aggregate id of one struct or variant is.
struct Target {
    /// The variant (`None` for a struct).
    variant: Option<Ident>,
    name: String,
    id: Option<(Member, syn::Type)>,
}

#[derive(Default)]
struct ItemAttrs {
    name: Option<LitStr>,
    id: Option<Ident>,
}

fn parse_item_attrs(cx: &mut Ctxt, attrs: &[syn::Attribute], allow_id: bool) -> ItemAttrs {
    let mut out = ItemAttrs::default();
    let expected = if allow_id {
        "`name = \"...\"` or `id = field`"
    } else {
        "`name = \"...\"`"
    };
    attr::for_each_meta(cx, attrs, "command", |cx, meta| {
        if meta.path.is_ident("name") {
            attr::check_duplicate(cx, &meta, &out.name);
            if let Some(name) = attr::string_value(cx, &meta, "name = \"Deposit\"")? {
                if name.value().is_empty() {
                    cx.error(&name, "the command name must not be empty");
                }
                out.name = Some(name);
            }
            Ok(())
        } else if allow_id && meta.path.is_ident("id") {
            attr::check_duplicate(cx, &meta, &out.id);
            if !meta.input.peek(syn::Token![=]) {
                cx.error(
                    &meta.path,
                    "on the type, `id` names the id field: `#[command(id = account)]`; or mark the field itself with `#[command(id)]`",
                );
                return attr::skip_value(&meta);
            }
            if let Some(id) = attr::ident_value(cx, &meta, "id = account")? {
                out.id = Some(id);
            }
            Ok(())
        } else {
            attr::unknown_key(cx, &meta, "command", expected)
        }
    });
    out
}

/// Whether a field carries `#[command(id)]`.
fn field_is_id(cx: &mut Ctxt, field: &syn::Field) -> bool {
    let mut is_id = false;
    attr::for_each_meta(cx, &field.attrs, "command", |cx, meta| {
        if meta.path.is_ident("id") {
            if is_id {
                cx.error(&meta.path, "duplicate `id`: give it once");
            }
            is_id = true;
            if !meta.input.is_empty() && !meta.input.peek(syn::Token![,]) {
                cx.error(
                    &meta.path,
                    "`id` on a field takes no value: `#[command(id)]`",
                );
                return attr::skip_value(&meta);
            }
            Ok(())
        } else {
            attr::unknown_key(cx, &meta, "command", "`id` on a field")
        }
    });
    is_id
}

/// Finds the id field of one struct or variant: the field marked `#[command(id)]`, else the
/// field the container names with `id = field`.
fn find_id(
    cx: &mut Ctxt,
    fields: &Fields,
    default_id: Option<&Ident>,
    owner: &Ident,
    what: &str,
) -> Option<(Member, syn::Type)> {
    let mut marked: Option<(Member, syn::Type)> = None;
    for (i, field) in fields.iter().enumerate() {
        if field_is_id(cx, field) {
            let member = match &field.ident {
                Some(ident) => Member::Named(ident.clone()),
                None => Member::Unnamed(syn::Index {
                    index: u32::try_from(i).unwrap_or(u32::MAX),
                    span: field.ty.span(),
                }),
            };
            if marked.is_some() {
                let at = field
                    .ident
                    .as_ref()
                    .map_or_else(|| field.ty.to_token_stream(), ToTokens::to_token_stream);
                cx.error(
                    at,
                    format_args!("{what} `{owner}` has two `#[command(id)]` fields; a command targets one aggregate"),
                );
            } else {
                marked = Some((member, field.ty.clone()));
            }
        }
    }
    if marked.is_some() {
        return marked;
    }
    if let Some(name) = default_id {
        if let Some(field) = fields.iter().find(|f| f.ident.as_ref() == Some(name)) {
            return Some((Member::Named(name.clone()), field.ty.clone()));
        }
        cx.error(
            owner,
            format_args!("{what} `{owner}` has no field `{name}` (named by `#[command(id = {name})]`); add it or mark its id field with `#[command(id)]`"),
        );
        return None;
    }
    cx.error(
        owner,
        format_args!("{what} `{owner}` has no aggregate id: mark the field that holds it with `#[command(id)]`"),
    );
    None
}

/// Expands `#[derive(Command)]`.
pub(crate) fn expand(input: DeriveInput) -> syn::Result<TokenStream> {
    let mut cx = Ctxt::new();
    let krate = attr::crate_path(&mut cx, &input.attrs);
    let ident = &input.ident;

    let (is_enum, targets) = match &input.data {
        Data::Struct(data) => {
            let attrs = parse_item_attrs(&mut cx, &input.attrs, true);
            let id = find_id(&mut cx, &data.fields, attrs.id.as_ref(), ident, "command");
            let name = attrs.name.map_or_else(|| ident.to_string(), |n| n.value());
            (
                false,
                vec![Target {
                    variant: None,
                    name,
                    id,
                }],
            )
        }
        Data::Enum(data) => {
            let container = parse_item_attrs(&mut cx, &input.attrs, true);
            if let Some(name) = &container.name {
                cx.error(
                    name,
                    "on an enum, `name` goes on each variant (the default is the variant's name)",
                );
            }
            let mut targets = Vec::new();
            for variant in &data.variants {
                let attrs = parse_item_attrs(&mut cx, &variant.attrs, false);
                let id = find_id(
                    &mut cx,
                    &variant.fields,
                    container.id.as_ref(),
                    &variant.ident,
                    "variant",
                );
                let name = attrs
                    .name
                    .map_or_else(|| variant.ident.to_string(), |n| n.value());
                targets.push(Target {
                    variant: Some(variant.ident.clone()),
                    name,
                    id,
                });
            }
            (true, targets)
        }
        Data::Union(data) => {
            cx.error(
                data.union_token,
                "`#[derive(Command)]` supports structs and enums, not unions",
            );
            (false, Vec::new())
        }
    };

    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    if cx.has_errors() {
        if matches!(input.data, Data::Union(_)) {
            return Ok(cx.into_compile_errors());
        }
        let errors = cx.into_compile_errors();
        return Ok(quote! {
            #errors
            const _: () = {
                impl #impl_generics #krate::Command for #ident #ty_generics #where_clause {
                    fn command_name(&self) -> &'static str { ::core::unreachable!() }
                    fn aggregate_id(&self) -> #krate::__private::String { ::core::unreachable!() }
                }
            };
        });
    }

    let private = quote!(#krate::__private);
    let to_string =
        |ty: &syn::Type| quote_spanned!(ty.span()=> #private::aggregate_id::<#ty>(__id));
    let (name_body, id_body) = if is_enum {
        let names = targets.iter().map(|t| {
            let v = &t.variant;
            let name = &t.name;
            quote!(Self::#v { .. } => #name)
        });
        let ids = targets.iter().filter_map(|t| {
            let v = &t.variant;
            let (member, ty) = t.id.as_ref()?;
            let call = to_string(ty);
            Some(quote!(Self::#v { #member: __id, .. } => #call))
        });
        let ids: Vec<TokenStream> = ids.collect();
        // An enum without variants has no value to match on by reference.
        let id_body = if ids.is_empty() {
            quote!(match *self {})
        } else {
            quote!(match self { #(#ids,)* })
        };
        (quote!(match *self { #(#names,)* }), id_body)
    } else {
        let name = targets.first().map(|t| t.name.clone()).unwrap_or_default();
        let id = targets
            .first()
            .and_then(|t| t.id.as_ref())
            .map(|(member, ty)| {
                let call = to_string(ty);
                quote!({ let __id = &self.#member; #call })
            });
        (quote!(#name), id.to_token_stream())
    };
    let impl_attrs = attr::impl_attrs();
    let krate: &Path = &krate;
    Ok(quote! {
        const _: () = {
            #impl_attrs
            impl #impl_generics #krate::Command for #ident #ty_generics #where_clause {
                fn command_name(&self) -> &'static str { #name_body }
                fn aggregate_id(&self) -> #private::String { #id_body }
            }
        };
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attr::emitted_errors;
    use syn::parse_quote;

    fn generated(input: DeriveInput) -> String {
        let tokens = expand(input).expect("expands");
        assert!(emitted_errors(&tokens).is_empty(), "{tokens}");
        tokens.to_string()
    }

    #[test]
    fn struct_with_marked_id_and_name() {
        let code = generated(parse_quote! {
            #[command(name = "Deposit")]
            struct DepositMoney { #[command(id)] account: AccountId, amount: u64 }
        });
        assert!(code.contains(r#"fn command_name (& self) -> & 'static str { "Deposit" }"#));
        assert!(code.contains("let __id = & self . account ;"), "{code}");
        assert!(code.contains("aggregate_id :: < AccountId > (__id)"));
    }

    #[test]
    fn enum_with_a_default_id_field_and_an_override() {
        let code = generated(parse_quote! {
            #[command(id = account)]
            enum C<T: Clone> {
                Open { account: String },
                #[command(name = "Move")]
                Transfer { account: String, #[command(id)] from: T },
                Freeze(#[command(id)] u64),
            }
        });
        assert!(code.contains(r#"Self :: Open { .. } => "Open""#), "{code}");
        assert!(code.contains(r#"Self :: Transfer { .. } => "Move""#));
        assert!(code.contains("Self :: Transfer { from : __id , .. }"));
        assert!(code.contains("Self :: Freeze { 0 : __id , .. }"));
        assert!(code.contains("impl < T : Clone > :: factum :: Command for C < T >"));
    }

    #[test]
    fn missing_and_duplicate_ids_are_reported_together() {
        let errors = emitted_errors(
            &expand(parse_quote! {
                enum C {
                    Open { account: String },
                    Close,
                    Two { #[command(id)] a: u8, #[command(id, id)] b: u8 },
                    #[command(nmae = "x")]
                    Other { #[command(id)] a: u8 },
                }
            })
            .expect("expands"),
        );
        assert_eq!(errors.len(), 5, "{errors:#?}");
        assert!(errors[0].starts_with("variant `Open` has no aggregate id"));
        assert!(errors[1].starts_with("variant `Close` has no aggregate id"));
        assert!(errors[2].starts_with("duplicate `id`"));
        assert!(errors[3].starts_with("variant `Two` has two `#[command(id)]` fields"));
        assert!(errors[4].starts_with("unknown `command` attribute `nmae`"));
    }
}
