//! The pub/sub link's bookkeeping: one (un)subscription per channel, and waiters that neither miss a wake-up nor
//! wait past their deadline.

use crate::store::redis::notify::{Plan, Waiters};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::{Instant, sleep};

fn plan(waiters: &Waiters) -> (Vec<String>, Vec<String>) {
    let Plan { mut subscribe, mut unsubscribe } = waiters.plan();
    subscribe.sort();
    unsubscribe.sort();
    (subscribe, unsubscribe)
}

fn names(names: &[&str]) -> Vec<String> {
    names.iter().map(|name| (*name).to_owned()).collect()
}

#[test]
fn one_subscribe_for_many_channels_and_one_unsubscribe_when_their_waiters_leave() {
    let waiters = Arc::new(Waiters::default());
    let a1 = Waiters::register(&waiters, "a");
    let a2 = Waiters::register(&waiters, "a");
    let b = Waiters::register(&waiters, "b");
    assert_eq!(plan(&waiters), (names(&["a", "b"]), vec![]));
    waiters.subscribed(&names(&["a", "b"]));
    assert!(waiters.is_subscribed("a") && waiters.is_subscribed("b"));
    assert_eq!(plan(&waiters), (vec![], vec![]));
    drop((a1, b));
    // "a" still has a waiter.
    assert_eq!(plan(&waiters), (vec![], names(&["b"])));
    waiters.unsubscribed(&names(&["b"]));
    drop(a2);
    assert_eq!(plan(&waiters), (vec![], names(&["a"])));
    waiters.unsubscribed(&names(&["a"]));
    assert!(waiters.lock().is_empty(), "nothing left behind");
}

/// The race the old process-wide lock prevented: a last waiter leaves (an UNSUBSCRIBE goes out) while a new one
/// arrives. The new one must not count on the old subscription, and gets a new SUBSCRIBE after the UNSUBSCRIBE.
#[test]
fn a_waiter_arriving_while_its_channel_is_unsubscribed_waits_for_a_new_subscribe() {
    let waiters = Arc::new(Waiters::default());
    let first = Waiters::register(&waiters, "a");
    waiters.subscribed(&names(&["a"]));
    drop(first);
    assert_eq!(plan(&waiters), (vec![], names(&["a"])));
    let second = Waiters::register(&waiters, "a");
    assert!(!waiters.is_subscribed("a"), "the UNSUBSCRIBE on its way would leave it unannounced");
    waiters.unsubscribed(&names(&["a"]));
    assert_eq!(plan(&waiters), (names(&["a"]), vec![]));
    waiters.subscribed(&names(&["a"]));
    assert!(waiters.is_subscribed("a"));
    drop(second);
}

#[test]
fn a_subscription_confirmed_after_its_waiters_left_is_unsubscribed_next() {
    let waiters = Arc::new(Waiters::default());
    drop(Waiters::register(&waiters, "a"));
    assert!(waiters.lock().is_empty(), "never subscribed: forgotten at once");
    let waiter = Waiters::register(&waiters, "a");
    assert_eq!(plan(&waiters), (names(&["a"]), vec![]));
    drop(waiter);
    waiters.subscribed(&names(&["a"]));
    assert_eq!(plan(&waiters), (vec![], names(&["a"])));
}

#[tokio::test(start_paused = true)]
async fn a_waiter_gives_up_on_an_unconfirmed_channel_at_its_deadline() {
    let waiters = Arc::new(Waiters::default());
    let mut registration = Waiters::register(&waiters, "a");
    let started = Instant::now();
    assert!(!registration.ready(started + Duration::from_secs(3)).await);
    assert_eq!(started.elapsed(), Duration::from_secs(3));
}

#[tokio::test(start_paused = true)]
async fn a_confirmed_waiter_is_woken_by_a_message_and_by_a_lost_link() {
    for wake in [|waiters: &Waiters| waiters.wake(b"a"), |waiters: &Waiters| waiters.link_lost()] {
        let waiters = Arc::new(Waiters::default());
        let mut registration = Waiters::register(&waiters, "a");
        let confirm = tokio::spawn({
            let waiters = waiters.clone();
            async move {
                sleep(Duration::from_secs(1)).await;
                waiters.subscribed(&names(&["a"]));
            }
        });
        let started = Instant::now();
        assert!(registration.ready(started + Duration::from_secs(60)).await);
        assert_eq!(started.elapsed(), Duration::from_secs(1));
        confirm.await.unwrap();
        // Announced before the waiter even starts waiting: still not missed.
        wake(&waiters);
        registration.notified(started + Duration::from_secs(60)).await;
        assert_eq!(started.elapsed(), Duration::from_secs(1));
    }
}
