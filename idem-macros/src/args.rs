//! Parsing `#[idempotent(...)]`, with a span on every value so misuse is reported on the offending token.

use proc_macro2::Span;
use syn::meta::ParseNestedMeta;
use syn::spanned::Spanned;
use syn::{Expr, ExprLit, ExprUnary, Lit, LitBool, LitStr, Path, Type, UnOp};

const ARGUMENTS: &str =
    "`ttl`, `wait_timeout`, `lease`, `validate_signature`, `required`, `store_server_errors`, `state`, `crate`";

/// The default ttl, in nanoseconds (24 h): kept equal to `Policy::new()` in the runtime.
const DEFAULT_TTL_NANOS: u64 = 86_400_000_000_000;

/// The default lease, in nanoseconds (30 s): kept equal to `Policy::new()` in the runtime.
const DEFAULT_LEASE_NANOS: u64 = 30_000_000_000;

/// The largest duration accepted, in seconds: far beyond any sensible ttl, and small enough to fit in nanoseconds.
const MAX_SECONDS: f64 = 1e9;

/// A duration given in seconds, as a positive integer or float literal.
#[derive(Clone, Copy)]
pub struct Seconds {
    pub nanos: u64,
    pub span: Span,
}

#[derive(Default)]
pub struct Args {
    pub ttl: Option<Seconds>,
    pub wait_timeout: Option<Seconds>,
    pub lease: Option<Seconds>,
    pub validate_signature: Option<bool>,
    pub required: Option<bool>,
    pub store_server_errors: Option<bool>,
    pub state: Option<Type>,
    pub krate: Option<Path>,
}

impl Args {
    pub fn parse_meta(&mut self, meta: ParseNestedMeta<'_>) -> syn::Result<()> {
        let Some(name) = meta.path.get_ident().map(|ident| ident.to_string()) else {
            return Err(syn::Error::new_spanned(&meta.path, format!("unknown argument; expected one of {ARGUMENTS}")));
        };
        match name.as_str() {
            "ttl" => set(&meta, &mut self.ttl, |meta| seconds(meta, &name, Zero::Refused)),
            "wait_timeout" => set(&meta, &mut self.wait_timeout, |meta| seconds(meta, &name, Zero::Allowed)),
            "lease" => set(&meta, &mut self.lease, |meta| seconds(meta, &name, Zero::Refused)),
            "validate_signature" => set(&meta, &mut self.validate_signature, |meta| flag(meta, &name)),
            "required" => set(&meta, &mut self.required, |meta| flag(meta, &name)),
            "store_server_errors" => set(&meta, &mut self.store_server_errors, |meta| flag(meta, &name)),
            "state" => set(&meta, &mut self.state, state),
            "crate" => set(&meta, &mut self.krate, krate),
            _ => Err(meta.error(format!("unknown argument `{name}`; expected one of {ARGUMENTS}"))),
        }
    }

