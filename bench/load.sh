#!/usr/bin/env bash
# Load benchmark of the reference service (`examples/orders`): what idempotency costs per request, side by side
# with the same handler unprotected, on MemoryStore, Redis and PostgreSQL, in one run.
#
#   bash bench/load.sh            # about 4 minutes; needs cargo; installs wrk, redis-server and postgresql if missing
#   STORES="memory redis" bash bench/load.sh   # a subset of the stores
#
# Routes, each measured ROUNDS (3) times with `wrk -t1` for DURATION (2) seconds, taking turns, after WARMUP (1)
# seconds each, at 4 and 32 connections:
#   plain   POST /plain/orders, no idempotency (the baseline)
#   first   POST /orders with a new Idempotency-Key per request: claim, handler, complete
#   replay  POST /orders replaying one key: one claim-or-read, no handler
# Every request carries an Idempotency-Key (a new one per request, except on `replay`), so the handler does the same
# work on `plain` and `first` (it counts each execution, and each key's, in the store backend's counter; on
# PostgreSQL it inserts an `orders` row: autocommitted on `plain`, in the handler's transaction (`Tx`) with its
# record on `first`). PostgreSQL runs with fsync off (commits are written to the WAL, not flushed to this VM's disk). Each store
# and connection count gets a freshly started service (and an emptied Redis).
# MemoryStore holds at most 100 000 keys (its default bound, kept for 60 s by this route), so its `first` runs stop
# after MEMORY_FIRST_KEYS (85 000) requests in all (warm-up: 5 000) even if their time has not run out.
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

DURATION=${DURATION:-2}
WARMUP=${WARMUP:-1}
ROUNDS=${ROUNDS:-3}
CONNECTIONS=${CONNECTIONS:-"4 32"}
STORES=${STORES:-"memory redis postgres"}
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
# Debian keeps PostgreSQL's server binaries off PATH, in /usr/lib/postgresql/<version>/bin.
pg_bin() { find /usr/lib/postgresql -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -1; }
if [[ " $STORES " == *" postgres "* ]]; then
  [[ -x "$(pg_bin)/initdb" ]] || install postgresql
  PG_BIN=$(pg_bin)
fi

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
cargo build --release --quiet -p idem-example-orders
SERVICE=target/release/orders

work=$(mktemp -d)
pids=()
pg_dir=
as_postgres=()
cleanup() {
  local pid
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  if [[ -n $pg_dir ]]; then
    "${as_postgres[@]}" "$PG_BIN/pg_ctl" -D "$pg_dir/data" stop -m immediate >/dev/null 2>&1 || true
    rm -rf "$pg_dir"
  fi
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

# PostgreSQL refuses to run as root: as root, its cluster belongs to the `postgres` user.
pg_port=
pg_version=
if [[ " $STORES " == *" postgres "* ]]; then
  pg_dir=$(mktemp -d /tmp/idem-bench-postgres.XXXXXX)
  if ((EUID == 0)); then
    chown postgres: "$pg_dir"
    as_postgres=(runuser -u postgres --)
  fi
  "${as_postgres[@]}" "$PG_BIN/initdb" -D "$pg_dir/data" -U postgres -A trust -E UTF8 --no-sync >/dev/null
  pg_port=$(free_port)
  "${as_postgres[@]}" "$PG_BIN/pg_ctl" -D "$pg_dir/data" -l "$pg_dir/log" -w start -o \
    "-p $pg_port -k $pg_dir -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100" >/dev/null
  pg_version=$("$PG_BIN/postgres" --version | awk '{print $3}')
  # Every backend on the REDIS_CPUS: the store's cpus, like redis-server's.
  for pid in $(pgrep -u postgres -x postgres); do taskset -pc "$REDIS_CPUS" "$pid" >/dev/null 2>&1 || true; done
fi

service_pid=
service_port=
start_service() { # memory | redis
  service_port=$(free_port)
  local env=(BIND="127.0.0.1:$service_port" RUST_LOG=warn)
  [[ $1 == redis ]] && env+=(REDIS_URL="redis://127.0.0.1:$redis_port")
  [[ $1 == postgres ]] && env+=(DATABASE_URL="postgres://postgres@127.0.0.1:$pg_port/postgres")
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

# CPU seconds PostgreSQL's processes have used (user + system, with their exited children): the service's pooled
# backends live as long as the service, so a difference over a run is the run's cost.
postgres_cpu_seconds() {
  local pid total=0
  for pid in $(pgrep -u postgres -x postgres); do
    total=$(awk -v t="$total" -v tick="$(getconf CLK_TCK)" '{printf "%.6f", t + ($14 + $15 + $16 + $17) / tick}' \
      "/proc/$pid/stat" 2>/dev/null || echo "$total")
  done
  echo "$total"
}

# The store's own CPU seconds: redis-server's or PostgreSQL's.
store_cpu_seconds() { # store
  case $1 in
    redis) redis_cpu_seconds ;;
    postgres) postgres_cpu_seconds ;;
    *) echo 0 ;;
  esac
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
: >"$results"
: >"$work/cmdstats"
: >"$work/replay-vs-get"

