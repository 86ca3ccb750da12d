//! `#[derive(Event)]`: wire names, schema versions and the upcasting chain.

use std::collections::HashMap;

use proc_macro2::{Span, TokenStream};
use quote::{ToTokens, quote, quote_spanned};
use syn::spanned::Spanned as _;
use syn::{Data, DeriveInput, Fields, Ident, LitStr, Path, Type};

use crate::attr::{self, Ctxt, Spanned};
use crate::case::RenameRule;

const CONTAINER_KEYS: &str = "`prefix`, `rename_all` or `split` (put `name`, `version`, `upcast_from` and `renamed_from` on each variant)";
const VARIANT_KEYS: &str = "`name`, `version`, `upcast_from` or `renamed_from`";
const STRUCT_KEYS: &str =
    "`name`, `prefix`, `rename_all`, `version`, `upcast_from`, `renamed_from` or `split`";
const SPLIT_EXAMPLE: &str =
    "split(name = \"account.opened_with_deposit\", version = 1, from = OpenedWithDepositV1)";

/// Where an `#[event(...)]` attribute sits; decides which keys it accepts.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Place {
    Enum,
    Variant,
    Struct,
}

/// One older version: `OpenedV1 = 1`.
struct Upcast {
    ty: Path,
    version: Spanned<u32>,
}

/// A stored event the current code represents as several:
/// `split(name = "account.opened_with_deposit", version = 1, from = OpenedWithDepositV1)`.
struct Split {
    name: LitStr,
    version: Spanned<u32>,
    from: Type,
}

/// Everything one `#[event(...)]` list can say.
#[derive(Default)]
struct EventAttrs {
    name: Option<LitStr>,
    prefix: Option<LitStr>,
    rename_all: Option<RenameRule>,
    version: Option<Spanned<u32>>,
    upcast_from: Option<(Ident, Vec<Upcast>)>,
    renamed_from: Vec<LitStr>,
    splits: Vec<Split>,
}

