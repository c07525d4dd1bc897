#!/usr/bin/env bash
# The Node.js cluster tutorial's experiments, with lb as the primary, and what the drain
# message does under keep-alive clients. Prints Markdown tables. Needs node, wrk
# (apt-get install wrk) and a release build of lb.
#
#   cargo build --release && examples/node-cluster/experiments.sh [tutorial|keepalive]
#   LB=path/to/lb examples/node-cluster/experiments.sh keepalive     # another build of lb
#
# tutorial: like the tutorial's `ab -c200`, every request opens a new connection
# (Connection: close); 200 concurrent clients, 10 s per run.
# keepalive: 4 workers with drain_timeout 30s, 40 keep-alive clients (keepalive-load.js,
# one request per client every 100 ms); a rolling restart, then a stop (SIGTERM), with
# server.js answering the drain message and with IGNORE_DRAIN=1. About 3 minutes.
set -euo pipefail
export LC_ALL=C
here="$(cd "$(dirname "$0")" && pwd)"
lb="${LB:-$here/../../target/release/lb}"
port="${PORT:-18780}"
admin=$((port + 1))
work="$(mktemp -d)"
pid=""
loadpid=""
trap 'kill $pid $loadpid 2>/dev/null || true; rm -rf "$work"' EXIT

run_lb() { # $1: env for the workers (flow-map entries); $2: count; $3: drain_timeout;
           # $4: rollout_watch
  cat > "$work/lb.yaml" <<YAML
admin: { listen: 127.0.0.1:$admin }
services:
  - name: app
    listen: 127.0.0.1:$port
    workers:
      command: ["node", "$here/server.js"]
      count: ${2:-auto}
      ready: message
      env: { $1 }
      restart_backoff: { initial: 100ms, max: 1s }
      drain_timeout: ${3:-5s}
      rollout_watch: ${4:-10s}
YAML
  "$lb" --config "$work/lb.yaml" > "$work/lb.log" 2>&1 &
  pid=$!
}

wait_up() {
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/" >/dev/null 2>&1 && return; sleep 0.1; done
  echo "did not come up" >&2; exit 1
}

wait_ready() { # $1: how many workers must be ready
  local n=0
  for _ in $(seq 300); do
    n=$("$lb" status --json --admin "127.0.0.1:$admin" 2>/dev/null | grep -o '"state": *"ready"' | wc -l || true)
    [ "$n" -ge "$1" ] && return
    sleep 0.1
  done
  echo "only $n of $1 workers ready" >&2; exit 1
}

wait_gone() { # $@: pids; fails if one still runs after 60 s
  for _ in $(seq 600); do
    local alive=0 p
    for p in "$@"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && return 0
    sleep 0.1
  done
  return 1
}

since() { # seconds from $1 to $2 (EPOCHREALTIME values)
  awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f s", b - a }'
}

load() { # prints "requests/s | failed"
  wrk -t2 -c200 -d10s -H "Connection: close" "http://127.0.0.1:$port/" > "$work/wrk.txt" 2>&1 || true
  local rps errors non2xx
  rps=$(awk '/Requests\/sec/ {printf "%d", $2}' "$work/wrk.txt")
  errors=$(awk -F'[ ,]+' '/Socket errors/ {print $5+$7+$9+$11}' "$work/wrk.txt")  # $1 is empty
  non2xx=$(awk '/Non-2xx/ {print $NF}' "$work/wrk.txt")
  echo "${rps:-0} | $(( ${errors:-0} + ${non2xx:-0} ))"
}

stop() { kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; }

tutorial() {
  echo "| experiment | requests/s | failed requests |"
  echo "| --- | --- | --- |"
  PORT=$port HOST=127.0.0.1 node "$here/server.js" > /dev/null 2>&1 &
  pid=$!
  wait_up; echo "| one process (node server.js) | $(load) |"; stop

  run_lb ""
  wait_up; echo "| lb, one worker per CPU ($(nproc)) | $(load) |"; stop

  run_lb 'CRASH_RANDOMLY: "1"'
  wait_up; echo "| lb, workers crashing at random (within 10 s each) | $(load) |"
  crashes=$(grep -c "worker exited" "$work/lb.log" || true); stop
  echo "|   (worker crashes during the run: $crashes) | | |"

  run_lb ""
  wait_up; (sleep 3; kill -USR2 "$pid") & echo "| lb, rolling restart (SIGUSR2) during the run | $(load) |"
  rollouts=$(grep -c "rollout finished" "$work/lb.log" || true); stop
  echo "|   (rollouts finished during the run: $rollouts) | | |"
}

keepalive_run() { # $1: label; $2: extra env for the workers (flow-map entries)
  run_lb "WORK: \"100000\"${2:+, $2}" 4 30s 2s
  wait_ready 4
  local old t0 t1 t2 t3 t4 restart gone ok failed
  old=$(pgrep -P "$pid" -f server.js || true)
  # The rollout: 45 s of load, lb restart after 3 s.
  node "$here/keepalive-load.js" "$port" 40 100 45 > "$work/load.txt" &
  loadpid=$!
  sleep 3
  t0=$EPOCHREALTIME
  if "$lb" restart --admin "127.0.0.1:$admin" > /dev/null 2> "$work/restart.err"; then
    t1=$EPOCHREALTIME; restart=$(since "$t0" "$t1")
  else
    restart="halted: $(head -c 100 "$work/restart.err")"
  fi
  # shellcheck disable=SC2086 # one pid per word
  if wait_gone $old; then t2=$EPOCHREALTIME; gone=$(since "$t0" "$t2"); else gone="> 60 s"; fi
  wait "$loadpid" || true; loadpid=""
  read -r ok failed < "$work/load.txt" || { ok="?"; failed="?"; }
  # The stop: SIGTERM 3 s into a fresh load.
  node "$here/keepalive-load.js" "$port" 40 100 120 > /dev/null &
  loadpid=$!
  sleep 3
  t3=$EPOCHREALTIME; stop; t4=$EPOCHREALTIME
  kill "$loadpid" 2>/dev/null || true; wait "$loadpid" 2>/dev/null || true; loadpid=""
  echo "| $1 | $restart | $gone | $ok | $failed | $(since "$t3" "$t4") |"
}

keepalive() {
  echo "| drain message | \`lb restart\` took | old workers gone after | requests answered | failed | SIGTERM stop took |"
  echo "| --- | --- | --- | --- | --- | --- |"
  keepalive_run "answered (server.close, closeIdleConnections)" ""
  keepalive_run "ignored (IGNORE_DRAIN=1)" 'IGNORE_DRAIN: "1"'
}

case "${1:-all}" in
  tutorial) tutorial ;;
  keepalive) keepalive ;;
  all) tutorial; echo; keepalive ;;
  *) echo "usage: $0 [tutorial|keepalive]" >&2; exit 2 ;;
esac
