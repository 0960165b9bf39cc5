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

    pub(crate) fn insert(&self, method: &Method, path: &str) {
        if self.contains(method, path) {
            return;
        }
        let mut routes = self.0.write().unwrap_or_else(PoisonError::into_inner);
        let methods = routes.entry(path.into()).or_default();
        if !methods.contains(method) {
            methods.push(method.clone());
        }
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
/// now on.
pub(crate) fn register_annotated_route(request: &Request) {
    let extensions = request.extensions();
    if let (Some(layers), Some(path)) = (extensions.get::<LayerRoutes>(), extensions.get::<MatchedPath>()) {
        for routes in &layers.0 {
            routes.insert(request.method(), path.as_str());
        }
    }
}
