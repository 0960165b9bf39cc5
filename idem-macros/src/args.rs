//! Parsing `#[idempotent(...)]`, with a span on every value so misuse is reported on the offending token.

use proc_macro2::Span;
use syn::meta::ParseNestedMeta;
use syn::{Expr, ExprLit, ExprUnary, Lit, LitBool, LitStr, Path, Type, UnOp};

const ARGUMENTS: &str = "`ttl`, `wait_timeout`, `lease`, `validate_signature`, `required`, `store_server_errors`, `policy`, `state`, `crate`";

/// The default ttl, in nanoseconds (24 h): kept equal to `Policy::new()` in the runtime.
pub const DEFAULT_TTL_NANOS: u64 = 86_400_000_000_000;

/// The default lease, in nanoseconds (30 s): kept equal to `Policy::new()` in the runtime.
pub const DEFAULT_LEASE_NANOS: u64 = 30_000_000_000;

/// The largest duration accepted, in seconds: far beyond any sensible ttl, and small enough to fit in nanoseconds.
/// Kept equal to the bound `macro_support` applies to consts.
pub const MAX_SECONDS: u64 = 1_000_000_000;

const NANOS_PER_SECOND: u64 = 1_000_000_000;

/// A duration as written: a literal number of seconds, checked while parsing, or an expression (a const, or any
/// const expression) whose value only the compiler knows, checked by the code generated for it.
pub enum Seconds {
    Literal { nanos: u64, span: Span },
    Const(Box<Expr>),
}

impl Seconds {
    /// How an error message names the value: `30 s` for a literal, `` `ORDER_TTL` `` for a const.
    pub fn describe(&self) -> String {
        match self {
            Seconds::Literal { nanos, .. } => format!("{} s", display_seconds(*nanos)),
            Seconds::Const(expr) => format!("`{}`", expression_text(expr)),
        }
    }
}

#[derive(Default)]
pub struct Args {
    pub ttl: Option<Seconds>,
    pub wait_timeout: Option<Seconds>,
    pub lease: Option<Seconds>,
    pub validate_signature: Option<bool>,
    pub required: Option<bool>,
    pub store_server_errors: Option<bool>,
    /// `policy = "name"`: the route's whole policy, registered on the engine at run time under that name.
    pub policy: Option<LitStr>,
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
            "policy" => set(&meta, &mut self.policy, named_policy),
            "state" => set(&meta, &mut self.state, state),
            "crate" => set(&meta, &mut self.krate, krate),
            _ => Err(meta.error(format!("unknown argument `{name}`; expected one of {ARGUMENTS}"))),
        }
    }

    /// Checks that literal durations fit together, against the default `ttl` when none is written. A lease left at
    /// its default shrinks to fit a short `ttl`; one the user wrote must fit as written. A pair involving a const is
    /// checked by the generated code instead (see `policy.rs`).
    pub fn validate(&self) -> syn::Result<()> {
        if let Some(name) = &self.policy {
            let written = [
                ("ttl", self.ttl.is_some()),
                ("wait_timeout", self.wait_timeout.is_some()),
                ("lease", self.lease.is_some()),
                ("validate_signature", self.validate_signature.is_some()),
                ("required", self.required.is_some()),
                ("store_server_errors", self.store_server_errors.is_some()),
            ];
            if let Some((setting, _)) = written.iter().find(|(_, written)| *written) {
                return Err(syn::Error::new(
                    name.span(),
                    format!(
                        "`policy = \"{}\"` takes the route's whole policy from the engine at run time, so `{setting}` \
                         cannot be set here too: set it on the `Policy` registered with `route_policy`",
                        name.value()
                    ),
                ));
            }
            return Ok(());
        }
        let ttl = match &self.ttl {
            Some(Seconds::Literal { nanos, .. }) => *nanos,
            None => DEFAULT_TTL_NANOS,
            Some(Seconds::Const(_)) => return Ok(()),
        };
        for (name, value) in [("lease", &self.lease), ("wait_timeout", &self.wait_timeout)] {
            if let Some(value @ Seconds::Literal { nanos, span }) = value
                && *nanos > ttl
            {
                return Err(syn::Error::new(*span, exceeds_ttl(name, value, self.ttl.as_ref())));
            }
        }
        Ok(())
    }
}