fn parse_attrs(cx: &mut Ctxt, attrs: &[syn::Attribute], place: Place) -> EventAttrs {
    let mut out = EventAttrs::default();
    let mut rename_all_seen = false;
    attr::for_each_meta(cx, attrs, "event", |cx, meta| {
        let key = attr::key_name(&meta);
        let allowed = matches!(
            (place, key.as_str()),
            (Place::Enum, "prefix" | "rename_all" | "split")
                | (
                    Place::Variant,
                    "name" | "version" | "upcast_from" | "renamed_from"
                )
                | (
                    Place::Struct,
                    "name"
                        | "prefix"
                        | "rename_all"
                        | "version"
                        | "upcast_from"
                        | "renamed_from"
                        | "split"
                )
        );
        if !allowed {
            let expected = match place {
                Place::Enum => CONTAINER_KEYS,
                Place::Variant => VARIANT_KEYS,
                Place::Struct => STRUCT_KEYS,
            };
            let known = [
                "name",
                "prefix",
                "rename_all",
                "version",
                "upcast_from",
                "renamed_from",
                "split",
            ];
            if known.contains(&key.as_str()) {
                let place = match place {
                    Place::Enum => "on the enum",
                    Place::Variant => "on a variant",
                    Place::Struct => "here",
                };
                cx.error(
                    &meta.path,
                    format_args!("`{key}` is not allowed {place}; expected {expected}"),
                );
                return attr::skip_value(&meta);
            }
            return attr::unknown_key(cx, &meta, "event", expected);
        }
        match key.as_str() {
            "name" => {
                attr::check_duplicate(cx, &meta, &out.name);
                if let Some(name) = attr::string_value(cx, &meta, "name = \"account.opened\"")? {
                    check_wire_name(cx, &name, &name.value(), "wire name");
                    out.name = Some(name);
                }
            }
            "prefix" => {
                attr::check_duplicate(cx, &meta, &out.prefix);
                if let Some(prefix) = attr::string_value(cx, &meta, "prefix = \"account\"")? {
                    check_wire_name(cx, &prefix, &prefix.value(), "prefix");
                    out.prefix = Some(prefix);
                }
            }
            "rename_all" => {
                if rename_all_seen {
                    cx.error(&meta.path, "duplicate `rename_all`: give it once");
                }
                rename_all_seen = true;
                if let Some(rule) = attr::string_value(cx, &meta, "rename_all = \"snake_case\"")? {
                    match RenameRule::parse(&rule.value()) {
                        Some(r) => out.rename_all = Some(r),
                        None => cx.error(
                            &rule,
                            format_args!(
                                "unknown `rename_all` rule {:?}; expected {}",
                                rule.value(),
                                RenameRule::ACCEPTED
                            ),
                        ),
                    }
                }
            }
            "version" => {
                attr::check_duplicate(cx, &meta, &out.version);
                let value = meta.value()?;
                if let Some(v) = attr::version_value(cx, value, "version = 2")? {
                    out.version = Some(v);
                }
            }
            "renamed_from" => {
                // renamed_from("library.loaned", "loan.created")
                if !out.renamed_from.is_empty() {
                    cx.error(
                        &meta.path,
                        "duplicate `renamed_from`: list every old name in one `renamed_from(...)`",
                    );
                }
                let names = if meta.input.peek(syn::token::Paren) {
                    let content;
                    syn::parenthesized!(content in meta.input);
                    content
                        .parse_terminated(<syn::Expr as syn::parse::Parse>::parse, syn::Token![,])
                        .ok()
                } else {
                    None
                };
                let Some(names) = names else {
                    cx.error(
                        &meta.path,
                        "expected `renamed_from(\"old.name\", ...)`: the wire names this event was stored under before",
                    );
                    return attr::skip_value(&meta);
                };
                if names.is_empty() {
                    cx.error(
                        &meta.path,
                        "`renamed_from()` is empty: list the old wire names, e.g. `renamed_from(\"library.loaned\")`",
                    );
                }
                for name in names {
                    match name {
                        syn::Expr::Lit(syn::ExprLit {
                            lit: syn::Lit::Str(old),
                            ..
                        }) => {
                            check_wire_name(cx, &old, &old.value(), "old wire name");
                            out.renamed_from.push(old);
                        }
                        other => cx.error(
                            other,
                            "expected an old wire name as a string literal, e.g. `renamed_from(\"library.loaned\")`",
                        ),
                    }
                }
            }
            "split" => {
                if !meta.input.peek(syn::token::Paren) {
                    cx.error(
                        &meta.path,
                        format_args!("expected `{SPLIT_EXAMPLE}`: the stored name and version, and the type its payload decodes as"),
                    );
                    return attr::skip_value(&meta);
                }
                let (mut name, mut version, mut from) = (None, None, None);
                meta.parse_nested_meta(|inner| {
                    match attr::key_name(&inner).as_str() {
                        "name" => {
                            attr::check_duplicate(cx, &inner, &name);
                            if let Some(lit) = attr::string_value(
                                cx,
                                &inner,
                                "name = \"account.opened_with_deposit\"",
                            )? {
                                check_wire_name(cx, &lit, &lit.value(), "wire name");
                                name = Some(lit);
                            }
                        }
                        "version" => {
                            attr::check_duplicate(cx, &inner, &version);
                            let value = inner.value()?;
                            version = attr::version_value(cx, value, "version = 1")?;
                        }
                        "from" => {
                            attr::check_duplicate(cx, &inner, &from);
                            from = attr::type_value(cx, &inner)?;
                        }
                        _ => {
                            return attr::unknown_key(
                                cx,
                                &inner,
                                "split",
                                "`name`, `version` or `from`",
                            );
                        }
                    }
                    Ok(())
                })?;
                match (name, version, from) {
                    (Some(name), Some(version), Some(from)) => out.splits.push(Split {
                        name,
                        version,
                        from,
                    }),
                    (name, version, from) => {
                        let missing: Vec<&str> = [
                            name.is_none().then_some("`name = \"...\"`"),
                            version.is_none().then_some("`version = N`"),
                            from.is_none().then_some("`from = Type`"),
                        ]
                        .into_iter()
                        .flatten()
                        .collect();
                        cx.error(
                            &meta.path,
                            format_args!(
                                "`split(...)` is missing {}: it names the stored event (`name`, `version`) and the type its payload decodes as (`from`), e.g. `{SPLIT_EXAMPLE}`",
                                missing.join(" and ")
                            ),
                        );
                    }
                }
            }
            _ => {
                // upcast_from(OpenedV1 = 1, OpenedV2 = 2)
                let key_ident = meta.path.get_ident().cloned();
                if out.upcast_from.is_some() {
                    cx.error(
                        &meta.path,
                        "duplicate `upcast_from`: list every older version in one `upcast_from(...)`",
                    );
                }
                if !meta.input.peek(syn::token::Paren) {
                    cx.error(
                        &meta.path,
                        "expected `upcast_from(OpenedV1 = 1, ...)`: each older type with the schema version it was stored at",
                    );
                    return attr::skip_value(&meta);
                }
                let mut steps = Vec::new();
                meta.parse_nested_meta(|inner| {
                    if !inner.input.peek(syn::Token![=]) {
                        cx.error(
                            &inner.path,
                            format_args!(
                                "expected `{} = N`: the schema version this type was stored at",
                                inner.path.to_token_stream().to_string().replace(' ', "")
                            ),
                        );
                        return attr::skip_value(&inner);
                    }
                    let value = inner.value()?;
                    if let Some(version) =
                        attr::version_value(cx, value, "upcast_from(OpenedV1 = 1)")?
                    {
                        steps.push(Upcast {
                            ty: inner.path.clone(),
                            version,
                        });
                    }
                    Ok(())
                })?;
                if let Some(ident) = key_ident {
                    out.upcast_from = Some((ident, steps));
                }
            }
        }
        Ok(())
    });
    out
}

/// Wire names are stored and compared byte for byte: keep them printable.
fn check_wire_name(cx: &mut Ctxt, tokens: &LitStr, value: &str, what: &str) {
    if value.is_empty() {
        cx.error(tokens, format_args!("the {what} must not be empty"));
    } else if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        cx.error(
            tokens,
            format_args!("the {what} {value:?} must not contain whitespace or control characters"),
        );
    }
}

