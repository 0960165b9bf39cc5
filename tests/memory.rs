//! The behaviour table (DESIGN.md §3) on [`idem::MemoryStore`], plus the rows only paused time can show quickly:
//! lease renewal and record expiry.

use idem::test_kit::app::TestApp;
use idem::test_kit::client::{RequestExt, fresh_key, post};
use serde_json::json;
use std::time::Duration;

idem::test_kit::conformance_tests!(memory, || async { idem::MemoryStore::new() });

#[tokio::test(start_paused = true)]
async fn handler_outliving_its_lease_is_renewed_and_never_runs_twice() {
    let app = TestApp::new(idem::MemoryStore::new());
    let key = fresh_key("lease");
    // `/slow` has a one-second lease; the handler runs three times as long.
    let request = || post("/slow").key(&key).json(&json!({ "sleep_ms": 3_000 }));
    let original = app.spawn(request());
    app.probe.started().await;
    for (retry, after) in [1_100, 1_100, 700].into_iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(after)).await;
        let duplicate = app.send(request()).await;
        duplicate.assert_problem(409, "in-progress");
        assert_eq!(app.runs(), 1, "duplicate {retry} ran the handler a second time: the lease was not renewed");
    }
    let original = original.await.unwrap();
    original.assert_new(&key);
    app.send(request()).await.assert_replays(&original, &key);
    assert_eq!(app.runs(), 1);
}

#[tokio::test(start_paused = true)]
async fn records_expire_after_their_ttl() {
    let app = TestApp::new(idem::MemoryStore::new());
    let key = fresh_key("ttl");
    // `/short-ttl` keeps its records for ten seconds.
    let first = app.send(post("/short-ttl").key(&key).empty()).await;
    first.assert_new(&key);
    tokio::time::advance(Duration::from_secs(9)).await;
    app.send(post("/short-ttl").key(&key).empty()).await.assert_replays(&first, &key);
    tokio::time::advance(Duration::from_secs(2)).await;
    let after = app.send(post("/short-ttl").key(&key).empty()).await;
    after.assert_new(&key);
    assert_eq!(after.json()["run"], 2, "the record expired: the key runs again");
    assert_eq!(app.runs(), 2);
}