    /// Checks that the durations fit together, against the default `ttl` when none is written. A lease left at its
    /// default shrinks to fit a short `ttl`; one the user wrote must fit as written.
    pub fn validate(&self) -> syn::Result<()> {
        let (ttl, ttl_name) = match self.ttl {
            Some(ttl) => (ttl.nanos, "`ttl`"),
            None => (DEFAULT_TTL_NANOS, "the default `ttl`"),
        };
        for (name, value) in [("lease", self.lease), ("wait_timeout", self.wait_timeout)] {
            if let Some(value) = value.filter(|value| value.nanos > ttl) {
                return Err(syn::Error::new(
                    value.span,
                    format!(
                        "`{name}` ({} s) must not exceed {ttl_name} ({} s): a record must outlive the time spent \
                         running or waiting; lower `{name}` or raise `ttl`",
                        display_seconds(value.nanos),
                        display_seconds(ttl),
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The effective lease.
    pub fn lease_nanos(&self) -> u64 {
        match (self.lease, self.ttl) {
            (Some(lease), _) => lease.nanos,
            (None, Some(ttl)) => DEFAULT_LEASE_NANOS.min(ttl.nanos),
            (None, None) => DEFAULT_LEASE_NANOS,
        }
    }
}

fn set<T>(
    meta: &ParseNestedMeta<'_>,
    slot: &mut Option<T>,
    parse: impl FnOnce(&ParseNestedMeta<'_>) -> syn::Result<T>,
) -> syn::Result<()> {
    if slot.is_some() {
        let name = meta.path.get_ident().map(ToString::to_string).unwrap_or_default();
        return Err(meta.error(format!("`{name}` set multiple times; keep one")));
    }
    *slot = Some(parse(meta)?);
    Ok(())
}

#[derive(PartialEq)]
enum Zero {
    Allowed,
    Refused,
}

fn seconds(meta: &ParseNestedMeta<'_>, name: &str, zero: Zero) -> syn::Result<Seconds> {
    let expr: Expr = meta.value()?.parse()?;
    let secs = match &expr {
        Expr::Lit(ExprLit { lit: Lit::Int(int), .. }) => int.base10_parse::<u64>()? as f64,
        Expr::Lit(ExprLit { lit: Lit::Float(float), .. }) => float.base10_parse::<f64>()?,
        Expr::Unary(ExprUnary { op: UnOp::Neg(_), .. }) => {
            let fix = match zero {
                Zero::Allowed => format!("; `{name} = 0` answers at once"),
                Zero::Refused => String::new(),
            };
            return Err(syn::Error::new_spanned(expr, format!("`{name}` cannot be negative{fix}")));
        }
        _ => {
            return Err(syn::Error::new_spanned(
                expr,
                format!("`{name}` expects a number of seconds, like `{name} = 60` or `{name} = 2.5`"),
            ));
        }
    };
    let span = expr.span();
    if !secs.is_finite() || secs > MAX_SECONDS {
        return Err(syn::Error::new(span, format!("`{name}` is too large: at most {MAX_SECONDS} seconds")));
    }
    let nanos = (secs * 1e9).round() as u64;
    if nanos == 0 && zero == Zero::Refused {
        return Err(syn::Error::new(span, format!("`{name}` must be greater than zero")));
    }
    Ok(Seconds { nanos, span })
}

/// `name` alone means true; `name = true` / `name = false` as written.
fn flag(meta: &ParseNestedMeta<'_>, name: &str) -> syn::Result<bool> {
    if meta.input.is_empty() || meta.input.peek(syn::Token![,]) {
        return Ok(true);
    }
    let expr: Expr = meta.value()?.parse()?;
    match expr {
        Expr::Lit(ExprLit { lit: Lit::Bool(LitBool { value, .. }), .. }) => Ok(value),
        other => Err(syn::Error::new_spanned(
            other,
            format!("`{name}` expects `true` or `false` (or nothing: `{name}` alone means `true`)"),
        )),
    }
}

/// `state = AppState`: any type.
fn state(meta: &ParseNestedMeta<'_>) -> syn::Result<Type> {
    let value = meta.value()?;
    value.parse().map_err(|error| {
        syn::Error::new(error.span(), "`state` expects the router's state type, like `state = AppState`")
    })
}

/// `crate = "path::to::idem"`: a path in a string, as tokio and serde take it.
fn krate(meta: &ParseNestedMeta<'_>) -> syn::Result<Path> {
    let expected = r#"`crate` expects the path to the `idem` crate in a string, like `crate = "::idem"`"#;
    let expr: Expr = meta.value()?.parse()?;
    match &expr {
        Expr::Lit(ExprLit { lit: Lit::Str(path), .. }) => {
            parse_path(path).map_err(|_| syn::Error::new_spanned(path, expected))
        }
        _ => Err(syn::Error::new_spanned(expr, expected)),
    }
}

fn parse_path(path: &LitStr) -> syn::Result<Path> {
    path.parse_with(Path::parse_mod_style)
}

/// `30`, `2.5`, `0.001`: seconds as the user would write them.
fn display_seconds(nanos: u64) -> String {
    let secs = nanos / 1_000_000_000;
    let fraction = nanos % 1_000_000_000;
    if fraction == 0 {
        return secs.to_string();
    }
    let fraction = format!("{fraction:09}");
    format!("{secs}.{}", fraction.trim_end_matches('0'))
}
