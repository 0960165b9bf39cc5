//! Code generation: keep the user's function as written under `<name>_unprotected` (callable in unit tests) and emit
//! an axum handler of the original name that hands the request to the runtime, then runs the user's own extractors
//! one by one.

use crate::args::Args;
use crate::policy;
use crate::spans::{respan, span_range};
use proc_macro2::TokenStream;
use quote::{format_ident, quote, quote_spanned};
use syn::parse::Parser;
use syn::{FnArg, GenericArgument, ItemFn, PathArguments, ReturnType, Type};

pub fn idempotent(attr: TokenStream, item: TokenStream) -> TokenStream {
    let function: ItemFn = match syn::parse2(item.clone()) {
        Ok(function) => function,
        // Not a function: let rustc report the item as written, next to our error.
        Err(error) => {
            let error = syn::Error::new(error.span(), "`#[idempotent]` goes on an `async fn` axum handler");
            return with_error(item, error);
        }
    };
    let mut args = Args::default();
    let parsed = syn::meta::parser(|meta| args.parse_meta(meta)).parse2(attr).and_then(|()| args.validate());
    match parsed.and_then(|()| expand(&args, &function)) {
        Ok(tokens) => tokens,
        // Keep the function itself so the IDE still sees it while the error shows.
        Err(error) => with_error(quote!(#function), error),
    }
}

fn with_error(item: TokenStream, error: syn::Error) -> TokenStream {
    let error = error.into_compile_error();
    quote!(#item #error)
}

fn expand(args: &Args, function: &ItemFn) -> syn::Result<TokenStream> {
    let signature = &function.sig;
    if signature.asyncness.is_none() {
        return Err(syn::Error::new(
            signature.fn_token.span,
            "`#[idempotent]` handlers must be `async fn`: write `async fn` here",
        ));
    }
    let generic = "`#[idempotent]` handlers cannot be generic: axum needs one concrete handler per route";
    if !signature.generics.params.is_empty() {
        return Err(syn::Error::new_spanned(&signature.generics, generic));
    }
    if let Some(where_clause) = &signature.generics.where_clause {
        return Err(syn::Error::new_spanned(where_clause, generic));
    }
    let mut arg_types = Vec::new();
    for input in &signature.inputs {
        match input {
            FnArg::Receiver(receiver) => {
                return Err(syn::Error::new_spanned(
                    receiver,
                    "`#[idempotent]` handlers cannot take `self`: make it a free `async fn` and reach shared data \
                     through `State<T>`",
                ));
            }
            FnArg::Typed(typed) => arg_types.push(&*typed.ty),
        }
    }
    if let Some((ty, name)) = arg_types.split_last().and_then(|(_, parts)| parts.iter().find_map(body_extractor)) {
        return Err(syn::Error::new_spanned(
            ty,
            format!("`{name}` consumes the request body, so it must be the handler's last argument"),
        ));
    }
    let krate = match &args.krate {
        Some(path) => quote!(#path),
        None => quote!(::idem),
    };
    let private = quote!(#krate::__private);
    let state = state_type(args, &arg_types)?;

    let name = &signature.ident;
    let vis = &function.vis;
    // The function as written, kept callable (for unit tests) under a name of its own, beside the handler.
    let inner = format_ident!("{}_unprotected", name);
    let cfg_attrs: Vec<_> = function.attrs.iter().filter(|attr| attr.path().is_ident("cfg")).collect();
    let (outer_attrs, inner_attrs): (Vec<_>, Vec<_>) =
        function.attrs.iter().partition(|attr| attr.path().is_ident("doc") || attr.path().is_ident("cfg"));
    let mut inner_sig = signature.clone();
    inner_sig.ident = inner.clone();
    let block = &function.block;
    // At most crate-visible: it is for the crate's own unit tests, and a `pub` copy of a signature that names
    // crate-private types (a `State<AppState>`) would trip `private_interfaces` in the user's crate.
    let inner_vis = match vis {
        syn::Visibility::Public(_) => quote!(pub(crate)),
        other => quote!(#other),
    };
    let inner_doc = format!(
        " `{name}` as written, without idempotency: what `#[idempotent]` runs once per key. Call it in unit tests \
         of the handler's own logic; requests go to `{name}`."
    );

    let policy = match &args.policy {
        Some(named) => quote! {
            let ::core::option::Option::Some(__idem_policy) = __idem_engine.route_policy(#named) else {
                return #private::policy_not_registered(#named);
            };
        },
        None => {
            let policy = policy::policy(args, &private);
            quote! {
                static __IDEM_POLICY: #private::Policy = #policy;
                let __idem_policy = __IDEM_POLICY;
            }
        }
    };
    let (state_param, state_value, state_ty, probe) = match &state {
        Some(ty) => (
            quote!(#private::State(__idem_state): #private::State<#ty>,),
            quote!(__idem_state),
            quote!(#ty),
            quote!({
                #[allow(unused_imports)]
                use #private::{NoState as _, ViaState as _};
                (&#private::StateProbe(&__idem_state)).idempotency()
            }),
        ),
        None => (quote!(), quote!(()), quote!(()), quote!(::core::option::Option::None)),
    };

    let arg_names: Vec<_> = (0..arg_types.len()).map(|i| format_ident!("__idem_arg{}", i)).collect();
    let extractions = arg_types.iter().zip(&arg_names).enumerate().map(|(index, (ty, name))| {
        let rejected = quote!(return #private::Execution::Rejected(#private::IntoResponse::into_response(rejection)));
        // The call is spanned from the first to the last token of the argument's type, so an argument that is not
        // an extractor is reported once, on the whole type in the user's signature.
        let (first, last) = span_range(ty);
        let (trait_path, call) = if index + 1 < arg_types.len() {
            (
                quote!(FromRequestParts<#state_ty>),
                quote_spanned!(last=> from_request_parts(&mut __idem_parts, &__idem_state)),
            )
        } else {
            (
                quote!(FromRequest<#state_ty, _>),
                quote_spanned!(last=> from_request(
                    #private::Request::from_parts(__idem_parts, __idem_body), &__idem_state,
                )),
            )
        };
        let function = respan(quote!(<#ty as #private::#trait_path>::), first);
        quote_spanned! {last=>
            let #name = match #function #call.await {
                ::core::result::Result::Ok(value) => value,
                ::core::result::Result::Err(rejection) => #rejected,
            };
        }
    });
    // Likewise a return type that is not `IntoResponse` is reported on the user's return type.
    let (first, last) = match &signature.output {
        ReturnType::Default => (signature.ident.span(), signature.ident.span()),
        ReturnType::Type(_, ty) => span_range(ty),
    };
    let into_response = respan(quote!(#private::IntoResponse::), first);
    let inner_call = respan(quote!(#inner), first);
    let respond = quote_spanned! {last=>
        #into_response into_response(#inner_call(#(#arg_names),*).await)
    };

    Ok(quote! {
        #(#cfg_attrs)*
        #[doc = #inner_doc]
        #(#inner_attrs)*
        #inner_vis #inner_sig #block

        #(#outer_attrs)*
        #vis async fn #name(#state_param __idem_request: #private::Request) -> #private::Response {
            let __idem_engine = #private::locate(&__idem_request, #probe);
            let ::core::option::Option::Some(__idem_engine) = __idem_engine else {
                return #private::not_configured(::core::stringify!(#name));
            };
            #policy
            #[allow(unused_variables)]
            let __idem_state = #state_value;
            __idem_engine
                .handle(&__idem_policy, __idem_request, move |__idem_request: #private::Request| async move {
                    #[allow(unused_mut, unused_variables)]
                    let (mut __idem_parts, __idem_body) = __idem_request.into_parts();
                    #(#extractions)*
                    #private::Execution::Ran(#respond)
                })
                .await
        }
    })
}

/// The request-consuming extractors axum itself provides, recognised by name as `#[axum::debug_handler]` does.
const BODY_EXTRACTORS: &[&str] = &["Json", "Form", "RawForm", "Bytes", "String", "Body", "Request", "Multipart"];

/// `Some` when `ty` names one of [`BODY_EXTRACTORS`].
fn body_extractor<'a>(ty: &&'a Type) -> Option<(&'a Type, String)> {
    let Type::Path(path) = ty else { return None };
    let name = path.path.segments.last()?.ident.to_string();
    BODY_EXTRACTORS.contains(&name.as_str()).then_some((*ty, name))
}

/// The state the generated handler extracts: `state = T`, else the `T` of the only `State<T>` argument.
fn state_type(args: &Args, arg_types: &[&Type]) -> syn::Result<Option<Type>> {
    if let Some(state) = &args.state {
        return Ok(Some(state.clone()));
    }
    let mut found: Option<&Type> = None;
    for ty in arg_types {
        let Some(inner) = state_inner(ty) else { continue };
        if let Some(first) = found
            && quote!(#first).to_string() != quote!(#inner).to_string()
        {
            return Err(syn::Error::new_spanned(
                ty,
                "several `State` types: name the router's state with `#[idempotent(state = AppState)]`",
            ));
        }
        found = Some(inner);
    }
    Ok(found.cloned())
}

fn state_inner(ty: &Type) -> Option<&Type> {
    let Type::Path(path) = ty else { return None };
    let segment = path.path.segments.last()?;
    if segment.ident != "State" {
        return None;
    }
    let PathArguments::AngleBracketed(generics) = &segment.arguments else { return None };
    match generics.args.first()? {
        GenericArgument::Type(inner) if generics.args.len() == 1 => Some(inner),
        _ => None,
    }
}
