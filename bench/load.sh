#!/usr/bin/env bash
# Load benchmark of the reference service (`examples/orders.rs`): what idempotency costs per request, side by side
# with the same handler unprotected, on MemoryStore and on Redis, in one run.
#
#   bash bench/load.sh            # about 2½ minutes; needs cargo; installs wrk and redis-server if missing
#
# Routes, each measured with `wrk -t1` for DURATION seconds after WARMUP seconds, at 4 and 32 connections:
#   plain   POST /plain/orders, no idempotency (the baseline)
#   first   POST /orders with a new Idempotency-Key per request: claim, handler, complete
#   replay  POST /orders replaying one key: one claim-or-read, no handler
# Every request carries an Idempotency-Key (a new one per request, except on `replay`), so the handler does the same
# work on `plain` and `first` (it counts each execution, and each key's, in the store backend's counter). Each run
# gets a freshly started service (and an emptied Redis), so no run measures a store that an earlier one filled.
# MemoryStore holds at most 100 000 keys (its default bound, kept for 60 s by this route), so its `first` runs stop
# after MEMORY_FIRST_KEYS requests (warm-up: 10 000) even if DURATION has not passed.
#
# Everything listens on loopback ports found free. With taskset and at least 2 cpus, the service is pinned to cpu 0
# and wrk and redis-server to the others (SERVER_CPUS, LOAD_CPUS, REDIS_CPUS override). Redis CPU per request is
# redis-server's own CPU time (INFO cpu) over the run; the per-command breakdown comes from INFO commandstats, reset
# before each measured run.
#
# Then a memory check: a fresh MemoryStore service gets MEMORY_KEYS (105 000) distinct keys, 5 000 past its bound; the
# script reports its peak RSS and how many of them ran (the bound must hold: no more than 100 000).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-4}
WARMUP=${WARMUP:-1}
CONNECTIONS=${CONNECTIONS:-"4 32"}
MEMORY_KEYS=${MEMORY_KEYS:-105000}
MEMORY_BOUND=100000 # MemoryStore's default max_entries, which the reference service uses
MEMORY_FIRST_KEYS=${MEMORY_FIRST_KEYS:-85000}
BODY='{"item":"book","qty":1}'

need() { command -v "$1" >/dev/null 2>&1; }
install() {
  echo "installing $*" >&2
  local sudo=()
  ((EUID == 0)) || sudo=(sudo)
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "$@" >&2
}
need wrk || install wrk
{ need redis-server && need redis-cli && need redis-benchmark; } || install redis-server redis-tools
need cargo || { echo "cargo is needed to build the service: https://rustup.rs" >&2; exit 1; }

cpus=$(nproc)
if need taskset && ((cpus >= 2)); then
  SERVER_CPUS=${SERVER_CPUS:-0}
  LOAD_CPUS=${LOAD_CPUS:-1-$((cpus - 1))}
  REDIS_CPUS=${REDIS_CPUS:-$LOAD_CPUS}
  SERVER_PIN=(taskset -c "$SERVER_CPUS") LOAD_PIN=(taskset -c "$LOAD_CPUS") REDIS_PIN=(taskset -c "$REDIS_CPUS")
else
  SERVER_CPUS=any LOAD_CPUS=any REDIS_CPUS=any
  SERVER_PIN=() LOAD_PIN=() REDIS_PIN=()
fi

echo "building the reference service (release)…" >&2
cargo build --release --quiet --example orders
SERVICE=target/release/examples/orders

