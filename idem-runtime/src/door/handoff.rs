//! What the layer and an annotated handler under it pass each other: the layer's claim, offered to the handler, and
//! the handler's report that its route is annotated.

use crate::protocol::claim::Claim;
use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderName, HeaderValue, Method};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

/// The routes whose handlers are annotated, as `#[idempotent]` handlers report them on first contact.
#[derive(Debug, Default)]
pub(crate) struct AnnotatedRoutes(RwLock<HashMap<Box<str>, Vec<Method>>>);

/// The registries of every layer a request passed, for an annotated handler to report its route to.
#[derive(Clone)]
pub(crate) struct LayerRoutes(pub(crate) Vec<Arc<AnnotatedRoutes>>);

impl AnnotatedRoutes {
    pub(crate) fn contains(&self, method: &Method, path: &str) -> bool {
        let routes = self.0.read().unwrap_or_else(PoisonError::into_inner);
        routes.get(path).is_some_and(|methods| methods.contains(method))
    }

    /// Records the route; `true` when it was not known yet.
    pub(crate) fn insert(&self, method: &Method, path: &str) -> bool {
        if self.contains(method, path) {
            return false;
        }
        let mut routes = self.0.write().unwrap_or_else(PoisonError::into_inner);
        let methods = routes.entry(path.into()).or_default();
        if methods.contains(method) {
            return false;
        }
        methods.push(method.clone());
        true
    }
}

/// A claim the layer made, offered to an annotated handler further in: taken at most once.
#[derive(Clone)]
pub(crate) struct Handoff(Arc<Mutex<Option<Adoptable>>>);

/// What an adopting handler needs: the claim (its key and fingerprint) and the key header to echo.
pub(crate) struct Adoptable {
    pub(crate) claim: Claim,
    pub(crate) echo: Option<(HeaderName, HeaderValue)>,
}

impl Handoff {
    pub(crate) fn offer(adoptable: Adoptable) -> Self {
        Self(Arc::new(Mutex::new(Some(adoptable))))
    }

    pub(crate) fn take(&self) -> Option<Adoptable> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

/// Tells the layers in front (if any) that this route is annotated, so they leave the route to its annotation from
/// now on. The first time a layer learns it, a warning says so where it bites: until then that layer claimed this
/// route's requests with its own settings (body limit, `wait_timeout`, signature check).
pub(crate) fn register_annotated_route(request: &Request) {
    let extensions = request.extensions();
    if let (Some(layers), Some(path)) = (extensions.get::<LayerRoutes>(), extensions.get::<MatchedPath>()) {
        let mut learned = false;
        for routes in &layers.0 {
            learned |= routes.insert(request.method(), path.as_str());
        }
        if learned {
            tracing::warn!(
                method = %request.method(),
                route = path.as_str(),
                "idempotency: this route is annotated with #[idempotent] and also under an IdempotencyLayer. From \
                 now on, in this process, the annotation's settings apply to it; until now, this request included, \
                 the layer claimed its requests with the layer's body limit, wait_timeout and signature check (each \
                 still ran once and was stored with the annotation's ttl). To have the annotation apply from the \
                 first request, keep the layer off annotated routes (layer routers of plain handlers only); see \
                 docs/layer.md. Reported once per route and layer"
            );
        }
    }
}
