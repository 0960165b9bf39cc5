#!/usr/bin/env bash
# Runs idem's libFuzzer targets on the stable toolchain: no nightly, no cargo-fuzz needed.
#
#   fuzz/run.sh [SECONDS] [TARGET...]     # default: 300 seconds each, every target
#   fuzz/run.sh 60 key_header             # one target for a minute
#
# Targets (fuzz/fuzz_targets/): key_header (the Idempotency-Key parser against a reference reading of DESIGN.md §3)
# and record_decode (the Redis record decoder: no panic, and what it accepts replays and round-trips).
#
# How: the targets are built in release with rustc's SanitizerCoverage pass (what cargo-fuzz does with `-s none`,
# i.e. without AddressSanitizer, which needs nightly); libfuzzer-sys compiles libFuzzer itself with the system C++
# compiler. `--target` keeps the instrumentation off build scripts and proc-macros. Each target starts from
# fuzz/seeds/<target>, grows fuzz/corpus/<target>, and writes a crashing input to fuzz/artifacts/<target>/;
# replay one with `fuzz/target/<triple>/release/<target> fuzz/artifacts/<target>/crash-…`. A summary line per
# target (executions, corpus, crashes) is printed at the end; full logs are in fuzz/logs/.
#
# The crate is laid out as cargo-fuzz expects, so with cargo-fuzz installed this works too:
#   RUSTC_BOOTSTRAP=1 cargo fuzz run record_decode -s none -- -max_total_time=300
set -euo pipefail
cd "$(dirname "$0")"

seconds=${1:-300}
shift || true
targets=("$@")
((${#targets[@]})) || targets=(key_header record_decode)
triple=$(rustc -vV | sed -n 's/^host: //p')

export RUSTFLAGS="-Cpasses=sancov-module \
  -Cllvm-args=-sanitizer-coverage-level=4 \
  -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
  -Cllvm-args=-sanitizer-coverage-pc-table \
  -Cllvm-args=-sanitizer-coverage-trace-compares \
  --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
cargo build --release --target "$triple" --bins

declare -A dictionary=([key_header]=key.dict [record_decode]=record.dict)
status=0
mkdir -p logs
for target in "${targets[@]}"; do
  mkdir -p "corpus/$target" "artifacts/$target"
  log="logs/$target.log"
  set +e
  "target/$triple/release/$target" "corpus/$target" "seeds/$target" \
    -dict="${dictionary[$target]}" -max_total_time="$seconds" -max_len=4096 -print_final_stats=1 \
    -artifact_prefix="artifacts/$target/" >"$log" 2>&1
  code=$?
  set -e
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  corpus=$(find "corpus/$target" -type f | wc -l)
  crashes=$(find "artifacts/$target" -type f | wc -l)
  echo "$target: ${runs:-?} executions in ${seconds}s, corpus ${corpus} inputs, ${crashes} crash artifacts (exit ${code})"
  ((code == 0)) || status=$code
done
exit $status
