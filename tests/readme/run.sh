#!/usr/bin/env bash
# The commands README.md and examples/shared-state/README.md show, run as written on a
# machine with nothing else listening (CI runs this after the test suite): lb installed
# with `cargo install --path .`, each example started as its README says, asked, and
# stopped with SIGTERM, which must exit 0.
set -euo pipefail
cd "$(dirname "$0")/../.."

step() { echo "[readme] $*"; }
fail() { echo "README command FAILED: $*" >&2; exit 1; }

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

# Polls `curl URL` until it answers, for up to 30 s; prints the answer.
ask() {
  local url=$1 deadline=$((SECONDS + 30)) out
  until out="$(curl -fsS --max-time 2 "$url" 2>/dev/null)"; do
    [ $SECONDS -lt $deadline ] || fail "no answer from $url"
    sleep 0.1
  done
  echo "$out"
}

# Stops the lb started last with SIGTERM and checks that it exits 0 within 30 s.
stop_last() {
  local pid=${pids[-1]} deadline=$((SECONDS + 30))
  kill -TERM "$pid"
  while kill -0 "$pid" 2>/dev/null; do
    [ $SECONDS -lt $deadline ] || fail "lb (pid $pid) did not stop"
    sleep 0.1
  done
  wait "$pid" || fail "lb (pid $pid) exited with $?"
  unset 'pids[-1]'
}

step "cargo install --path ."
cargo install --quiet --path .
export PATH="$HOME/.cargo/bin:$PATH"
lb --version

# README: the first thing to try, without a config file.
command=$(grep -m1 '^lb run --listen' README.md | sed 's/ *#.*//')
step "$command"
$command &
pids+=($!)
answer=$(ask http://127.0.0.1:8080/)
case "$answer" in "hello from worker"*) ;; *) fail "lb run answered: $answer" ;; esac
lb status
stop_last

# examples/shared-state: workers counting visits in one Redis that lb runs too.
command=$(grep -m1 '^lb --config examples/shared-state/lb.yaml' examples/shared-state/README.md)
step "$command"
$command &
pids+=($!)
first=$(ask http://127.0.0.1:8082/)
second=$(ask http://127.0.0.1:8082/)
echo "$first / $second"
[[ $first == visits=1\ * && $second == visits=2\ * ]] || fail "shared-state counted: $first, $second"
stop_last
step "README commands passed"