work=$(mktemp -d)
pids=()
cleanup() {
  local pid
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# A loopback port nobody listens on.
free_port() {
  local port
  while :; do
    port=$((20000 + RANDOM % 30000))
    (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null || { echo "$port"; return; }
  done
}

wait_for_port() {
  local deadline=$((SECONDS + 20))
  until (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null; do
    ((SECONDS < deadline)) || { echo "nothing listens on port $1 after 20 s" >&2; exit 1; }
    sleep 0.05
  done
}

# One HTTP/1.1 request over bash's /dev/tcp (no curl needed); prints the status code, then the body.
http() {
  local port=$1 method=$2 path=$3 key=$4 body=${5:-}
  exec 3<>"/dev/tcp/127.0.0.1/$port"
  printf '%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nIdempotency-Key: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s' \
    "$method" "$path" "$key" "${#body}" "$body" >&3
  local response
  response=$(cat <&3)
  exec 3<&-
  awk 'NR == 1 {print $2} /^\r?$/ {body = 1; next} body {print}' <<<"$response"
}

redis_port=$(free_port)
"${REDIS_PIN[@]}" redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
  --protected-mode no --dir "$work" --logfile "$work/redis.log" &
pids+=($!)
wait_for_port "$redis_port"
rcli() { redis-cli -p "$redis_port" "$@"; }
redis_version=$(rcli INFO server | tr -d '\r' | awk -F: '/^redis_version:/ {print $2}')

service_pid=
service_port=
start_service() { # memory | redis
  service_port=$(free_port)
  local env=(BIND="127.0.0.1:$service_port" RUST_LOG=warn)
  [[ $1 == redis ]] && env+=(REDIS_URL="redis://127.0.0.1:$redis_port")
  # env and taskset exec: the pid is the service's.
  env "${env[@]}" "${SERVER_PIN[@]}" "$SERVICE" >>"$work/service.log" 2>&1 &
  service_pid=$!
  pids+=("$service_pid")
  wait_for_port "$service_port"
}
stop_service() {
  kill "$service_pid" 2>/dev/null || true
  wait "$service_pid" 2>/dev/null || true
}

# The wrk script. `request` is a function on every route, so wrk does comparable work per request on each; `done`
# prints one machine-readable line.
cat >"$work/load.lua" <<'LUA'
local body = os.getenv("BODY")
local head = "POST " .. os.getenv("ROUTE") .. " HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
  .. "Content-Length: " .. #body .. "\r\nIdempotency-Key: "
local tail = "\r\n\r\n" .. body
local prefix = os.getenv("KEY_PREFIX")
local fixed = os.getenv("FIXED_KEY")
local stop_after = tonumber(os.getenv("STOP_AFTER") or "0")
local stop_marker = os.getenv("STOP_MARKER")
local sent, answered = 0, 0
local fixed_request = fixed and (head .. fixed .. tail)

function request()
  if fixed_request then return fixed_request end
  sent = sent + 1
  return head .. prefix .. "-" .. sent .. tail
end

-- After STOP_AFTER answers the thread stops and says so in STOP_MARKER, and the script interrupts wrk (SIGINT),
-- which then reports the time it ran, not the whole -d duration.
function response()
  answered = answered + 1
  if answered == stop_after then
    io.open(stop_marker, "w"):close()
    wrk.thread:stop()
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %.0f %.0f %d %d\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), e.status, e.connect + e.read + e.write + e.timeout))
end
LUA

# Runs wrk for `seconds`, or until `stop-after` answers; prints "requests duration_us p50_us p99_us non-2xx
# socket-errors".
load() { # route connections seconds key-prefix fixed-key|"" [stop-after]
  local route=$1 connections=$2 seconds=$3 prefix=$4 fixed=$5 stop_after=${6:-0} marker="$work/stopped"
  local env=(ROUTE="$route" BODY="$BODY" KEY_PREFIX="$prefix" STOP_AFTER="$stop_after" STOP_MARKER="$marker")
  [[ -n $fixed ]] && env+=(FIXED_KEY="$fixed")
  rm -f "$marker"
  env "${env[@]}" "${LOAD_PIN[@]}" wrk -t1 -c"$connections" -d"${seconds}s" --latency -s "$work/load.lua" \
    "http://127.0.0.1:$service_port$route" >"$work/wrk.out" &
  local wrk_pid=$!
  if ((stop_after > 0)); then
    while kill -0 "$wrk_pid" 2>/dev/null && [[ ! -e $marker ]]; do sleep 0.01; done
    kill -INT "$wrk_pid" 2>/dev/null || true
  fi
  wait "$wrk_pid"
  awk '/^RESULT/ {print $2, $3, $4, $5, $6, $7}' "$work/wrk.out"
}

