#!/usr/bin/env bash
# Load benchmark of the reference service (`examples/orders.rs`): what idempotency costs per request, side by side
# with the same handler unprotected, on MemoryStore and on Redis, in one run.
#
#   bash bench/load.sh            # about 2 minutes; needs cargo; installs wrk and redis-server if missing
#
# Routes, each with `wrk` for DURATION seconds after WARMUP seconds, at 4 and 32 connections:
#   plain   POST /plain/orders, no idempotency (the baseline)
#   first   POST /orders with a new Idempotency-Key per request: claim, handler, complete
#   replay  POST /orders replaying one key: one claim-or-read, no handler
# Every request carries an Idempotency-Key (a new one per request, except on `replay`), so the handler does the same
# work on `plain` and `first` (it counts each execution, and each key's, in the store backend's counter). Each run
# gets a freshly started service (and an emptied Redis), so no run fills a store that the next one measures.
#
# Everything listens on loopback ports found free. With taskset and at least 2 cpus, the service is pinned to one
# cpu and wrk and redis-server to the others (SERVER_CPUS, LOAD_CPUS, REDIS_CPUS override). Redis µs per request
# come from `INFO commandstats`, reset before and read after each measured run: all the commands the server ran,
# the handler's own counter included; the breakdown splits them by command.
#
# Then a memory check: a fresh MemoryStore service takes MEMORY_KEYS (100 000) distinct keys, its default bound;
# the script reports its peak RSS and checks that further new keys are refused (503) rather than stored.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-4}
WARMUP=${WARMUP:-1}
CONNECTIONS=${CONNECTIONS:-"4 32"}
MEMORY_KEYS=${MEMORY_KEYS:-100000}
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
need redis-server && need redis-cli || install redis-server redis-tools
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

# One HTTP/1.1 request over bash's /dev/tcp (no curl needed); prints the status line's code.
http_status() {
  local port=$1 method=$2 path=$3 key=$4 body=${5:-}
  exec 3<>"/dev/tcp/127.0.0.1/$port"
  printf '%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nIdempotency-Key: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s' \
    "$method" "$path" "$key" "${#body}" "$body" >&3
  local status
  read -r _ status _ <&3
  exec 3<&-
  echo "$status"
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
start_service() { # store: memory | redis
  service_port=$(free_port)
  local env=(BIND="127.0.0.1:$service_port" RUST_LOG=warn)
  [[ $1 == redis ]] && env+=(REDIS_URL="redis://127.0.0.1:$redis_port")
  # env and taskset exec: the pid is the service's.
  env "${env[@]}" "${SERVER_PIN[@]}" "$SERVICE" &
  service_pid=$!
  pids+=("$service_pid")
  wait_for_port "$service_port"
}
stop_service() {
  kill "$service_pid" 2>/dev/null || true
  wait "$service_pid" 2>/dev/null || true
}

# wrk scripts. `request` is a function on every route, so wrk does comparable work per request on each; `done`
# prints one machine-readable line.
cat >"$work/common.lua" <<'LUA'
local body = os.getenv("BODY")
local head = "POST " .. os.getenv("ROUTE") .. " HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
  .. "Content-Length: " .. #body .. "\r\nIdempotency-Key: "
local tail = "\r\n\r\n" .. body
local prefix = os.getenv("KEY_PREFIX")
local fixed = os.getenv("FIXED_KEY")
local stop_after = tonumber(os.getenv("STOP_AFTER") or "0")
local sent, answered = 0, 0
local fixed_request = fixed and (head .. fixed .. tail)

function setup(thread)
  thread:set("thread_id", tostring(math.random(1e9)))
end

function request()
  if fixed_request then return fixed_request end
  sent = sent + 1
  return head .. prefix .. "-" .. (thread_id or "0") .. "-" .. sent .. tail
end

function response()
  answered = answered + 1
  if stop_after > 0 and answered >= stop_after then wrk.thread:stop() end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %.0f %.0f %d\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), e.connect + e.read + e.write + e.status + e.timeout))
end
LUA

