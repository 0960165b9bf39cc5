//! Parsing `#[idempotent(...)]`, with a span on every value so misuse is reported on the offending token.

use proc_macro2::Span;
use syn::meta::ParseNestedMeta;
use syn::spanned::Spanned;
use syn::{Expr, ExprLit, ExprUnary, Lit, LitBool, LitStr, Path, Type, UnOp};

const ARGUMENTS: &str =
    "`ttl`, `wait_timeout`, `lease`, `validate_signature`, `required`, `store_server_errors`, `state`, `crate`";

/// The default lease, in nanoseconds (30 s): kept equal to `Policy::new()` in the runtime.
const DEFAULT_LEASE_NANOS: u64 = 30_000_000_000;

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
            return Err(meta.error(format!("unknown argument; expected one of {ARGUMENTS}")));
        };
        match name.as_str() {
            "ttl" => set(&meta, &mut self.ttl, |meta| seconds(meta, Zero::Refused)),
            "wait_timeout" => set(&meta, &mut self.wait_timeout, |meta| seconds(meta, Zero::Allowed)),
            "lease" => set(&meta, &mut self.lease, |meta| seconds(meta, Zero::Refused)),
            "validate_signature" => set(&meta, &mut self.validate_signature, flag),
            "required" => set(&meta, &mut self.required, flag),
            "store_server_errors" => set(&meta, &mut self.store_server_errors, flag),
            "state" => set(&meta, &mut self.state, |meta| meta.value()?.parse()),
            "crate" => set(&meta, &mut self.krate, |meta| meta.value()?.parse::<LitStr>()?.parse()),
            _ => Err(meta.error(format!("unknown argument `{name}`; expected one of {ARGUMENTS}"))),
        }
    }

    /// Checks that the durations fit together. A lease left at its default shrinks to fit a short `ttl`; one the
    /// user wrote must fit as written.
    pub fn validate(&self) -> syn::Result<()> {
        let Some(ttl) = self.ttl else { return Ok(()) };
        for (name, value) in [("lease", self.lease), ("wait_timeout", self.wait_timeout)] {
            if let Some(value) = value.filter(|value| value.nanos > ttl.nanos) {
                return Err(syn::Error::new(
                    value.span,
                    format!("`{name}` must not exceed `ttl`: a record must outlive the time spent running or waiting"),
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
        return Err(meta.error(format!("`{name}` set multiple times")));
    }
    *slot = Some(parse(meta)?);
    Ok(())
}

#[derive(PartialEq)]
enum Zero {
    Allowed,
    Refused,
}

fn seconds(meta: &ParseNestedMeta<'_>, zero: Zero) -> syn::Result<Seconds> {
    let expr: Expr = meta.value()?.parse()?;
    let span = expr.span();
    let expected = "expected a number of seconds, like `60` or `2.5`";
    let secs = match &expr {
        Expr::Lit(ExprLit { lit: Lit::Int(int), .. }) => int.base10_parse::<u64>()? as f64,
        Expr::Lit(ExprLit { lit: Lit::Float(float), .. }) => float.base10_parse::<f64>()?,
        Expr::Unary(ExprUnary { op: UnOp::Neg(_), .. }) => {
            return Err(syn::Error::new(span, "a duration cannot be negative"));
        }
        _ => return Err(syn::Error::new(span, expected)),
    };
    if !secs.is_finite() || secs > 1e9 {
        return Err(syn::Error::new(span, "this duration is too large"));
    }
    let nanos = (secs * 1e9).round() as u64;
    if nanos == 0 && zero == Zero::Refused {
        return Err(syn::Error::new(span, "this duration must be greater than zero"));
    }
    Ok(Seconds { nanos, span })
}

/// `name` alone means true; `name = true` / `name = false` as written.
fn flag(meta: &ParseNestedMeta<'_>) -> syn::Result<bool> {
    if meta.input.is_empty() || meta.input.peek(syn::Token![,]) {
        return Ok(true);
    }
    let expr: Expr = meta.value()?.parse()?;
    match expr {
        Expr::Lit(ExprLit { lit: Lit::Bool(LitBool { value, .. }), .. }) => Ok(value),
        other => Err(syn::Error::new(other.span(), "expected `true` or `false`")),
    }
}
