use super::*;

#[test]
fn events_count_into_their_own_counter() {
    let counters = Counters::new();
    for event in [Event::New, Event::New, Event::Hit, Event::Conflict, Event::Mismatch, Event::StoreError] {
        counters.record(event);
    }
    counters.record(Event::Fenced);
    counters.record(Event::AtCapacity);
    counters.record(Event::AtCapacity);
    let snapshot = counters.snapshot();
    assert_eq!(
        (snapshot.new, snapshot.hit, snapshot.conflict, snapshot.mismatch, snapshot.store_errors, snapshot.fenced),
        (2, 1, 1, 1, 1, 1)
    );
    assert_eq!(snapshot.at_capacity, 2);
}

#[test]
fn waits_fall_in_the_first_bucket_that_holds_them() {
    let counters = Counters::new();
    counters.observe_wait(Duration::ZERO);
    counters.observe_wait(Duration::from_millis(5));
    counters.observe_wait(Duration::from_millis(6));
    counters.observe_wait(Duration::from_secs(60));
    let wait = counters.snapshot().wait;
    assert_eq!(wait.count, 4);
    assert_eq!(wait.sum, Duration::from_millis(60_011));
    assert_eq!(wait.buckets[0], 1);
    assert_eq!(wait.buckets[1], 1);
    assert_eq!(wait.buckets[2], 1);
    assert_eq!(wait.buckets[WAIT_BUCKETS.len()], 1);
    assert_eq!(wait.buckets.iter().sum::<u64>(), 4);
}

#[cfg(all(test, feature = "metrics"))]
mod facade_tests {
    use super::*;
    use ::metrics::{Counter, CounterFn, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, SharedString, Unit};
    use std::sync::{Arc, Mutex};

    /// Every value recorded, as `name{label=value}` and the value.
    #[derive(Default)]
    struct Capture(Arc<Mutex<Vec<(String, f64)>>>);

    struct Handle {
        name: String,
        log: Arc<Mutex<Vec<(String, f64)>>>,
    }

    impl CounterFn for Handle {
        fn increment(&self, value: u64) {
            self.log.lock().unwrap().push((self.name.clone(), value as f64));
        }
        fn absolute(&self, _: u64) {}
    }

    impl HistogramFn for Handle {
        fn record(&self, value: f64) {
            self.log.lock().unwrap().push((self.name.clone(), value));
        }
    }

    impl Capture {
        fn handle(&self, key: &Key) -> Arc<Handle> {
            let labels: Vec<_> = key.labels().map(|label| format!("{}={}", label.key(), label.value())).collect();
            let name = if labels.is_empty() {
                key.name().to_owned()
            } else {
                format!("{}{{{}}}", key.name(), labels.join(","))
            };
            Arc::new(Handle { name, log: self.0.clone() })
        }
    }

    impl ::metrics::Recorder for Capture {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
            Counter::from_arc(self.handle(key))
        }
        fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::noop()
        }
        fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::from_arc(self.handle(key))
        }
    }

    #[test]
    fn the_facade_reports_events_and_waits_to_the_metrics_recorder() {
        let capture = Capture::default();
        let log = capture.0.clone();
        ::metrics::with_local_recorder(&capture, || {
            let site = Site { door: "handler", route: "/orders" };
            let events = [
                Event::New,
                Event::Hit,
                Event::Conflict,
                Event::Mismatch,
                Event::StoreError,
                Event::Fenced,
                Event::AtCapacity,
            ];
            for event in events {
                MetricsFacade.record_at(event, &site);
            }
            MetricsFacade.observe_wait(Duration::from_millis(250));
            MetricsFacade.observe_store(StoreOperation::Claim, Duration::from_millis(2), true);
        });
        let log = log.lock().unwrap().clone();
        assert_eq!(
            log,
            [
                ("idem_requests_total{outcome=new,door=handler,route=/orders}".to_owned(), 1.0),
                ("idem_requests_total{outcome=hit,door=handler,route=/orders}".to_owned(), 1.0),
                ("idem_requests_total{outcome=conflict,door=handler,route=/orders}".to_owned(), 1.0),
                ("idem_requests_total{outcome=mismatch,door=handler,route=/orders}".to_owned(), 1.0),
                ("idem_store_errors_total{door=handler,route=/orders}".to_owned(), 1.0),
                ("idem_fenced_writes_total{door=handler,route=/orders}".to_owned(), 1.0),
                ("idem_requests_total{outcome=at_capacity,door=handler,route=/orders}".to_owned(), 1.0),
                ("idem_wait_seconds".to_owned(), 0.25),
                ("idem_store_seconds{operation=claim,outcome=answered}".to_owned(), 0.002),
            ]
        );
    }
}