# Runs wrk; prints "requests duration_us p50_us p99_us errors".
load() { # route connections seconds key-prefix|"" fixed-key|"" [stop-after]
  local route=$1 connections=$2 seconds=$3 prefix=$4 fixed=$5 stop_after=${6:-0}
  local env=(ROUTE="$route" BODY="$BODY" KEY_PREFIX="$prefix" STOP_AFTER="$stop_after")
  [[ -n $fixed ]] && env+=(FIXED_KEY="$fixed")
  env "${env[@]}" "${LOAD_PIN[@]}" wrk -t1 -c"$connections" -d"${seconds}s" --latency -s "$work/common.lua" \
    "http://127.0.0.1:$service_port$route" | awk '/^RESULT/ {print $2, $3, $4, $5, $6}'
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

results="$work/results"
breakdown="$work/breakdown"
: >"$results"
: >"$breakdown"
: >"$work/replay-vs-get"

run() { # store route-name connections
  local store=$1 name=$2 connections=$3 route=/orders fixed= prefix="$store-$name-$connections-$RANDOM"
  [[ $name == plain ]] && route=/plain/orders
  [[ $store == redis ]] && rcli FLUSHALL >/dev/null
  start_service "$store"
  if [[ $name == replay ]]; then
    fixed="$prefix-replayed"
    local status
    status=$(http_status "$service_port" POST /orders "$fixed" "$BODY")
    [[ $status == 201 ]] || { echo "priming the replayed key answered $status" >&2; exit 1; }
  fi
  load "$route" "$connections" "$WARMUP" "$prefix-warmup" "$fixed" >/dev/null
  local cpu_before=0
  if [[ $store == redis ]]; then
    rcli CONFIG RESETSTAT >/dev/null
    cpu_before=$(redis_cpu_seconds)
  fi
  local measured
  measured=$(load "$route" "$connections" "$DURATION" "$prefix" "$fixed")
  local redis_cpu=-
  if [[ $store == redis ]]; then
    local requests=${measured%% *}
    redis_cpu=$(awk -v before="$cpu_before" -v after="$(redis_cpu_seconds)" -v n="$requests" \
      'BEGIN {printf "%.2f", (after - before) * 1e6 / n}')
    commandstats >"$work/stats"
    if [[ $name != plain ]]; then
      awk -v n="$requests" -v run="$name c=$connections" '{
        printf "%-14s %-10s %8.3f calls/req %7.2f µs/call %7.2f µs/req\n", run, $1, $2 / n, $3 / $2, $3 / n }' \
        "$work/stats" >>"$breakdown"
      if [[ $name == replay ]]; then
        # A replay's own commands: the claim-or-read (`set`, or `evalsha` on a server without SET NX GET).
        local replay_usec get_usec record
        replay_usec=$(awk -v n="$requests" '$1 == "set" || $1 == "evalsha" || $1 == "eval" {usec += $3}
          END {printf "%.2f", usec / n}' "$work/stats")
        # The reference: a plain GET of the very record that is replayed, same connections, same server.
        record=$(rcli --scan --pattern 'idem:*' | head -1)
        rcli CONFIG RESETSTAT >/dev/null
        "${LOAD_PIN[@]}" redis-benchmark -p "$redis_port" -c "$connections" -n 100000 -q GET "$record" >/dev/null
        get_usec=$(commandstats | awk '$1 == "get" {printf "%.2f", $3 / $2}')
        printf '%-14s %-10s %8.3f calls/req %7.2f µs/call %7.2f µs/req\n' "GET c=$connections" get 1 \
          "$get_usec" "$get_usec" >>"$breakdown"
        echo "$connections $replay_usec $get_usec" >>"$work/replay-vs-get"
      fi
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

echo
echo "idem load benchmark: $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cpus ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)),"
echo "redis $redis_version, wrk -t1, ${DURATION} s per run after ${WARMUP} s warm-up; service on cpu $SERVER_CPUS, wrk on $LOAD_CPUS, redis on $REDIS_CPUS"
echo
printf '%-7s %5s  %-7s %10s %9s %9s %9s %12s %7s\n' store conns route "req/s" "p50 ms" "p99 ms" "× plain" "redis cpu µs" errors
awk '
  { key = $1 " " $2; rate = $4 / ($5 / 1e6); if ($3 == "plain") plain[key] = rate
    line[NR] = $0; rates[NR] = rate }
  END { for (i = 1; i <= NR; i++) { split(line[i], f, " "); key = f[1] " " f[2]
    printf "%-7s %5s  %-7s %10.0f %9.2f %9.2f %9.2f %12s %7d\n", f[1], f[2], f[3], rates[i], f[6] / 1000, f[7] / 1000,
      rates[i] / plain[key], f[9], f[8] } }' "$results"
echo
echo "redis cpu µs: redis-server's CPU time (user + system, INFO cpu) per request, network I/O and the handler's"
echo "counter included. Below, per command (INFO commandstats): evalsha's time includes the commands its script runs"
echo "and exec's those of its transaction, which are listed as well."
cat "$breakdown"
echo
while read -r connections replay_usec get_usec; do
  awk -v c="$connections" -v r="$replay_usec" -v g="$get_usec" 'BEGIN {
    printf "replay at %s connections: %.2f µs of Redis command time per replay, %.2f per GET of the same record: %.2f×\n",
      c, r, g, r / g }'
done <"$work/replay-vs-get"
awk '$1 == "redis" { cpu[$2 " " $3] = $9; conns[$2] = 1 }
  END { for (c in conns) printf "first request at %s connections: redis cpu %.2f µs, plain %.2f µs: idem adds %.2f µs\n",
    c, cpu[c " first"], cpu[c " plain"], cpu[c " first"] - cpu[c " plain"] }' "$results" | sort -n -k4

# Memory: distinct keys up to the MemoryStore's default bound (100 000 entries), peak RSS, and the bound holding.
echo
echo "memory: $MEMORY_KEYS distinct keys on MemoryStore…" >&2
start_service memory
load /orders 32 120 "memory-$RANDOM" "" "$MEMORY_KEYS" >"$work/memory"
rss=$(awk '/^VmHWM:/ {print $2}' "/proc/$service_pid/status")
over=$(http_status "$service_port" POST /orders "over-the-bound-$RANDOM" "$BODY")
read -r sent _ _ _ errors <"$work/memory"
stop_service
printf 'MemoryStore, %d distinct keys (%d refused): peak RSS %.1f MiB; one more new key answers %s (%s)\n' \
  "$sent" "$errors" "$(awk -v kb="$rss" 'BEGIN {print kb / 1024}')" "$over" \
  "$([[ $over == 503 ]] && echo "the 100 000-entry bound holds" || echo "expected 503 once the bound is reached")"
