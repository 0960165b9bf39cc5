//! The bound on handlers running at once. The HTTP doors run handlers on tasks of their own, so a client that
//! disconnects does not cancel its handler: without a bound, a flood of requests whose clients leave at once would
//! leave behind as many running handlers as it sent requests.

use crate::http::execution::Execution;
use axum::extract::Request;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

/// The default of [`IdempotencyBuilder::max_running_handlers`](crate::IdempotencyBuilder::max_running_handlers).
pub(crate) const DEFAULT_MAX_RUNNING_HANDLERS: usize = 10_000;

/// How many handlers an engine runs, against how many it may.
#[derive(Debug)]
pub(crate) struct HandlerSlots {
    taken: AtomicUsize,
    limit: usize,
}

/// One handler's place under the bound, given back when dropped (the handler ended, however it ended).
#[derive(Debug)]
pub(crate) struct HandlerSlot(Arc<HandlerSlots>);

impl HandlerSlots {
    /// At most `limit` at once (at least one: a bound of zero would refuse every request).
    pub(crate) fn new(limit: usize) -> Self {
        Self { taken: AtomicUsize::new(0), limit: limit.max(1) }
    }

    /// A slot, unless `limit` are taken.
    pub(crate) fn take(self: &Arc<Self>) -> Option<HandlerSlot> {
        // A compare-and-swap rather than an add undone on failure: an add would count refused requests for a
        // moment, and could refuse a request that fits.
        self.taken
            .fetch_update(Ordering::Acquire, Ordering::Relaxed, |taken| (taken < self.limit).then_some(taken + 1))
            .ok()
            .map(|_| HandlerSlot(self.clone()))
    }
}

impl Drop for HandlerSlot {
    fn drop(&mut self) {
        self.0.taken.fetch_sub(1, Ordering::Release);
    }
}

/// `run`, holding `slot` until the handler's future ends or is dropped: not while its answer is recorded, which
/// is store work bounded by the store's own timeouts, not handler work.
pub(crate) fn holding<F, Fut>(slot: HandlerSlot, run: F) -> impl FnOnce(Request) -> Holding<Fut> + Send + 'static
where
    F: FnOnce(Request) -> Fut + Send + 'static,
    Fut: Future<Output = Execution> + Send + 'static,
{
    move |request| Holding { handler: run(request), _slot: slot }
}

pin_project_lite::pin_project! {
    /// A handler's future and the slot it holds.
    pub(crate) struct Holding<Fut> {
        #[pin]
        handler: Fut,
        _slot: HandlerSlot,
    }
}

impl<Fut: Future> Future for Holding<Fut> {
    type Output = Fut::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().handler.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_refused_at_the_limit_and_given_back_when_dropped() {
        let slots = Arc::new(HandlerSlots::new(2));
        let first = slots.take().expect("one of two");
        let second = slots.take().expect("two of two");
        assert!(slots.take().is_none(), "a third is over the limit");
        drop(first);
        let third = slots.take().expect("a slot given back is taken again");
        assert!(slots.take().is_none());
        drop((second, third));
        assert_eq!(slots.taken.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_limit_of_zero_is_one() {
        let slots = Arc::new(HandlerSlots::new(0));
        let only = slots.take().expect("one slot");
        assert!(slots.take().is_none());
        drop(only);
    }

    #[test]
    fn threads_racing_for_slots_never_hold_more_than_the_limit() {
        let slots = Arc::new(HandlerSlots::new(3));
        let most = Arc::new(AtomicUsize::new(0));
        let holding = Arc::new(AtomicUsize::new(0));
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| {
                    for _ in 0..20_000 {
                        if let Some(slot) = slots.take() {
                            let now = holding.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(now, Ordering::SeqCst);
                            holding.fetch_sub(1, Ordering::SeqCst);
                            drop(slot);
                        }
                    }
                });
            }
        });
        assert!(most.load(Ordering::SeqCst) <= 3, "{} slots held at once", most.load(Ordering::SeqCst));
        assert_eq!(slots.taken.load(Ordering::SeqCst), 0);
    }
}