# `INFO commandstats` as "command calls usec" lines, without the commands this script sends itself.
commandstats() {
  rcli INFO commandstats | tr -d '\r' | awk -F'[:,=]' '/^cmdstat_/ {
    name = substr($1, 9); if (name == "info" || name == "config|resetstat" || name == "flushall") next
    print name, $3, $5 }'
}

# CPU seconds redis-server has used (user + system): its whole cost, network I/O included.
redis_cpu_seconds() {
  rcli INFO cpu | tr -d '\r' | awk -F: '/^used_cpu_(user|sys):/ {total += $2} END {printf "%.6f", total}'
}

# µs per call of `redis-benchmark` running one command 200 000 times on `connections` connections.
usec_per_call() { # connections command…
  local connections=$1
  shift
  rcli CONFIG RESETSTAT >/dev/null
  "${LOAD_PIN[@]}" redis-benchmark -p "$redis_port" -c "$connections" -n 200000 -q "$@" >/dev/null
  commandstats | awk -v name="$(tr '[:upper:]' '[:lower:]' <<<"$1")" '$1 == name {printf "%.2f", $3 / $2}'
}

results="$work/results"
breakdown="$work/breakdown"
: >"$results"
: >"$breakdown"
: >"$work/replay-vs-get"

run() { # store route-name connections
  local store=$1 name=$2 connections=$3 route=/orders fixed= prefix="$store-$name-$connections-$RANDOM"
  local warmup_keys=0 measured_keys=0
  [[ $name == plain ]] && route=/plain/orders
  [[ $store == memory && $name == first ]] && warmup_keys=10000 measured_keys=$MEMORY_FIRST_KEYS
  [[ $store == redis ]] && rcli FLUSHALL >/dev/null
  start_service "$store"
  if [[ $name == replay ]]; then
    fixed="$prefix-replayed"
    local status
    status=$(http "$service_port" POST /orders "$fixed" "$BODY" | head -1)
    [[ $status == 201 ]] || { echo "priming the replayed key answered $status" >&2; exit 1; }
  fi
  load "$route" "$connections" "$WARMUP" "$prefix-warmup" "$fixed" "$warmup_keys" >/dev/null
  local cpu_before=0
  if [[ $store == redis ]]; then
    rcli CONFIG RESETSTAT >/dev/null
    cpu_before=$(redis_cpu_seconds)
  fi
  local measured
  measured=$(load "$route" "$connections" "$DURATION" "$prefix" "$fixed" "$measured_keys")
  local redis_cpu=-
  if [[ $store == redis ]]; then
    local requests=${measured%% *}
    redis_cpu=$(awk -v before="$cpu_before" -v after="$(redis_cpu_seconds)" -v n="$requests" \
      'BEGIN {printf "%.2f", (after - before) * 1e6 / n}')
    commandstats >"$work/stats"
    if [[ $name != plain ]]; then
      awk -v n="$requests" -v run="$name c=$connections" '{
        printf "  %-13s %-9s %6.3f calls/req %6.2f µs/call %6.2f µs/req\n", run, $1, $2 / n, $3 / $2, $3 / n }' \
        "$work/stats" >>"$breakdown"
    fi
    if [[ $name == replay ]]; then
      # A replay's own command under load: the claim-or-read (`set`, or `evalsha` where SET NX GET is refused).
      local in_load record claim
      in_load=$(awk -v n="$requests" '$1 == "set" || $1 == "evalsha" {usec += $3} END {printf "%.2f", usec / n}' \
        "$work/stats")
      # The same command and a GET of the replayed record, each alone from redis-benchmark: the two costs side by
      # side, on an idle server (under load, both cost more, and the GET cannot be measured under the same load).
      record=$(rcli --scan --pattern 'idem:*' | head -1)
      claim='{"state":"in_flight","owner":"0123456789abcdef0123456789abcdef","fingerprint":"'"$(printf '%064d' 0)"'","v":1}'
      echo "$connections $in_load $(usec_per_call "$connections" SET "$record" "$claim" NX GET PX 30000)" \
        "$(usec_per_call "$connections" GET "$record")" >>"$work/replay-vs-get"
    fi
  fi
  stop_service
  echo "$store $connections $name $measured $redis_cpu" >>"$results"
}

