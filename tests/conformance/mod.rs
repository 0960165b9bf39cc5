//! The behaviour table of DESIGN.md §3 as a conformance suite: written once, run against any [`idem::Store`].
//!
//! A backend gets the whole suite with one file under `tests/`:
//!
//! ```ignore
//! mod conformance;
//! conformance::suite!(memory, || async { idem::MemoryStore::new() });
//! ```
//!
//! which expands to a module `memory` holding one multi-threaded `#[tokio::test]` per case, named after it, each
//! calling `conformance::cases::<case>(store).await` on a store made for it. Cases use real time only (a real
//! store's TTLs cannot be paused) and fresh keys (a persistent store outlives a run).

pub mod app;
pub mod cases;
pub mod client;
pub mod outage;

/// Expands to `mod $backend { ... }` with one test per conformance case, each on a store from `$store`: an
/// expression callable with no arguments returning a future of the store (`|| async { ... }`).
macro_rules! suite {
    ($backend:ident, $store:expr $(,)?) => {
        $crate::conformance::suite!(@cases $backend, $store;
            no_key_with_required_false_passes_the_response_through_untouched,
            no_key_when_required_is_400_missing_key,
            malformed_keys_are_400_invalid_key,
            quoted_and_bare_keys_are_the_same_key,
            first_request_runs_once_and_answers_with_echo_new_and_signature,
            retry_after_completion_replays_the_stored_response,
            replay_keeps_a_json_response_byte_for_byte,
            replay_keeps_a_text_response_byte_for_byte,
            replay_keeps_an_empty_204_response,
            replay_keeps_a_binary_response_byte_for_byte,
            retry_with_a_different_body_is_422_key_reused,
            retry_with_a_different_body_replays_when_signatures_are_not_validated,
            retry_with_a_different_query_is_422_key_reused,
            retry_with_a_different_content_type_is_422_key_reused,
            same_key_on_two_paths_runs_both,
            same_key_for_two_principals_runs_both_and_replays_each_its_own,
            handler_4xx_is_stored_and_replayed,
            handler_5xx_is_not_stored_and_a_retry_runs_again,
            handler_5xx_is_stored_with_store_server_errors,
            handler_panic_is_a_500_problem_and_a_retry_runs_again,
            handler_panic_is_stored_with_store_server_errors,
            extractor_rejection_is_sent_and_releases_the_key,
            body_over_the_limit_is_413_payload_too_large,
            duplicate_in_flight_without_wait_is_409_in_progress,
            duplicate_in_flight_waits_and_gets_the_original_response,
            duplicate_in_flight_whose_wait_times_out_is_409_in_progress,
            fifty_concurrent_duplicates_without_wait_run_once,
            fifty_concurrent_duplicates_with_wait_all_get_the_original_response,
            response_too_large_to_store_is_sent_then_not_replayable,
            streamed_response_is_sent_then_not_replayable,
            store_unavailable_is_503_and_the_handler_does_not_run,
            store_unavailable_with_fail_open_runs_the_handler,
            no_engine_configured_is_500_not_configured,
            engine_found_in_the_state_through_from_ref,
            engine_found_in_an_extension_layer,
            client_disconnect_does_not_stop_the_handler_and_the_retry_gets_its_response,
        );
    };
    (@cases $backend:ident, $store:expr; $($case:ident,)+) => {
        mod $backend {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    let store = ($store)().await;
                    $crate::conformance::cases::$case(store).await;
                }
            )+
        }
    };
}
pub(crate) use suite;