/// The message for a `lease` or `wait_timeout` longer than the `ttl` (`None`: the default one).
pub fn exceeds_ttl(name: &str, value: &Seconds, ttl: Option<&Seconds>) -> String {
    let ttl = match ttl {
        Some(ttl) => format!("`ttl` ({})", ttl.describe()),
        None => format!("the default `ttl` ({} s)", display_seconds(DEFAULT_TTL_NANOS)),
    };
    format!(
        "`{name}` ({}) must not exceed {ttl}: a record must outlive the time spent running or waiting; lower \
         `{name}` or raise `ttl`",
        value.describe(),
    )
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

/// Whether a duration may be zero: a zero `wait_timeout` answers at once; a zero `ttl` or `lease` is a mistake.
#[derive(Clone, Copy, PartialEq)]
pub enum Zero {
    Allowed,
    Refused,
}

/// A literal is converted here, exactly (decimal digits, not through `f64`); anything else that is not plainly a
/// wrong literal is kept as a const expression.
fn seconds(meta: &ParseNestedMeta<'_>, name: &str, zero: Zero) -> syn::Result<Seconds> {
    let expr: Expr = meta.value()?.parse()?;
    let negative = |expr: &Expr| {
        let fix = match zero {
            Zero::Allowed => format!("; `{name} = 0` answers at once"),
            Zero::Refused => String::new(),
        };
        syn::Error::new_spanned(expr, format!("`{name}` cannot be negative{fix}"))
    };
    let (digits, span) = match peel(&expr) {
        Expr::Lit(ExprLit { lit: Lit::Int(int), .. }) => {
            no_suffix(name, int.base10_digits(), int.suffix(), int.span())?;
            (int.base10_digits(), int.span())
        }
        Expr::Lit(ExprLit { lit: Lit::Float(float), .. }) => {
            no_suffix(name, float.base10_digits(), float.suffix(), float.span())?;
            (float.base10_digits(), float.span())
        }
        Expr::Lit(_) => {
            return Err(syn::Error::new_spanned(
                &expr,
                format!("`{name}` expects a number of seconds, like `{name} = 60` or `{name} = 2.5`"),
            ));
        }
        // `-0` and `-0.0` too: a sign written on a literal is a mistake whatever follows it.
        Expr::Unary(ExprUnary { op: UnOp::Neg(_), expr: operand, .. }) if matches!(peel(operand), Expr::Lit(_)) => {
            return Err(negative(&expr));
        }
        _ => return Ok(Seconds::Const(Box::new(expr))),
    };
    // A literal made negative by a macro that forwarded it (`-1` as one token).
    if digits.starts_with('-') {
        return Err(negative(&expr));
    }
    let nanos = match decimal_nanos(digits, Unit::SECOND) {
        Ok(nanos) => nanos,
        Err(Range::TooLarge) => {
            return Err(syn::Error::new(span, format!("`{name}` is too large: at most {MAX_SECONDS} seconds")));
        }
        Err(Range::FinerThanNanosecond) => {
            return Err(syn::Error::new(
                span,
                format!("`{name}` is finer than a nanosecond: durations are whole nanoseconds, at most 9 decimals"),
            ));
        }
    };
    if nanos == 0 && zero == Zero::Refused {
        return Err(syn::Error::new(span, format!("`{name}` must be greater than zero")));
    }
    Ok(Seconds::Literal { nanos, span })
}

/// The expression inside parentheses and the invisible group a `macro_rules!` fragment arrives in, so `ttl = $ttl`
/// with `$ttl:literal` is still a literal.
fn peel(expr: &Expr) -> &Expr {
    match expr {
        Expr::Paren(paren) => peel(&paren.expr),
        Expr::Group(group) => peel(&group.expr),
        expr => expr,
    }
}

/// Refuses `500ms`, `5h`, `3s`, `60u64`, `1.0f64`: the suffix would otherwise be dropped and the number read as
/// seconds. A unit suffix gets the value converted to seconds in the message.
fn no_suffix(name: &str, digits: &str, suffix: &str, span: Span) -> syn::Result<()> {
    if suffix.is_empty() {
        return Ok(());
    }
    let lead = format!("`{name}` is a number of seconds without a suffix");
    let message = match Unit::from_suffix(suffix).map(|unit| decimal_nanos(digits, unit)) {
        Some(Ok(nanos)) => {
            format!("{lead}: write `{name} = {}` for {digits} {suffix}", display_seconds(nanos))
        }
        // `u64`, `f64`, `x`, or a unit whose value is out of range: the number without its suffix.
        _ if !digits.starts_with('-') => format!("{lead}: write `{name} = {digits}`"),
        _ => lead,
    };
    Err(syn::Error::new(span, message))
}

/// A unit suffix someone may write on a duration, as `nanos = number × 10^exponent × factor`.
#[derive(Clone, Copy)]
struct Unit {
    exponent: i64,
    factor: u128,
}

impl Unit {
    const SECOND: Unit = Unit { exponent: 9, factor: 1 };

    fn from_suffix(suffix: &str) -> Option<Unit> {
        let (exponent, factor) = match suffix {
            "ns" => (0, 1),
            "us" => (3, 1),
            "ms" => (6, 1),
            "s" | "sec" | "secs" => (9, 1),
            "m" | "min" | "mins" => (9, 60),
            "h" | "hr" | "hrs" => (9, 3_600),
            "d" | "day" | "days" => (9, 86_400),
            _ => return None,
        };
        Some(Unit { exponent, factor })
    }
}

/// Why a literal has no exact nanosecond value in range.
enum Range {
    TooLarge,
    FinerThanNanosecond,
}

/// The exact value in nanoseconds of the decimal `digits` (`base10_digits` of an int or float literal: `60`,
/// `2.5`, `1e-3`, `1.5e3`; no sign, no underscores) in `unit`, at most [`MAX_SECONDS`].
fn decimal_nanos(digits: &str, unit: Unit) -> Result<u64, Range> {
    let (mantissa, exponent) = digits.split_once(['e', 'E']).unwrap_or((digits, "0"));
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let significant = format!("{whole}{fraction}");
    let significant = significant.trim_start_matches('0');
    let trimmed = significant.trim_end_matches('0');
    if trimmed.is_empty() {
        return Ok(0);
    }
    // An exponent too long for an `i64` is far out of range either way.
    let Ok(exponent) = exponent.parse::<i64>() else {
        return Err(if exponent.starts_with('-') { Range::FinerThanNanosecond } else { Range::TooLarge });
    };
    // value in nanos = trimmed × 10^power × factor
    let power = exponent
        .saturating_sub(fraction.len() as i64)
        .saturating_add((significant.len() - trimmed.len()) as i64)
        .saturating_add(unit.exponent);
    let magnitude = power.saturating_add(trimmed.len() as i64);
    // The largest value, 10^18 ns, has 19 digits; the factor adds at most 5 more.
    if magnitude > 19 {
        return Err(Range::TooLarge);
    }
    if trimmed.len() > 30 || power < -38 {
        return Err(Range::FinerThanNanosecond);
    }
    let number: u128 = trimmed.parse().map_err(|_| Range::TooLarge)?;
    let number = number * unit.factor;
    let scale = 10u128.pow(power.unsigned_abs() as u32);
    let nanos = if power >= 0 {
        number * scale
    } else if number.is_multiple_of(scale) {
        number / scale
    } else {
        return Err(Range::FinerThanNanosecond);
    };
    if nanos > u128::from(MAX_SECONDS * NANOS_PER_SECOND) {
        return Err(Range::TooLarge);
    }
    Ok(nanos as u64)
}

/// `name` alone means true; `name = true` / `name = false` as written.
fn flag(meta: &ParseNestedMeta<'_>, name: &str) -> syn::Result<bool> {
    if meta.input.is_empty() || meta.input.peek(syn::Token![,]) {
        return Ok(true);
    }
    let expr: Expr = meta.value()?.parse()?;
    match peel(&expr) {
        Expr::Lit(ExprLit { lit: Lit::Bool(LitBool { value, .. }), .. }) => Ok(*value),
        _ => Err(syn::Error::new_spanned(
            expr,
            format!("`{name}` expects `true` or `false` (or nothing: `{name}` alone means `true`)"),
        )),
    }
}

/// `state = AppState`: any type.
fn named_policy(meta: &ParseNestedMeta<'_>) -> syn::Result<LitStr> {
    let name: LitStr = meta.value()?.parse()?;
    if name.value().is_empty() {
        return Err(syn::Error::new(name.span(), "`policy` names a policy registered with `route_policy`: not empty"));
    }
    Ok(name)
}

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
    match peel(&expr) {
        // A suffix (`"::idem"x`) is refused rather than dropped.
        Expr::Lit(ExprLit { lit: Lit::Str(path), .. }) if path.suffix().is_empty() => {
            parse_path(path).map_err(|_| syn::Error::new_spanned(path, expected))
        }
        _ => Err(syn::Error::new_spanned(expr, expected)),
    }
}