/// One event kind: a variant of an enum, or the struct itself.
struct Kind {
    /// The variant (`None` for a struct).
    variant: Option<Ident>,
    shape: Shape,
    name: String,
    /// What to point at when the name is wrong.
    name_span: Span,
    version: u32,
    upcasts: Vec<Upcast>,
    /// Old wire names stored events of this kind may carry (`renamed_from`).
    aliases: Vec<LitStr>,
    /// Its personal fields (`#[personal(subject = ...)]`), by field name.
    personal: Vec<Personal>,
    /// For a struct event with personal fields: its named fields and `#[serde]` attributes,
    /// coded through a payload struct of the derive's own (as a variant with named fields).
    fields: Option<(Vec<syn::Field>, Vec<syn::Attribute>)>,
}

/// `#[personal(subject = customer_id)]` on a field.
struct Personal {
    field: Ident,
    subject: Ident,
}

const PERSONAL_EXAMPLE: &str = "#[personal(subject = customer_id)]";

/// The `#[personal(...)]` attributes of named `fields`, checked: each names another, non-personal
/// field as its subject.
fn parse_personal(cx: &mut Ctxt, fields: &[&syn::Field]) -> Vec<Personal> {
    let mut out: Vec<(Personal, Span)> = Vec::new();
    for field in fields {
        let attrs: Vec<&syn::Attribute> = field
            .attrs
            .iter()
            .filter(|a| a.path().is_ident("personal"))
            .collect();
        if attrs.is_empty() {
            continue;
        }
        let Some(ident) = &field.ident else {
            for a in attrs {
                cx.error(
                    a,
                    "`#[personal]` goes on a named field (of a struct event or of a variant with named fields), not on a tuple field",
                );
            }
            continue;
        };
        if attrs.len() > 1 {
            cx.error(attrs[1], "duplicate `#[personal]`: give it once per field");
        }
        let attr = attrs[0];
        let mut subject = None;
        if matches!(attr.meta, syn::Meta::Path(_)) {
            cx.error(
                attr,
                format_args!(
                    "`#[personal]` needs the field holding the data subject's id: `{PERSONAL_EXAMPLE}`"
                ),
            );
            continue;
        }
        attr::for_each_meta(cx, std::slice::from_ref(attr), "personal", |cx, meta| {
            if meta.path.is_ident("subject") {
                attr::check_duplicate(cx, &meta, &subject);
                if let Some(s) = attr::ident_value(cx, &meta, "subject = customer_id")? {
                    subject = Some(s);
                }
                Ok(())
            } else {
                attr::unknown_key(cx, &meta, "personal", "`subject`")
            }
        });
        let Some(subject) = subject else {
            if !cx.has_errors() {
                cx.error(
                    attr,
                    format_args!(
                        "`#[personal]` needs the field holding the data subject's id: `{PERSONAL_EXAMPLE}`"
                    ),
                );
            }
            continue;
        };
        // Serde attributes that would not write the field as one value of its own type.
        for a in field.attrs.iter().filter(|a| a.path().is_ident("serde")) {
            let text = a.meta.to_token_stream().to_string();
            for word in [
                "flatten",
                "skip",
                "with",
                "serialize_with",
                "deserialize_with",
                "skip_serializing",
                "skip_deserializing",
                "skip_serializing_if",
            ] {
                let hit = text
                    .split(|c: char| !c.is_alphanumeric() && c != '_')
                    .any(|w| w == word);
                if hit {
                    cx.error(
                        a,
                        format_args!(
                            "`#[serde({word})]` cannot be used on a `#[personal]` field: a personal field is stored as one encrypted value of its own type"
                        ),
                    );
                    break;
                }
            }
        }
        out.push((
            Personal {
                field: ident.clone(),
                subject,
            },
            attr.span(),
        ));
    }
    let names: Vec<&Ident> = fields.iter().filter_map(|f| f.ident.as_ref()).collect();
    for (p, _) in &out {
        if !names.contains(&&p.subject) {
            cx.error(
                &p.subject,
                format_args!(
                    "no field `{}` in this event: `subject` names another field of the same event that holds the data subject's id",
                    p.subject
                ),
            );
        } else if out.iter().any(|(q, _)| q.field == p.subject) {
            cx.error(
                &p.subject,
                format_args!(
                    "the subject `{}` is a personal field: the subject id is stored in the clear (it finds the key), so it must be an opaque id that is not personal itself",
                    p.subject
                ),
            );
        }
    }
    out.into_iter().map(|(p, _)| p).collect()
}

enum Shape {
    /// `Opened(Opened)`, or a struct event: the payload is a type of its own.
    Newtype(Type),
    /// `Closed { reason: String }`: the payload is the fields as a JSON object.
    Named(Vec<syn::Field>),
    /// `Frozen`: no payload.
    Unit,
}

