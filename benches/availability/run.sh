#!/usr/bin/env bash
# Failed requests during a rolling restart and during random worker crashes, under wrk
# load, for lb and for Node's cluster module (the tutorial's restart-on-exit and
# SIGUSR2 handlers); and a rolling restart of many workers under keep-alive load, with
# how long it takes. Prints Markdown tables.
#
#   cargo build --release && benches/availability/run.sh [all|restarts|keepalive]
#   LB=path/to/other/lb ROLLOUT_WATCH= benches/availability/run.sh keepalive  # a build
#                                           # from before rollout_watch (the key is omitted)
#
# Needs node and wrk (apt-get install wrk).
#
# restarts: every request opens a new connection ("Connection: close"), so a restart
# shows up as refused or reset connections rather than being hidden (or caused) by
# keep-alive connections pinned to an old worker. WORKERS (default 2), DURATION (10 s).
#
# keepalive: wrk keeps its connections open (no "Connection: close"), so every worker
# always holds some of them and an old worker only lets them go when the app closes them
# or drain_timeout passes. 3 s into the load, `lb restart` (which answers once the
# rollout has finished) replaces every worker; then the load goes on until every old
# worker has exited, and 2 s more. WORKERS (default 16), DRAIN_TIMEOUT (30s),
# ROLLOUT_WATCH (2s; empty leaves the key out), CONNECTIONS (32), CAP (540 s: how long
# to wait for the rollout and for the old workers). IGNORE_DRAIN=1 makes server.js leave
# lb's drain message unanswered; DRAIN_GRACE_MS=N makes it close idle connections N ms
# after the message (default 200; 0: at once), for lb's workers in either scenario.
# LOGS=DIR keeps lb's log and wrk's output there.
set -euo pipefail
export LC_ALL=C
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
lb="${LB:-$repo/target/release/lb}"
duration="${DURATION:-10}"
port="${PORT:-18480}"
admin=$((port + 1))
work="$(mktemp -d)"
lbpid=""
trap 'kill $lbpid $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

[ -x "$lb" ] || { echo "build lb first: cargo build --release" >&2; exit 1; }
command -v wrk >/dev/null || { echo "needs wrk: apt-get install wrk" >&2; exit 1; }

# $1: extra env line for the workers; $2: worker count; $3: drain_timeout;
# $4: rollout_watch (empty: no such line, for builds from before the key).
write_config() {
  cat > "$work/lb.yaml" <<YAML
admin: { listen: 127.0.0.1:$admin }
services:
  - name: app
    listen: 127.0.0.1:$port
    workers:
      command: ["node", "$here/server.js"]
      count: $2
      env: { $1 }
      drain_timeout: $3
      restart_backoff: { initial: 100ms, max: 1s }
YAML
  if [ -n "${4:-}" ]; then echo "      rollout_watch: $4" >> "$work/lb.yaml"; fi
}

# The workers' env entries that IGNORE_DRAIN and DRAIN_GRACE_MS ask for.
drain_env() {
  if [ -n "${IGNORE_DRAIN:-}" ]; then echo 'IGNORE_DRAIN: "1"'
  elif [ -n "${DRAIN_GRACE_MS:-}" ]; then echo "DRAIN_GRACE_MS: \"$DRAIN_GRACE_MS\""; fi
}

start_lb() { # $1: extra env line for the workers
  local env; env=$(drain_env)
  write_config "$1${1:+${env:+, }}$env" "${WORKERS:-2}" 5s ""
  "$lb" --config "$work/lb.yaml" > "$work/server.log" 2>&1 &
  echo $!
}

start_cluster() { # $1: CRASH_WITHIN_MS value or empty
  WORKERS="${WORKERS:-2}" PORT="$port" HOST=127.0.0.1 CRASH_WITHIN_MS="$1" node "$here/cluster.js" > "$work/server.log" 2>&1 &
  echo $!
}

wait_up() {
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$port/" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "server did not come up" >&2; cat "$work/server.log" >&2; exit 1
}

# Runs wrk for $duration s; if $1 is a pid, sends it SIGUSR2 after 3 s.
load() {
  local signal_pid="${1:-}"
  if [ -n "$signal_pid" ]; then (sleep 3; kill -USR2 "$signal_pid") & fi
  wrk -t2 -c32 -d"${duration}s" -H "Connection: close" "http://127.0.0.1:$port/" > "$work/wrk.txt" 2>&1 || true
}

# Failed requests: wrk's socket errors plus non-2xx responses. The line starts with
# blanks, so with this FS $1 is empty and the counts are fields 5, 7, 9 and 11.
failed() {
  local errors non2xx
  errors=$(awk -F'[ ,]+' '/Socket errors/ {print $5+$7+$9+$11}' "$work/wrk.txt")
  non2xx=$(awk '/Non-2xx/ {print $NF}' "$work/wrk.txt")
  echo $(( ${errors:-0} + ${non2xx:-0} ))
}

# Requests, failed requests, and crashes.
summary() {
  local total
  total=$(awk '/requests in/ {print $1}' "$work/wrk.txt")
  echo "${total:-0} | $(failed) | $(grep -c "worker exited" "$work/server.log" || true)"
}

# The server was started in a command substitution, so it is no child of ours to `wait`
# for: poll until it is gone, so the next run finds its ports free.
stop() {
  kill -TERM "$1" 2>/dev/null || true
  for _ in $(seq 300); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
}