# CPU seconds the service has used (user + system).
service_cpu_seconds() {
  awk -v tick="$(getconf CLK_TCK)" '{printf "%.6f", ($14 + $15) / tick}' "/proc/$service_pid/stat"
}

# One measured run of a route; appends "store conns route requests duration_us p50_us p99_us non-2xx socket-errors
# redis-cpu-seconds service-cpu-seconds" to the results, and on Redis the run's commandstats to cmdstats.
measure() { # store connections route-name replayed-key stop-after
  local store=$1 connections=$2 name=$3 replayed=$4 stop_after=$5 route=/orders fixed=
  [[ $name == plain ]] && route=/plain/orders
  [[ $name == replay ]] && fixed=$replayed
  local cpu_before
  [[ $store == redis ]] && rcli CONFIG RESETSTAT >/dev/null
  cpu_before=$(store_cpu_seconds "$store")
  local measured cpu=0 service_before
  service_before=$(service_cpu_seconds)
  measured=$(load "$route" "$connections" "$DURATION" "$store-$name-$connections-$RANDOM$RANDOM" "$fixed" "$stop_after")
  local service_cpu
  service_cpu=$(awk -v before="$service_before" -v after="$(service_cpu_seconds)" 'BEGIN {printf "%.6f", after - before}')
  cpu=$(awk -v before="$cpu_before" -v after="$(store_cpu_seconds "$store")" 'BEGIN {printf "%.6f", after - before}')
  [[ $store == redis ]] && commandstats | sed "s/^/$store $connections $name /" >>"$work/cmdstats"
  echo "$store $connections $name $measured $cpu $service_cpu" >>"$results"
}

for store in $STORES; do
  for connections in $CONNECTIONS; do
    echo "runs: $store, $connections connections, $ROUNDS rounds" >&2
    [[ $store == redis ]] && rcli FLUSHALL >/dev/null
    start_service "$store"
    replayed="replayed-$RANDOM$RANDOM"
    status=$(http "$service_port" POST /orders "$replayed" "$BODY" | head -1)
    [[ $status == 201 ]] || { echo "priming the replayed key answered $status" >&2; exit 1; }
    if [[ $store == redis ]]; then
      # A GET of the replayed record (what a replay sends once its process has seen the key completed) and the
      # claim-or-read (what it sends otherwise), each alone from redis-benchmark on the idle server: the two
      # commands' costs side by side (under load both cost more, and differently from run to run).
      record=$(rcli --scan --pattern 'idem:*' | head -1)
      claim='{"state":"in_flight","owner":"0123456789abcdef0123456789abcdef","fingerprint":"'"$(printf '%064d' 0)"'","v":1}'
      echo "$connections $(usec_per_call "$connections" SET "$record" "$claim" NX GET PX 30000)" \
        "$(usec_per_call "$connections" GET "$record")" >>"$work/replay-vs-get"
    fi
    # MemoryStore keeps at most 100 000 keys, 60 s each on this route: its first-request runs stay short of that.
    first_keys=0
    [[ $store == memory ]] && first_keys=$((MEMORY_FIRST_KEYS / ROUNDS))
    for name in plain first replay; do
      route=/orders fixed=
      [[ $name == plain ]] && route=/plain/orders
      [[ $name == replay ]] && fixed=$replayed
      warmup_keys=0
      [[ $store == memory && $name == first ]] && warmup_keys=5000
      load "$route" "$connections" "$WARMUP" "warmup-$name-$RANDOM$RANDOM" "$fixed" "$warmup_keys" >/dev/null
    done
    # The routes take turns, so a burst of noise from elsewhere on the machine does not land on one route only.
    for ((round = 1; round <= ROUNDS; round++)); do
      for name in plain first replay; do
        stop_after=0
        [[ $name == first ]] && stop_after=$first_keys
        measure "$store" "$connections" "$name" "$replayed" "$stop_after"
      done
    done
    stop_service
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
echo "redis $redis_version${pg_version:+, postgresql $pg_version (fsync off)}, wrk -t1, $ROUNDS runs of ${DURATION} s per route"
echo "after ${WARMUP} s of warm-up; service on cpu $SERVER_CPUS, wrk on cpu $LOAD_CPUS, redis-server${pg_version:+ and postgres} on cpu $REDIS_CPUS"
echo
printf '%-8s %5s  %-7s %8s %7s %7s %8s %9s %9s %7s\n' store conns route "req/s" "p50 ms" "p99 ms" "× plain" \
  "svc µs" "store µs" errors
