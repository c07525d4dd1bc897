#!/usr/bin/env bash
# The Node.js cluster tutorial's experiments, with lb as the primary. Prints a Markdown
# table. Needs node, wrk (apt-get install wrk) and a release build of lb.
#
#   cargo build --release && examples/node-cluster/experiments.sh
#
# Like the tutorial's `ab -c200`, every request opens a new connection (Connection:
# close); 200 concurrent clients, 10 s per run.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
lb="$here/../../target/release/lb"
port="${PORT:-18780}"
admin=$((port + 1))
work="$(mktemp -d)"
pid=""
trap 'kill $pid 2>/dev/null || true; rm -rf "$work"' EXIT

run_lb() { # $1: extra env for the workers
  cat > "$work/lb.yaml" <<YAML
admin: { listen: 127.0.0.1:$admin }
services:
  - name: app
    listen: 127.0.0.1:$port
    workers:
      command: ["node", "$here/server.js"]
      count: auto
      ready: message
      env: { $1 }
      restart_backoff: { initial: 100ms, max: 1s }
      drain_timeout: 5s
YAML
  "$lb" --config "$work/lb.yaml" > "$work/lb.log" 2>&1 &
  pid=$!
}

wait_up() {
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/" >/dev/null 2>&1 && return; sleep 0.1; done
  echo "did not come up" >&2; exit 1
}

load() { # prints "requests/s | failed"
  wrk -t2 -c200 -d10s -H "Connection: close" "http://127.0.0.1:$port/" > "$work/wrk.txt" 2>&1 || true
  local rps errors non2xx
  rps=$(awk '/Requests\/sec/ {printf "%d", $2}' "$work/wrk.txt")
  errors=$(awk -F'[ ,]+' '/Socket errors/ {print $4+$6+$8+$10}' "$work/wrk.txt")
  non2xx=$(awk '/Non-2xx/ {print $NF}' "$work/wrk.txt")
  echo "${rps:-0} | $(( ${errors:-0} + ${non2xx:-0} ))"
}

stop() { kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; }

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
