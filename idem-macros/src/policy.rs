//! The route's `Policy`, as the initializer of a `static`. Literal durations arrive checked and in nanoseconds. A
//! duration given as a const is converted by `macro_support::seconds`, and every check that involves it is an
//! `assert!` the compiler evaluates with the static: a const that does not fit is a compile error, reported on the
//! user's expression like a literal's.

use crate::args::{self, Args, DEFAULT_LEASE_NANOS, DEFAULT_TTL_NANOS, MAX_SECONDS, Seconds, Zero};
use crate::spans::{respan, span_range};
use proc_macro2::{Delimiter, Group, Ident, Span, TokenStream, TokenTree};
use quote::{format_ident, quote};

pub fn policy(args: &Args, private: &TokenStream) -> TokenStream {
    let ttl = local("ttl");
    let lease = local("lease");
    let wait = local("wait_timeout");
    let mut statements = Vec::new();

    let ttl_value = match &args.ttl {
        Some(value) => nanos(value, "ttl", Zero::Refused, private),
        None => quote!(#DEFAULT_TTL_NANOS),
    };
    statements.push(quote!(let #ttl: u64 = #ttl_value;));
    let ttl_is_const = matches!(args.ttl, Some(Seconds::Const(_)));

    // A pair of literals was checked while parsing; a pair with a const is checked here.
    let fits_ttl = |name: &str, local: &Ident, value: &Seconds| {
        if !ttl_is_const && !matches!(value, Seconds::Const(_)) {
            return quote!();
        }
        let message = escape(&args::exceeds_ttl(name, value, args.ttl.as_ref()));
        let assert = call(quote!(::core::assert!), quote!(#local <= #ttl, #message), value);
        quote!(#assert;)
    };

    let mut setters = vec![quote!(.ttl(::core::time::Duration::from_nanos(#ttl)))];
    if let Some(value) = &args.wait_timeout {
        let nanos = nanos(value, "wait_timeout", Zero::Allowed, private);
        let check = fits_ttl("wait_timeout", &wait, value);
        statements.push(quote!(let #wait: u64 = #nanos; #check));
        setters.push(quote!(.wait_timeout(::core::time::Duration::from_nanos(#wait))));
    }
    match &args.lease {
        Some(value) => {
            let nanos = nanos(value, "lease", Zero::Refused, private);
            let check = fits_ttl("lease", &lease, value);
            statements.push(quote!(let #lease: u64 = #nanos; #check));
        }
        // The default lease shrinks to fit a short ttl.
        None => {
            let nanos = match &args.ttl {
                Some(Seconds::Const(_)) => {
                    quote!(if #ttl < #DEFAULT_LEASE_NANOS { #ttl } else { #DEFAULT_LEASE_NANOS })
                }
                Some(Seconds::Literal { nanos, .. }) => {
                    let lease = DEFAULT_LEASE_NANOS.min(*nanos);
                    quote!(#lease)
                }
                None => quote!(#DEFAULT_LEASE_NANOS),
            };
            statements.push(quote!(let #lease: u64 = #nanos;));
        }
    }
    setters.push(quote!(.lease(::core::time::Duration::from_nanos(#lease))));

    for (setter, value) in [
        ("validate_signature", args.validate_signature),
        ("required", args.required),
        ("store_server_errors", args.store_server_errors),
    ] {
        if let Some(value) = value {
            let setter = format_ident!("{}", setter);
            setters.push(quote!(.#setter(#value)));
        }
    }
    quote!({
        #(#statements)*
        #private::Policy::new() #(#setters)*
    })
}

/// A name the user's expressions cannot see or shadow.
fn local(name: &str) -> Ident {
    Ident::new(&format!("__idem_{name}"), Span::mixed_site())
}

/// An expression of type `u64`: the duration in nanoseconds. For a const, the conversion and the checks of the
/// value alone, each failure a compile error naming `name`.
fn nanos(value: &Seconds, name: &str, zero: Zero, private: &TokenStream) -> TokenStream {
    let expr = match value {
        Seconds::Literal { nanos, .. } => return quote!(#nanos),
        Seconds::Const(expr) => expr,
    };
    let described = format!("`{name}` ({})", value.describe());
    let out_of_range = quote!(#private::OutOfRange);
    let fail = |variant: &str, message: String| {
        let variant = format_ident!("{}", variant);
        let panic = call(quote!(::core::panic!), escape(&message), value);
        quote!(::core::result::Result::Err(#out_of_range::#variant) => #panic,)
    };
    let arms = [
        fail("Negative", format!("{described} cannot be negative")),
        fail("TooLarge", format!("{described} is too large: at most {MAX_SECONDS} seconds")),
        fail("BelowNanosecond", format!("{described} is finer than a nanosecond: durations are whole nanoseconds")),
        fail("NotANumber", format!("{described} is not a number")),
    ];
    // The call carries the expression's span, so a value of the wrong type is reported on it.
    let convert = call(quote!(#private::seconds), quote!(#expr), value);
    let converted = local("nanos");
    let nonzero = match zero {
        Zero::Allowed => quote!(),
        Zero::Refused => {
            let message = escape(&format!("{described} must be greater than zero"));
            let assert = call(quote!(::core::assert!), quote!(#converted > 0, #message), value);
            quote!(#assert;)
        }
    };
    quote!({
        let #converted = match #convert.nanos() {
            ::core::result::Result::Ok(nanos) => nanos,
            #(#arms)*
        };
        #nonzero
        #converted
    })
}

/// `path(args)`, spanned over the user's value: the path on its first token, the parentheses on its last, so rustc
/// reports an error inside the call (a failed `assert!` while evaluating the static, a type mismatch) on the whole
/// value the user wrote.
fn call(path: TokenStream, args: TokenStream, value: &Seconds) -> TokenStream {
    let (first, last) = match value {
        Seconds::Literal { span, .. } => (*span, *span),
        Seconds::Const(expr) => span_range(expr),
    };
    let mut group = Group::new(Delimiter::Parenthesis, args);
    group.set_span(last);
    let mut tokens = respan(path, first);
    tokens.extend([TokenTree::Group(group)]);
    tokens
}

/// A panic message as a format string that prints as written.
fn escape(message: &str) -> TokenStream {
    let message = message.replace('{', "{{").replace('}', "}}");
    quote!(#message)
}
