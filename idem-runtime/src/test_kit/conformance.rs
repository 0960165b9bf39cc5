//! What [`conformance_tests!`](crate::test_kit::conformance_tests) expands to: the runtime of each case, and the
//! list of cases.

/// Runs one case to its end on a multi-threaded runtime of its own, as `#[tokio::test(flavor = "multi_thread")]`
/// would: the cases spawn tasks and serve a TCP listener. What [`conformance_tests!`] expands to call.
pub fn run<F: std::future::Future>(case: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("build a Tokio runtime for a conformance case")
        .block_on(case)
}

/// The expansion behind [`conformance_tests!`](crate::test_kit::conformance_tests): one list of cases, kept here
/// so that a case added to the kit runs on every store.
#[doc(hidden)]
#[macro_export]
macro_rules! __idem_conformance_tests {
    ($module:ident, $store:expr $(,)?) => {
        $crate::__idem_conformance_tests!(@module $module, $store;
            cases: [
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
            ];
            contract: [
                a_claim_is_exclusive_and_its_owner_may_send_it_again,
                a_completed_record_is_returned_to_every_later_claim_as_it_was_stored,
                writes_by_another_owner_are_fenced_and_change_nothing,
                release_frees_the_key_and_wakes_waiters,
                a_lapsed_lease_frees_the_key_and_fences_its_old_owner,
                complete_after_a_lapsed_lease_nobody_took_is_applied,
                renew_extends_the_lease_and_claims_a_lapsed_key_again,
                wait_returns_at_once_when_nothing_is_in_flight,
                wait_ends_at_its_timeout_while_the_claim_is_held,
                wait_ends_when_the_lease_runs_out,
                records_expire_after_their_ttl,
            ];
        );
    };
    (@module $module:ident, $store:expr; cases: [$($case:ident,)+]; contract: [$($contract:ident,)+];) => {
        mod $module {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[test]
                fn $case() {
                    $crate::test_kit::run(async { $crate::test_kit::cases::$case(($store)().await).await });
                }
            )+
            $(
                #[test]
                fn $contract() {
                    $crate::test_kit::run(async { $crate::test_kit::contract::$contract(($store)().await).await });
                }
            )+
        }
    };
}