restarts() {
  echo "| scenario | server | requests | failed | worker crashes |"
  echo "| --- | --- | --- | --- | --- |"
  local server pid
  for server in lb node-cluster; do
    if [ "$server" = lb ]; then pid=$(start_lb ""); else pid=$(start_cluster ""); fi
    wait_up; load "$pid"; echo "| rolling restart (SIGUSR2 at 3 s) | $server | $(summary) |"; stop "$pid"
    if [ "$server" = lb ]; then pid=$(start_lb 'CRASH_WITHIN_MS: "3000"'); else pid=$(start_cluster 3000); fi
    wait_up; load; echo "| random crashes (each worker within 3 s) | $server | $(summary) |"; stop "$pid"
  done
}

since() { # seconds from $1 to $2 (EPOCHREALTIME values)
  awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f s", b - a }'
}

alive() { # how many of the pids $@ still run
  local n=0 p
  for p in "$@"; do if kill -0 "$p" 2>/dev/null; then n=$((n + 1)); fi; done
  echo "$n"
}

# wrk counts a connection that the server closes as no error, even when a request was on
# it: it opens a new one and sends the next request. This script counts requests sent and
# answered, so such requests show up.
cat > "$work/count.lua" <<'LUA'
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) sent = 0; answered = 0 end
function request() sent = sent + 1; return wrk.format() end
function response(status, headers, body) answered = answered + 1 end
function done(summary, latency, requests)
  local s, a = 0, 0
  for _, t in ipairs(threads) do s = s + t:get("sent"); a = a + t:get("answered") end
  io.write(string.format("sent %d answered %d\n", s, a))
end
LUA

keepalive() {
  local count="${WORKERS:-16}" drain="${DRAIN_TIMEOUT:-30s}" watch="${ROLLOUT_WATCH-2s}"
  local conns="${CONNECTIONS:-32}" cap="${CAP:-540}"
  local build t0 t1 t2 took gone old left total sent answered unanswered wrkpid
  local handler="closes idle connections after ${DRAIN_GRACE_MS:-200} ms"
  if [ "${DRAIN_GRACE_MS:-}" = 0 ]; then handler="closes idle connections at once"; fi
  if [ -n "${IGNORE_DRAIN:-}" ]; then handler="ignores it (IGNORE_DRAIN=1)"; fi
  build=$(git -C "$(dirname "$lb")" rev-parse --short HEAD 2>/dev/null || echo "?")
  write_config "$(drain_env)" "$count" "$drain" "$watch"
  "$lb" --config "$work/lb.yaml" > "$work/server.log" 2>&1 &
  lbpid=$!
  wait_up
  for _ in $(seq 300); do
    [ "$(pgrep -P "$lbpid" -f server.js | wc -l)" -ge "$count" ] && break
    sleep 0.1
  done
  sleep 1
  mapfile -t old < <(pgrep -P "$lbpid" -f server.js)
  wrk -t2 -c"$conns" -d1h -s "$work/count.lua" "http://127.0.0.1:$port/" > "$work/wrk.txt" 2>&1 &
  wrkpid=$!
  sleep 3
  t0=$EPOCHREALTIME
  if timeout "$cap" "$lb" restart --admin "127.0.0.1:$admin" > /dev/null 2> "$work/restart.err"; then
    t1=$EPOCHREALTIME; took=$(since "$t0" "$t1")
  elif [ $? = 124 ]; then
    took="> $cap s, not finished ($(( ${#old[@]} - $(alive "${old[@]}") )) of ${#old[@]} old workers stopped by then)"
  else
    took="halted: $(head -c 100 "$work/restart.err")"
  fi
  gone="> $cap s"
  while awk -v a="$t0" -v b="$EPOCHREALTIME" -v c="$cap" 'BEGIN { exit !(b - a < c) }'; do
    left=$(alive "${old[@]}")
    if [ "$left" = 0 ]; then t2=$EPOCHREALTIME; gone=$(since "$t0" "$t2"); break; fi
    sleep 0.1
  done
  sleep 2
  kill -INT "$wrkpid"; wait "$wrkpid" || true
  kill -TERM "$lbpid" 2>/dev/null || true; wait "$lbpid" 2>/dev/null || true; lbpid=""
  total=$(awk '/requests in/ {print $1}' "$work/wrk.txt")
  read -r _ sent _ answered < <(grep '^sent' "$work/wrk.txt") || { sent=0; answered=0; }
  # Every connection has one request on its way when wrk stops (one that is opening a
  # new connection has none, hence the floor at 0).
  unanswered=$(( sent - answered - conns ))
  [ "$unanswered" -ge 0 ] || unanswered=0
  echo "wrk: $sent requests sent, $answered answered, $conns connections" >&2
  if [ -n "${LOGS:-}" ]; then mkdir -p "$LOGS"; cp "$work/server.log" "$work/wrk.txt" "$LOGS/"; fi
  echo "| $build | $count | $drain | ${watch:-(none)} | $handler | ${total:-0} | $(failed) | $unanswered | $took | $gone |"
}

case "${1:-all}" in
  restarts) restarts ;;
  keepalive|all)
    if [ "${1:-all}" = all ]; then restarts; echo; fi
    echo "| lb build | workers | drain_timeout | rollout_watch | server.js on the drain message | requests | failed | closed unanswered | \`lb restart\` took | old workers gone after |"
    echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    keepalive ;;
  *) echo "usage: $0 [all|restarts|keepalive]" >&2; exit 2 ;;
esac