for store in memory redis; do
  for connections in $CONNECTIONS; do
    for name in plain first replay; do
      echo "run: $store, $connections connections, $name" >&2
      run "$store" "$name" "$connections"
    done
  done
done

# Memory: distinct keys past the MemoryStore's default bound (100 000 entries), peak RSS, and the bound holding.
echo "memory: $MEMORY_KEYS distinct keys on MemoryStore…" >&2
start_service memory
load /orders 32 300 "memory-$RANDOM" "" "$MEMORY_KEYS" >"$work/memory"
rss_kib=$(awk '/^VmHWM:/ {print $2}' "/proc/$service_pid/status")
executions=$(http "$service_port" GET /stats none | tail -1 | tr -dc '0-9')
stop_service

echo
echo "idem load benchmark, $(date -u +%Y-%m-%d): $cpus cpus ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)),"
echo "redis $redis_version, wrk -t1, ${DURATION} s per run after ${WARMUP} s of warm-up;"
echo "service on cpu $SERVER_CPUS, wrk on cpu $LOAD_CPUS, redis-server on cpu $REDIS_CPUS"
echo
printf '%-7s %5s  %-7s %9s %7s %7s %8s %10s %7s\n' store conns route "req/s" "p50 ms" "p99 ms" "× plain" "redis µs" errors
awk '
  { key = $1 " " $2; rate = $4 / ($5 / 1e6); if ($3 == "plain") plain[key] = rate; line[NR] = $0; rates[NR] = rate }
  END { for (i = 1; i <= NR; i++) { split(line[i], f, " "); key = f[1] " " f[2]
    printf "%-7s %5s  %-7s %9.0f %7.2f %7.2f %8.2f %10s %7d\n", f[1], f[2], f[3], rates[i], f[6] / 1000, f[7] / 1000,
      rates[i] / plain[key], f[10], f[8] + f[9] } }' "$results"
echo
echo "× plain: requests/s over the plain route's in the same store and connections. redis µs: redis-server's CPU"
echo "time (user + system, INFO cpu) per request, network I/O and the handler's counter included. errors: non-2xx"
echo "answers and socket errors."
echo
echo "Redis commands per request (INFO commandstats; evalsha's time includes the commands its script runs, exec's"
echo "those of its transaction, and Redis lists those commands as well):"
cat "$breakdown"
echo
while read -r connections in_load claim get; do
  awk -v c="$connections" -v l="$in_load" -v s="$claim" -v g="$get" 'BEGIN {
    printf "replay, %s connections: its claim-or-read took %.2f µs per call under load; alone, %.2f µs against %.2f", c, l, s, g
    printf " µs for a GET of the same record: %.2f× a GET\n", s / g }'
done <"$work/replay-vs-get"
awk '$1 == "redis" { cpu[$2 " " $3] = $10; conns[$2] = 1 }
  END { for (c in conns) printf "first request, %s connections: redis-server CPU %.2f µs per request, plain %.2f: idem adds %.2f µs\n",
    c, cpu[c " first"], cpu[c " plain"], cpu[c " first"] - cpu[c " plain"] }' "$results" | sort -t, -k1,1 -n
echo
read -r sent _ _ _ refused _ <"$work/memory"
awk -v sent="$sent" -v refused="$refused" -v ran="$executions" -v kib="$rss_kib" -v bound="$MEMORY_BOUND" 'BEGIN {
  printf "MemoryStore, %d distinct keys answered: %d ran, %d refused (503: the store is full); peak RSS %.1f MiB",
    sent, ran, refused, kib / 1024
  if (ran > bound) print ". THE BOUND OF " bound " KEYS DID NOT HOLD."
  else if (sent > bound) print "; the bound of " bound " keys held."
  else print "." }'
