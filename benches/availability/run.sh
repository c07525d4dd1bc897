#!/usr/bin/env bash
# Failed requests during a rolling restart and during random worker crashes, under wrk
# load, for lb and for Node's cluster module (the tutorial's restart-on-exit and
# SIGUSR2 handlers). Prints a Markdown table.
#
#   cargo build --release && benches/availability/run.sh
#
# Needs node and wrk (apt-get install wrk). Every request opens a new connection
# ("Connection: close"), so a restart shows up as refused or reset connections rather
# than being hidden (or caused) by keep-alive connections pinned to an old worker.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
lb="$repo/target/release/lb"
workers="${WORKERS:-2}"
duration="${DURATION:-10}"
port="${PORT:-18480}"
work="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

[ -x "$lb" ] || { echo "build lb first: cargo build --release" >&2; exit 1; }
command -v wrk >/dev/null || { echo "needs wrk: apt-get install wrk" >&2; exit 1; }

start_lb() { # $1: extra env line for the workers
  cat > "$work/lb.yaml" <<YAML
services:
  - name: app
    listen: 127.0.0.1:$port
    workers:
      command: ["node", "$here/server.js"]
      count: $workers
      env: { $1 }
      drain_timeout: 5s
      restart_backoff: { initial: 100ms, max: 1s }
YAML
  "$lb" --config "$work/lb.yaml" > "$work/server.log" 2>&1 &
  echo $!
}

start_cluster() { # $1: CRASH_WITHIN_MS value or empty
  WORKERS="$workers" PORT="$port" HOST=127.0.0.1 CRASH_WITHIN_MS="$1" node "$here/cluster.js" > "$work/server.log" 2>&1 &
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

# Requests, failed requests (wrk's socket errors plus non-2xx responses), and crashes.
summary() {
  local total errors non2xx
  total=$(awk '/requests in/ {print $1}' "$work/wrk.txt")
  errors=$(awk -F'[ ,]+' '/Socket errors/ {print $4+$6+$8+$10}' "$work/wrk.txt")
  non2xx=$(awk '/Non-2xx/ {print $NF}' "$work/wrk.txt")
  echo "${total:-0} | $(( ${errors:-0} + ${non2xx:-0} )) | $(grep -c "worker exited" "$work/server.log" || true)"
}

# The server was started in a command substitution, so it is no child of ours to `wait`
# for: poll until it is gone, so the next run finds its ports free.
stop() {
  kill -TERM "$1" 2>/dev/null || true
  for _ in $(seq 300); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
}

echo "| scenario | server | requests | failed | worker crashes |"
echo "| --- | --- | --- | --- | --- |"
for server in lb node-cluster; do
  if [ "$server" = lb ]; then pid=$(start_lb ""); else pid=$(start_cluster ""); fi
  wait_up; load "$pid"; echo "| rolling restart (SIGUSR2 at 3 s) | $server | $(summary) |"; stop "$pid"
  if [ "$server" = lb ]; then pid=$(start_lb 'CRASH_WITHIN_MS: "3000"'); else pid=$(start_cluster 3000); fi
  wait_up; load; echo "| random crashes (each worker within 3 s) | $server | $(summary) |"; stop "$pid"
done