fn parse_path(path: &LitStr) -> syn::Result<Path> {
    path.parse_with(Path::parse_mod_style)
}

/// `30`, `2.5`, `0.001`: seconds as the user would write them.
pub fn display_seconds(nanos: u64) -> String {
    let secs = nanos / NANOS_PER_SECOND;
    let fraction = nanos % NANOS_PER_SECOND;
    if fraction == 0 {
        return secs.to_string();
    }
    let fraction = format!("{fraction:09}");
    format!("{secs}.{}", fraction.trim_end_matches('0'))
}

/// An expression as the user wrote it, near enough for a message: `ORDER_TTL`, `config::TTL`,
/// `Duration::from_millis(500)`.
pub fn expression_text(expr: &Expr) -> String {
    let mut text = quote::quote!(#expr).to_string();
    for (spaced, tight) in
        [(" :: ", "::"), (":: ", "::"), (" (", "("), ("( ", "("), (" )", ")"), (" .", "."), (". ", ".")]
    {
        text = text.replace(spaced, tight);
    }
    text.replace(" ,", ",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seconds(digits: &str) -> Result<u64, &'static str> {
        in_unit(digits, "s")
    }

    fn in_unit(digits: &str, suffix: &str) -> Result<u64, &'static str> {
        let unit = Unit::from_suffix(suffix).expect("a unit");
        decimal_nanos(digits, unit).map_err(|range| match range {
            Range::TooLarge => "too large",
            Range::FinerThanNanosecond => "finer than a nanosecond",
        })
    }

    #[test]
    fn literals_convert_exactly() {
        assert_eq!(seconds("60"), Ok(60_000_000_000));
        assert_eq!(seconds("2.5"), Ok(2_500_000_000));
        // Through `f64`, 0.1 × 10⁹ is 100000000.00000001; read as decimal it is exact.
        assert_eq!(seconds("0.1"), Ok(100_000_000));
        assert_eq!(seconds("0.000000001"), Ok(1));
        assert_eq!(seconds("1e-3"), Ok(1_000_000));
        assert_eq!(seconds("1.5e3"), Ok(1_500_000_000_000));
        assert_eq!(seconds("2."), Ok(2_000_000_000));
        assert_eq!(seconds("1000000000"), Ok(1_000_000_000_000_000_000));
        assert_eq!(seconds("1000000000.000000000"), Ok(1_000_000_000_000_000_000));
    }

    #[test]
    fn zero_in_any_form_is_zero() {
        for zero in ["0", "0.0", "000.000", "0e400", "0e-400", "0.0e99999999999999999999"] {
            assert_eq!(seconds(zero), Ok(0), "{zero}");
        }
    }

    #[test]
    fn out_of_range_literals() {
        for large in ["1000000000.000000001", "1e10", "1e400", "1e99999999999999999999", "99999999999999999999999"] {
            assert_eq!(seconds(large), Err("too large"), "{large}");
        }
        for fine in ["0.0000000001", "1.0000000005", "1e-10", "1e-400", "1e-99999999999999999999"] {
            assert_eq!(seconds(fine), Err("finer than a nanosecond"), "{fine}");
        }
        // 31 significant digits: too precise for a nanosecond, however it is scaled.
        assert_eq!(seconds("0.1234567890123456789012345678901"), Err("finer than a nanosecond"));
    }

    #[test]
    fn unit_suffixes_convert_for_the_message() {
        assert_eq!(in_unit("500", "ms"), Ok(500_000_000));
        assert_eq!(in_unit("5", "h"), Ok(18_000_000_000_000));
        assert_eq!(in_unit("0.5", "min"), Ok(30_000_000_000));
        assert_eq!(in_unit("1", "d"), Ok(DEFAULT_TTL_NANOS));
        assert_eq!(in_unit("0.5", "ns"), Err("finer than a nanosecond"));
        assert_eq!(display_seconds(in_unit("500", "ms").unwrap()), "0.5");
    }

    #[test]
    fn expressions_read_as_written() {
        let text = |source: &str| expression_text(&syn::parse_str(source).unwrap());
        assert_eq!(text("config::ORDER_TTL"), "config::ORDER_TTL");
        assert_eq!(text("Duration::from_millis(500)"), "Duration::from_millis(500)");
        assert_eq!(text("LEASE.as_secs_f64() * 2.0"), "LEASE.as_secs_f64() * 2.0");
        assert_eq!(text("max(A, B)"), "max(A, B)");
    }
}
