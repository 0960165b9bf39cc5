#!/usr/bin/env bash
# The simulator's long search (tests/simulation.rs): any number of seeds, for as long as asked, with a progress line
# every 5 seconds; at the end, seeds/s, the invariants checked and every failing seed with the invariant it broke.
# About 220 seeds per second per core in release (each seed about a hundred requests over a minute of virtual time).
#
#   bash bench/sim.sh                          # 10 minutes from seed 0, release build, one thread per cpu
#   BUDGET=3600 START=1000000 bash bench/sim.sh   # an hour, from seed 1 000 000
#   SEEDS=50000 BUDGET=0 bash bench/sim.sh        # exactly 50 000 seeds, however long they take
#   PROFILE=debug bash bench/sim.sh            # the debug build CI runs (about 8 times slower)
#
# A failing seed replays with `SIM_SEED=<seed> cargo test --test simulation seeds_hold_every_invariant -- --nocapture`
# (add SIM_TRACE=1 for every event of the run).
set -euo pipefail
cd "$(dirname "$0")/.."

BUDGET=${BUDGET:-600}
START=${START:-0}
THREADS=${THREADS:-$(nproc)}
PROFILE=${PROFILE:-release}

flags=()
[[ $PROFILE == release ]] && flags+=(--release)
export SIM_START=$START SIM_THREADS=$THREADS SIM_KEEP_GOING=1
[[ $BUDGET != 0 ]] && export SIM_SECONDS=$BUDGET
[[ -n ${SEEDS:-} ]] && export SIM_SEEDS=$SEEDS
if [[ $BUDGET == 0 && -z ${SEEDS:-} ]]; then
  echo "BUDGET=0 needs SEEDS" >&2
  exit 2
fi
echo "sim: seeds from $START, ${SEEDS:-unbounded} seeds, ${BUDGET}s budget, $THREADS threads, $PROFILE build"
exec cargo test "${flags[@]}" --test simulation seeds_hold_every_invariant -- --nocapture
