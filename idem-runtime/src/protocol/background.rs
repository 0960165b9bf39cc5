//! What the protocol runs beside the requests of one engine.

use crate::drain::Running;
use crate::protocol::keeper::Renewals;
use crate::protocol::write::Writes;
use crate::store::contract::Store;
use std::sync::Arc;

/// writes it finishes in the background. One per [`Idempotency`](crate::Idempotency), shared by its doors.
pub(crate) struct Background {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) renewals: Arc<Renewals>,
    pub(crate) writes: Arc<Writes>,
}

impl Background {
    /// The background of an engine over `store`, whose background writes are counted in `running`.
    pub(crate) fn new(store: Arc<dyn Store>, running: Arc<Running>) -> Arc<Self> {
        Arc::new(Self { store, renewals: Arc::default(), writes: Arc::new(Writes::new(running)) })
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.renewals.wake();
    }
}