/// Expands `#[derive(Event)]`.
pub(crate) fn expand(input: DeriveInput) -> syn::Result<TokenStream> {
    let mut cx = Ctxt::new();
    let krate = attr::crate_path(&mut cx, &input.attrs);
    let ident = &input.ident;
    if !input.generics.params.is_empty() {
        cx.error(
            &input.generics,
            "`#[derive(Event)]` does not support generic types: an event's wire form must be one concrete type",
        );
    }

    let mut splits = Vec::new();
    let kinds = match &input.data {
        Data::Enum(data) => {
            let mut container = parse_attrs(&mut cx, &input.attrs, Place::Enum);
            splits = std::mem::take(&mut container.splits);
            let rule = container.rename_all.unwrap_or(RenameRule::Snake);
            let prefix = container.prefix.map(|p| p.value());
            let mut kinds = Vec::new();
            for variant in &data.variants {
                let attrs = parse_attrs(&mut cx, &variant.attrs, Place::Variant);
                let shape = match &variant.fields {
                    Fields::Unnamed(f) if f.unnamed.len() == 1 => {
                        Shape::Newtype(f.unnamed[0].ty.clone())
                    }
                    Fields::Unnamed(f) => {
                        cx.error(
                            f,
                            "an event variant holds one payload type (`Opened(Opened)`) or named fields (`Closed { reason: String }`), not a tuple",
                        );
                        continue;
                    }
                    Fields::Named(f) => Shape::Named(f.named.iter().cloned().collect()),
                    Fields::Unit => Shape::Unit,
                };
                for field in variant.fields.iter() {
                    reject_field_attrs(&mut cx, field);
                }
                let fields: Vec<&syn::Field> = variant.fields.iter().collect();
                let personal = parse_personal(&mut cx, &fields);
                let mut k = kind(
                    &mut cx,
                    &variant.ident,
                    Some(variant.ident.clone()),
                    shape,
                    attrs,
                    prefix.as_deref(),
                    rule,
                );
                k.personal = personal;
                kinds.push(k);
            }
            kinds
        }
        Data::Struct(data) => {
            let mut attrs = parse_attrs(&mut cx, &input.attrs, Place::Struct);
            splits = std::mem::take(&mut attrs.splits);
            let rule = attrs.rename_all.unwrap_or(RenameRule::Snake);
            let prefix = attrs.prefix.as_ref().map(LitStr::value);
            for field in data.fields.iter() {
                reject_field_attrs(&mut cx, field);
            }
            let fields: Vec<&syn::Field> = data.fields.iter().collect();
            let personal = parse_personal(&mut cx, &fields);
            let self_ty: Type = syn::parse_quote!(Self);
            let mut k = kind(
                &mut cx,
                ident,
                None,
                Shape::Newtype(self_ty),
                attrs,
                prefix.as_deref(),
                rule,
            );
            if !personal.is_empty() {
                let serde_attrs = input
                    .attrs
                    .iter()
                    .filter(|a| a.path().is_ident("serde"))
                    .cloned()
                    .collect();
                k.fields = Some((data.fields.iter().cloned().collect(), serde_attrs));
            }
            k.personal = personal;
            vec![k]
        }
        Data::Union(data) => {
            cx.error(
                data.union_token,
                "`#[derive(Event)]` supports enums and structs, not unions",
            );
            Vec::new()
        }
    };
    check_duplicates(&mut cx, &kinds);
    check_splits(&mut cx, &kinds, &splits);

    if cx.has_errors() {
        let fallback = fallback(&krate, &input);
        let errors = cx.into_compile_errors();
        return Ok(quote! { #errors #fallback });
    }
    let body = generate(&krate, ident, &kinds, &splits);
    Ok(quote! { const _: () = { #body }; })
}

fn reject_field_attrs(cx: &mut Ctxt, field: &syn::Field) {
    for a in field.attrs.iter().filter(|a| a.path().is_ident("event")) {
        cx.error(
            a,
            "`#[event(...)]` goes on the type or on a variant, not on a field",
        );
    }
}

fn kind(
    cx: &mut Ctxt,
    named_after: &Ident,
    variant: Option<Ident>,
    shape: Shape,
    attrs: EventAttrs,
    prefix: Option<&str>,
    rule: RenameRule,
) -> Kind {
    let (name, name_span) = match &attrs.name {
        Some(name) => (name.value(), name.span()),
        None => (derived_name(prefix, rule, named_after), named_after.span()),
    };
    let version = attrs.version.as_ref().map_or(1, |v| v.value);
    let mut upcasts = Vec::new();
    if let Some((key, steps)) = attrs.upcast_from {
        if !matches!(shape, Shape::Newtype(_)) {
            cx.error(
                &key,
                "`upcast_from` needs a newtype variant such as `Opened(Opened)`: older versions convert into its payload type with `From`",
            );
        }
        let mut seen: HashMap<u32, ()> = HashMap::new();
        for step in steps {
            let v = step.version.value;
            if v == version || seen.insert(v, ()).is_some() {
                cx.error_at(
                    step.version.span,
                    format_args!("duplicate version {v} of event {name:?}: each (name, version) pair is decoded by exactly one type"),
                );
            } else if v > version {
                cx.error_at(
                    step.version.span,
                    format_args!("version {v} is not older than the current version {version} of event {name:?}; raise `version` or remove this entry"),
                );
            } else {
                upcasts.push(step);
            }
        }
    }
    upcasts.sort_by_key(|u| u.version.value);
    Kind {
        variant,
        shape,
        name,
        name_span,
        version,
        upcasts,
        aliases: attrs.renamed_from,
        personal: Vec::new(),
        fields: None,
    }
}

impl Kind {
    /// Every schema version this kind decodes: the older ones, then the current one.
    fn versions(&self) -> impl Iterator<Item = u32> + '_ {
        self.upcasts
            .iter()
            .map(|u| u.version.value)
            .chain(std::iter::once(self.version))
    }
}

fn derived_name(prefix: Option<&str>, rule: RenameRule, ident: &Ident) -> String {
    let base = rule.apply(&ident.to_string());
    match prefix {
        Some(p) => format!("{p}.{base}"),
        None => base,
    }
}

fn check_duplicates(cx: &mut Ctxt, kinds: &[Kind]) {
    let mut seen: HashMap<&str, &Kind> = HashMap::new();
    let variant_of = |k: &Kind| {
        k.variant
            .as_ref()
            .map_or_else(|| "the struct".to_owned(), |v| format!("variant `{v}`"))
    };
    for k in kinds {
        if let Some(first) = seen.get(k.name.as_str()) {
            let first_variant = first
                .variant
                .as_ref()
                .map_or_else(String::new, ToString::to_string);
            cx.error_at(
                k.name_span,
                format_args!(
                    "duplicate wire name {:?}: variant `{first_variant}` already uses it; give each variant its own name (an older version of the same event goes in `upcast_from`)",
                    k.name
                ),
            );
        } else {
            seen.insert(&k.name, k);
        }
    }
    // An old name decodes as exactly one kind, and is nobody's current name.
    let mut old: HashMap<String, &Kind> = HashMap::new();
    for k in kinds {
        for alias in &k.aliases {
            let value = alias.value();
            if let Some(owner) = seen.get(value.as_str()) {
                let message = if std::ptr::eq(*owner, k) {
                    format!(
                        "{value:?} is this event's current wire name, not an old one: remove it from `renamed_from`"
                    )
                } else {
                    format!(
                        "the old wire name {value:?} is the current name of {}: a stored name decodes as one event",
                        variant_of(owner)
                    )
                };
                cx.error(alias, message);
            } else if let Some(owner) = old.get(&value) {
                cx.error(
                    alias,
                    format_args!(
                        "the old wire name {value:?} is already listed in `renamed_from` of {}: a stored name decodes as one event",
                        variant_of(owner)
                    ),
                );
            } else {
                old.insert(value, k);
            }
        }
    }
}

/// A split names a stored (name, version) no other event decodes.
fn check_splits(cx: &mut Ctxt, kinds: &[Kind], splits: &[Split]) {
    let mut taken: HashMap<(String, u32), String> = HashMap::new();
    for k in kinds {
        let who = k
            .variant
            .as_ref()
            .map_or_else(|| "this event".to_owned(), |v| format!("variant `{v}`"));
        for name in std::iter::once(k.name.clone()).chain(k.aliases.iter().map(LitStr::value)) {
            for v in k.versions() {
                taken.insert((name.clone(), v), who.clone());
            }
        }
    }
    for split in splits {
        let key = (split.name.value(), split.version.value);
        if let Some(who) = taken.get(&key) {
            cx.error(
                &split.name,
                format_args!(
                    "{:?} at version {} is already decoded by {who}: a stored (name, version) pair is decoded one way; split another version or remove it there",
                    key.0, key.1
                ),
            );
        } else {
            taken.insert(key, "an earlier `split`".to_owned());
        }
    }
}

fn generate(krate: &Path, ident: &Ident, kinds: &[Kind], splits: &[Split]) -> TokenStream {
    let private = quote!(#krate::__private);
    let serde_crate = format!("{}::__private::serde", krate.to_token_stream()).replace(' ', "");
    let impl_attrs = attr::impl_attrs();

    let names: Vec<&str> = kinds.iter().map(|k| k.name.as_str()).collect();
    // Every name a reader must fetch: current names, old names, split events' names.
    let mut all_names: Vec<String> = Vec::new();
    let mut versions: Vec<TokenStream> = Vec::new();
    for k in kinds {
        all_names.push(k.name.clone());
        all_names.extend(k.aliases.iter().map(LitStr::value));
        let name = k.name.as_str();
        versions.extend(k.versions().map(|v| quote!((#name, #v))));
    }
    for split in splits {
        all_names.push(split.name.value());
        let (name, v) = (split.name.value(), split.version.value);
        versions.push(quote!((#name, #v)));
    }
    let mut unique = std::collections::HashSet::new();
    all_names.retain(|n| unique.insert(n.clone()));
    let is_struct = kinds.first().is_some_and(|k| k.variant.is_none());

    let mut type_arms = Vec::new();
    let mut version_arms = Vec::new();
    let mut encode_arms = Vec::new();
    let mut decode_arms = Vec::new();

    for k in kinds {
        let name = k.name.as_str();
        let aliases: Vec<String> = k.aliases.iter().map(LitStr::value).collect();
        // `"loan.made" | "library.loaned"`: an old name decodes like the current one.
        let name_pattern = quote!(#name #(| #aliases)*);
        let version = k.version;
        let pattern = match (&k.variant, &k.shape) {
            (None, _) => quote!(_),
            (Some(v), Shape::Newtype(_)) => quote!(Self::#v(..)),
            (Some(v), Shape::Named(_)) => quote!(Self::#v { .. }),
            (Some(v), Shape::Unit) => quote!(Self::#v),
        };
        type_arms.push(quote!(#pattern => #name));
        version_arms.push(quote!(#pattern => #version));

        match &k.shape {
            Shape::Newtype(ty) => {
                let construct = |value: TokenStream| match &k.variant {
                    Some(v) => quote!(Self::#v(#value)),
                    None => value,
                };
                if let Some((fields, container)) = &k.fields {
                    let (encode, decode) = named_codec(
                        &private,
                        &serde_crate,
                        fields,
                        &k.personal,
                        container,
                        &quote!(Self),
                    );
                    encode_arms.push(encode);
                    decode_arms.push(quote!((#name_pattern, #version) => #decode));
                } else {
                    let encode =
                        quote_spanned!(ty.span()=> #private::encode_json::<#ty>(__payload));
                    encode_arms.push(match &k.variant {
                        Some(v) => quote!(Self::#v(__payload) => #encode),
                        None => quote!(__payload => #encode),
                    });
                    let decode = quote_spanned!(ty.span()=> #private::decode_json::<#ty>(__raw)?);
                    let current = construct(decode);
                    decode_arms.push(
                        quote!((#name_pattern, #version) => ::core::result::Result::Ok(#current)),
                    );
                }
                // Each older version decodes as its own type, then steps forward one `From` at a
                // time; a missing link fails on the `upcast_from` entry that needs it.
                for (i, step) in k.upcasts.iter().enumerate() {
                    let old = &step.ty;
                    let v = step.version.value;
                    let mut body = vec![quote_spanned!(old.span()=>
                        let __value = #private::decode_json::<#old>(__raw)?;
                    )];
                    for (j, from) in k.upcasts.iter().enumerate().skip(i) {
                        let from_ty = &from.ty;
                        // Both types carry the older type's span, so a missing `From` is
                        // reported on the entry that cannot move forward.
                        let to = match k.upcasts.get(j + 1) {
                            Some(next) => respan(next.ty.to_token_stream(), from_ty.span()),
                            None => respan(ty.to_token_stream(), from_ty.span()),
                        };
                        body.push(quote_spanned!(from_ty.span()=>
                            let __value = #private::upcast::<#from_ty, #to>(__value, __stored)?;
                        ));
                    }
                    let done = construct(quote!(__value));
                    decode_arms.push(quote! {
                        (#name_pattern, #v) => {
                            #(#body)*
                            ::core::result::Result::Ok(#done)
                        }
                    });
                }
            }
            Shape::Named(fields) => {
                let Some(v) = &k.variant else { continue };
                let (encode, decode) = named_codec(
                    &private,
                    &serde_crate,
                    fields,
                    &k.personal,
                    &[],
                    &quote!(Self::#v),
                );
                encode_arms.push(encode);
                decode_arms.push(quote!((#name_pattern, #version) => #decode));
            }
            Shape::Unit => {
                let Some(v) = &k.variant else { continue };
                encode_arms.push(quote! {
                    Self::#v => #private::encode_json(&#private::EmptyPayload {})
                });
                // A unit event carries nothing: whatever was stored beside its name is ignored.
                decode_arms.push(quote! {
                    (#name_pattern, #version) => ::core::result::Result::Ok(Self::#v)
                });
            }
        }
    }

    let (type_body, version_body, encode_body) = if is_struct {
        let name = names.first().copied().unwrap_or_default();
        let version = kinds.first().map_or(1, |k| k.version);
        let encode = encode_arms.first().cloned().unwrap_or_default();
        (
            quote!(#name),
            quote!(#version),
            quote!(match self { #encode }),
        )
    } else {
        (
            quote!(match *self { #(#type_arms,)* }),
            quote!(match *self { #(#version_arms,)* }),
            quote!(match self { #(#encode_arms,)* }),
        )
    };

    // A split decodes only through `decode_all`; `decode` names the reason it cannot.
    let mut split_arms = Vec::new();
    for split in splits {
        let (name, v, from) = (split.name.value(), split.version.value, &split.from);
        decode_arms.push(quote! {
            (#name, #v) => ::core::result::Result::Err(#private::DecodeError::Split {
                event_type: #private::String::from(#name),
                version: #v,
            })
        });
        let vec_self = respan(quote!(#private::Vec<Self>), from.span());
        split_arms.push(quote_spanned! {from.span()=>
            (#name, #v) => {
                let __value = #private::decode_json::<#from>(__stored.payload)?;
                let __events = #private::upcast::<#from, #vec_self>(__value, __stored)?;
                ::core::result::Result::Ok(#private::Decoded::Split(__events))
            }
        });
    }
    let decode_all = if split_arms.is_empty() {
        TokenStream::new()
    } else {
        quote! {
            fn decode_all(
                __stored: &#private::Stored<'_>,
            ) -> ::core::result::Result<#private::Decoded<Self>, #private::DecodeError> {
                match (__stored.event_type, __stored.schema_version) {
                    #(#split_arms,)*
                    _ => <Self as #krate::Event>::decode(__stored).map(#private::Decoded::One),
                }
            }
        }
    };

    let has_personal = if kinds.iter().any(|k| !k.personal.is_empty()) {
        quote!(
            const HAS_PERSONAL_DATA: bool = true;
        )
    } else {
        TokenStream::new()
    };

    quote! {
        #impl_attrs
        impl #krate::Event for #ident {
            #has_personal
            fn event_type(&self) -> &'static str { #type_body }
            fn schema_version(&self) -> u32 { #version_body }
            fn event_types() -> &'static [&'static str] { &[#(#all_names),*] }
            fn event_versions() -> &'static [(&'static str, u32)] { &[#(#versions),*] }
            fn encode(&self) -> ::core::result::Result<
                #private::Box<#private::RawValue>,
                #private::EncodeError,
            > {
                #encode_body
            }
            fn decode(
                __stored: &#private::Stored<'_>,
            ) -> ::core::result::Result<Self, #private::DecodeError> {
                let __raw = __stored.payload;
                match (__stored.event_type, __stored.schema_version) {
                    #(#decode_arms,)*
                    _ => ::core::result::Result::Err(#private::DecodeError::unknown(
                        __stored.event_type,
                        __stored.schema_version,
                    )),
                }
            }
            #decode_all
        }
    }
}

/// The encode arm and the decode expression of an event whose payload is its named `fields`
/// (`pattern { fields }`), through payload structs of the derive's own; personal fields go out in
/// their plaintext form and come back through `Opened`.
fn named_codec(
    private: &TokenStream,
    serde_crate: &str,
    fields: &[syn::Field],
    personal: &[Personal],
    container: &[syn::Attribute],
    pattern: &TokenStream,
) -> (TokenStream, TokenStream) {
    let idents: Vec<&Ident> = fields.iter().filter_map(|f| f.ident.as_ref()).collect();
    let serde_attrs: Vec<Vec<&syn::Attribute>> = fields
        .iter()
        .map(|f| {
            f.attrs
                .iter()
                .filter(|a| a.path().is_ident("serde"))
                .collect()
        })
        .collect();
    let mut out_types = Vec::new();
    let mut out_values = Vec::new();
    let mut in_types = Vec::new();
    let mut in_values = Vec::new();
    let mut checks = Vec::new();
    for (field, ident) in fields.iter().zip(&idents) {
        let ty = &field.ty;
        match personal.iter().find(|p| &&p.field == ident) {
            Some(p) => {
                let subject = &p.subject;
                checks.push(quote_spanned!(ty.span()=> #private::personal::check_field::<#ty>();));
                checks.push(
                    quote_spanned!(subject.span()=> #private::personal::check_subject(#subject);),
                );
                out_types.push(quote!(#private::personal::Sealed<'__a, #ty>));
                out_values.push(quote!(#private::personal::seal(#subject, #ident)));
                in_types.push(quote!(#private::personal::Opened<#ty>));
                in_values.push(quote!(__payload.#ident.into_inner()));
            }
            None => {
                out_types.push(quote!(&'__a #ty));
                out_values.push(quote!(#ident));
                in_types.push(quote!(#ty));
                in_values.push(quote!(__payload.#ident));
            }
        }
    }
    let lifetime = if idents.is_empty() {
        TokenStream::new()
    } else {
        quote!(<'__a>)
    };
    let encode = quote! {
        #pattern { #(#idents),* } => {
            #(#checks)*
            #[derive(#private::serde::Serialize)]
            #[serde(crate = #serde_crate)]
            #(#container)*
            struct __Payload #lifetime { #( #(#serde_attrs)* #idents: #out_types, )* }
            #private::encode_json(&__Payload { #(#idents: #out_values),* })
        }
    };
    let decode = quote! {
        {
            #[derive(#private::serde::Deserialize)]
            #[serde(crate = #serde_crate)]
            #(#container)*
            struct __Payload { #( #(#serde_attrs)* #idents: #in_types, )* }
            let __payload: __Payload = #private::decode_json(__raw)?;
            ::core::result::Result::Ok(#pattern { #(#idents: #in_values),* })
        }
    };
    (encode, decode)
}

/// Gives every token of `tokens` the span `span`.
fn respan(tokens: TokenStream, span: Span) -> TokenStream {
    tokens
        .into_iter()
        .map(|mut tree| {
            if let proc_macro2::TokenTree::Group(group) = &tree {
                let mut inner =
                    proc_macro2::Group::new(group.delimiter(), respan(group.stream(), span));
                inner.set_span(span);
                tree = proc_macro2::TokenTree::Group(inner);
            } else {
                tree.set_span(span);
            }
            tree
        })
        .collect()
}

/// A do-nothing impl so that, next to the real errors, uses of the type do not add more.
fn fallback(krate: &Path, input: &DeriveInput) -> TokenStream {
    if matches!(input.data, Data::Union(_)) || !input.generics.params.is_empty() {
        return TokenStream::new();
    }
    let ident = &input.ident;
    let private = quote!(#krate::__private);
    quote! {
        const _: () = {
            impl #krate::Event for #ident {
                fn event_type(&self) -> &'static str { ::core::unreachable!() }
                fn schema_version(&self) -> u32 { ::core::unreachable!() }
                fn event_types() -> &'static [&'static str] { &[] }
                fn encode(&self) -> ::core::result::Result<#private::Box<#private::RawValue>, #private::EncodeError> {
                    ::core::unreachable!()
                }
                fn decode(_: &#private::Stored<'_>) -> ::core::result::Result<Self, #private::DecodeError> {
                    ::core::unreachable!()
                }
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attr::emitted_errors;
    use syn::parse_quote;

    fn generated(input: DeriveInput) -> String {
        let tokens = expand(input).expect("expands");
        assert!(emitted_errors(&tokens).is_empty(), "{tokens}");
        syn::parse2::<syn::File>(tokens.clone()).expect("generated code parses");
        tokens.to_string()
    }

    fn errors(input: DeriveInput) -> Vec<String> {
        emitted_errors(&expand(input).expect("expands"))
    }

    #[test]
    fn names_versions_and_shapes() {
        let code = generated(parse_quote! {
            #[event(prefix = "account")]
            enum AccountEvent {
                Opened(Opened),
                #[event(name = "account.money_in", version = 2)]
                Deposited(Deposited),
                Closed { reason: String },
                Frozen,
            }
        });
        assert!(code.contains(
            r#"& ["account.opened" , "account.money_in" , "account.closed" , "account.frozen"]"#
        ));
        assert!(code.contains(r#"Self :: Deposited (..) => 2u32"#), "{code}");
        assert!(code.contains(r#"("account.money_in" , 2u32) =>"#), "{code}");
        assert!(code.contains("struct __Payload < '__a > { reason : & '__a String , }"));
        assert!(code.contains("EmptyPayload"));
        assert!(code.contains("const _ : () ="));
        assert!(code.contains(":: factum :: __private :: DecodeError :: unknown"));
    }

    #[test]
    fn the_upcast_chain_is_walked_in_version_order() {
        let code = generated(parse_quote! {
            enum E {
                #[event(name = "x", version = 3, upcast_from(V2 = 2, V1 = 1))]
                X(X),
            }
        });
        let v1 = code.find(r#"("x" , 1u32)"#).expect("v1 arm");
        let v1_arm = &code[v1..];
        let steps: Vec<usize> = ["upcast :: < V1 , V2 >", "upcast :: < V2 , X >"]
            .iter()
            .map(|s| v1_arm.find(s).expect(s))
            .collect();
        assert!(steps[0] < steps[1], "{v1_arm}");
        let v2 = code.find(r#"("x" , 2u32)"#).expect("v2 arm");
        assert!(code[v2..].contains("decode_json :: < V2 >"));
    }

    #[test]
    fn a_struct_event_is_its_own_payload() {
        let code = generated(parse_quote! {
            #[event(prefix = "shop", rename_all = "kebab-case", version = 2, upcast_from(OrderPlacedV1 = 1))]
            struct OrderPlaced { id: u64 }
        });
        assert!(code.contains(r#"& ["shop.order-placed"]"#), "{code}");
        assert!(
            code.contains("upcast :: < OrderPlacedV1 , Self >"),
            "{code}"
        );
    }

    #[test]
    fn the_crate_path_can_be_overridden() {
        let code = generated(parse_quote! {
            #[factum(crate = "::reexport::factum")]
            #[event(name = "x")]
            struct X {}
        });
        assert!(code.contains("impl :: reexport :: factum :: Event for X"));
        assert!(code.contains(":: reexport :: factum :: __private :: encode_json"));
        assert!(!code.contains("{ :: factum ::") && !code.contains("(:: factum ::"));
    }

    #[test]
    fn all_attribute_errors_are_reported_together_with_a_fallback_impl() {
        let input: DeriveInput = parse_quote! {
            #[event(prefix = "account", rename_all = "shouting", version = 2)]
            enum AccountEvent {
                #[event(name = "account.opened", verison = 2)]
                Opened(Opened),
                #[event(name = "account.opened", version = "2")]
                Reopened(Opened),
                Moved(String, String),
            }
        };
        let tokens = expand(input).expect("expands");
        let errors = emitted_errors(&tokens);
        assert_eq!(errors.len(), 6, "{errors:#?}");
        assert!(errors[0].contains("unknown `rename_all` rule"));
        assert!(errors[1].contains("`version` is not allowed on the enum"));
        assert!(errors[2].contains("unknown `event` attribute `verison`"));
        assert!(errors[3].contains("expected a positive integer"));
        assert!(errors[4].contains("not a tuple"));
        assert!(errors[5].contains("duplicate wire name \"account.opened\""));
        // The fallback keeps `AccountEvent: Event` true, so uses of it add no errors.
        assert!(tokens.to_string().contains("unreachable"));
    }

    #[test]
    fn duplicate_and_out_of_range_versions() {
        let errors = errors(parse_quote! {
            enum E {
                #[event(name = "x", version = 2, upcast_from(A = 1, B = 1, C = 2, D = 3, F = 0))]
                X(X),
                #[event(name = "y", version = 2, upcast_from(A = 1))]
                Y { a: u8 },
            }
        });
        assert_eq!(errors.len(), 5, "{errors:#?}");
        assert!(errors[0].starts_with("schema versions start at 1"));
        assert!(errors[1].starts_with("duplicate version 1 of event \"x\""));
        assert!(errors[2].starts_with("duplicate version 2 of event \"x\""));
        assert!(errors[3].starts_with("version 3 is not older"));
        assert!(errors[4].starts_with("`upcast_from` needs a newtype variant"));
    }

    #[test]
    fn unsupported_items() {
        let union = errors(parse_quote!(union U { a: u8 }));
        assert_eq!(
            union,
            ["`#[derive(Event)]` supports enums and structs, not unions"]
        );
        let generic = errors(parse_quote!(
            enum G<T> {
                A(T),
            }
        ));
        assert!(generic[0].contains("does not support generic types"));
        let empty_name = errors(parse_quote!(
            #[event(name = "")]
            struct S {}
        ));
        assert_eq!(empty_name, ["the wire name must not be empty"]);
    }
}