awk '
  function median(list,    n, values, i, j, swap) {
    n = split(list, values, " ")
    for (i = 2; i <= n; i++) for (j = i; j > 1 && values[j - 1] + 0 > values[j] + 0; j--) {
      swap = values[j]; values[j] = values[j - 1]; values[j - 1] = swap }
    return n % 2 ? values[(n + 1) / 2] : (values[n / 2] + values[n / 2 + 1]) / 2
  }
  { key = $1 " " $2 " " $3
    if (!(key in rates)) order[++keys] = key
    rates[key] = rates[key] " " $4 / ($5 / 1e6); p50[key] = p50[key] " " $6; p99[key] = p99[key] " " $7
    errors[key] += $8 + $9; requests[key] += $4; cpu[key] += $10; service[key] += $11 }
  END { for (i = 1; i <= keys; i++) { key = order[i]; split(key, f, " ")
    plain = median(rates[f[1] " " f[2] " plain"])
    printf "%-8s %5s  %-7s %8.0f %7.2f %7.2f %8.2f %9.1f %9s %7d\n", f[1], f[2], f[3], median(rates[key]),
      median(p50[key]) / 1000, median(p99[key]) / 1000, median(rates[key]) / plain, service[key] * 1e6 / requests[key],
      f[1] != "memory" ? sprintf("%.1f", cpu[key] * 1e6 / requests[key]) : "-", errors[key] } }' "$results"
echo
echo "Medians of $ROUNDS runs per route (the routes take turns). × plain: requests/s over the plain route's, same store"
echo "and connections. svc µs: the service's CPU time (user + system) per request, all runs of the route; store µs:"
echo "redis-server's (INFO cpu) or PostgreSQL's processes', network I/O and the handler's own counting included."
echo "errors: non-2xx answers and socket errors. CPU per request is steadier than requests/s on a machine shared with"
echo "other work."
echo
echo "Redis commands per request (INFO commandstats; evalsha's time includes the commands its script runs, exec's"
echo "those of its transaction, and Redis lists those commands as well):"
awk 'FNR == NR { requests[$1 " " $2 " " $3] += $4; next }
  $1 == "redis" && $3 != "plain" && $4 != "ping" { key = $3 " c=" $2; if (!(key in seen)) order[++keys] = key
    seen[key] = $1 " " $2 " " $3; if (!((key, $4) in calls)) names[key] = names[key] " " $4
    calls[key, $4] += $5; usec[key, $4] += $6 }
  END { for (i = 1; i <= keys; i++) { key = order[i]; n = requests[seen[key]]; split(names[key], list, " ")
    for (j = 1; j in list; j++) { name = list[j]
      printf "  %-11s %-8s %6.3f calls/req %6.2f µs/call %6.2f µs/req\n", key, name, calls[key, name] / n,
        usec[key, name] / calls[key, name], usec[key, name] / n } } }' "$results" "$work/cmdstats"
echo
while read -r connections claim get; do
  # What the replay route sent, per request, in its runs.
  sent=$(awk -v c="$connections" 'FNR == NR { requests[$1 " " $2 " " $3] += $4; next }
    $1 == "redis" && $2 == c && $3 == "replay" && $4 != "ping" { calls[$4] += $5 }
    END { n = requests["redis " c " replay"]
      for (name in calls) if (calls[name] / n >= 0.001) printf "%s%s × %.3f", (shown++ ? ", " : ""), toupper(name), calls[name] / n
      else rare = rare (rare == "" ? "" : ", ") calls[name] " " toupper(name)
      if (rare != "") printf " (and %s in %d requests)", rare, n }' \
    "$results" "$work/cmdstats")
  awk -v c="$connections" -v s="$claim" -v g="$get" -v sent="$sent" 'BEGIN {
    printf "replay, %s connections: sent %s per request. Alone on the idle server, a GET of the replayed record takes", c, sent
    printf " %.2f µs of Redis time per call; the claim-or-read (SET NX GET PX) %.2f, %.2f× a GET\n", g, s, s / g }'
done <"$work/replay-vs-get"
awk '$1 == "redis" { cpu[$2 " " $3] += $10; requests[$2 " " $3] += $4; conns[$2] = 1 }
  END { for (c in conns) { first = cpu[c " first"] * 1e6 / requests[c " first"]; plain = cpu[c " plain"] * 1e6 / requests[c " plain"]
    printf "first request, %s connections: redis-server CPU %.2f µs per request, plain %.2f: idem adds %.2f µs\n",
      c, first, plain, first - plain } }' "$results" | sort -t, -k1,1 -n
echo
read -r sent _ _ _ refused _ <"$work/memory"
awk -v sent="$sent" -v refused="$refused" -v ran="$executions" -v kib="$rss_kib" -v bound="$MEMORY_BOUND" 'BEGIN {
  printf "MemoryStore, %d distinct keys answered: %d ran, %d refused (503: the store is full); peak RSS %.1f MiB",
    sent, ran, refused, kib / 1024
  if (ran > bound) print ". THE BOUND OF " bound " KEYS DID NOT HOLD."
  else if (sent > bound) print "; the bound of " bound " keys held."
  else print "." }'
