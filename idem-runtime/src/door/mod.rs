//! The front doors, each a caller of the protocol: the HTTP pipeline both HTTP doors share, the `#[idempotent]`
//! handler's entry to it (`Idempotency::handle`), the tower layer, the handoff between the layer and an annotated
//! handler under it, and `once` for work that is not an HTTP request.

pub(crate) mod handoff;
pub(crate) mod layer;
pub(crate) mod once;
pub(crate) mod pipeline;
pub(crate) mod span;
