#!/usr/bin/env bash
# What each balancing strategy, and a PROXY protocol header, costs a new connection: lb
# with round-robin, least-conn, random-two, source-hash, and round-robin with
# `proxy_protocol: v2`, in front of the same two nginx HTTP backends, under wrk with a new
# connection per request. RUNS rounds (default 3) with the variants interleaved in each;
# prints the median requests/s and p99 of each and its ratio to round-robin.
#
#   cargo build --release && benches/strategies/run.sh
#
# Needs wrk and nginx-light (Debian packages). The backends for the PROXY variant are the
# same nginx with `proxy_protocol` on their listen lines, so they parse the header.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
lb="$repo/target/release/lb"
duration="${DURATION:-5}"
connections="${CONNECTIONS:-32}"
runs="${RUNS:-3}"
base="${PORT:-18700}"
work="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

for tool in wrk nginx; do
  command -v "$tool" >/dev/null || { echo "needs $tool (apt-get install wrk nginx-light)" >&2; exit 1; }
done
[ -x "$lb" ] || { echo "build lb first: cargo build --release" >&2; exit 1; }

b1=$base; b2=$((base + 1)); pp1=$((base + 2)); pp2=$((base + 3)); listen=$((base + 4))
# nginx workers run as an unprivileged user: they must be able to read the page.
chmod 755 "$work"
mkdir -p "$work/www"
head -c 128 /dev/zero | tr '\0' 'x' > "$work/www/index.html"
cat > "$work/backend.conf" <<CONF
worker_processes 1;
pid $work/backend.pid;
error_log $work/backend.err;
events { worker_connections 4096; }
http {
  access_log off;
  server { listen 127.0.0.1:$b1; listen 127.0.0.1:$b2; root $work/www; }
  server { listen 127.0.0.1:$pp1 proxy_protocol; listen 127.0.0.1:$pp2 proxy_protocol; root $work/www; }
}
CONF
nginx -c "$work/backend.conf" -g "daemon off;" & pids+=($!)

variants=(round-robin least-conn random-two source-hash proxy-v2)

# Starts lb for a variant, runs wrk against it, stops it; prints "requests/s p99".
measure() {
  local variant=$1 balance=$1 backends="[127.0.0.1:$b1, 127.0.0.1:$b2]" extra=""
  if [ "$variant" = proxy-v2 ]; then
    balance=round-robin backends="[127.0.0.1:$pp1, 127.0.0.1:$pp2]" extra="    proxy_protocol: v2"
  fi
  cat > "$work/lb.yaml" <<YAML
admin: { listen: null }
services:
  - name: bench
    listen: 127.0.0.1:$listen
    balance: $balance
    backends: $backends
$extra
YAML
  "$lb" --config "$work/lb.yaml" 2> "$work/lb.log" & local pid=$!
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$listen/" >/dev/null 2>&1 && break; sleep 0.05; done
  wrk -t2 -c"$connections" -d"${duration}s" --latency -H "Connection: close" "http://127.0.0.1:$listen/" > "$work/wrk.txt" 2>&1 || true
  kill "$pid"; wait "$pid" 2>/dev/null || true
  local rps p99 failed
  rps=$(awk '/Requests\/sec/ {print int($2)}' "$work/wrk.txt")
  p99=$(awk '$1 == "99%" {print $2}' "$work/wrk.txt")
  # A variant whose requests fail (a backend refusing the PROXY header) must not pass for fast.
  failed=$(awk -F'[ ,]+' '/Socket errors/ {n += $5 + $7 + $9 + $11} /Non-2xx/ {n += $NF} END {print n + 0}' "$work/wrk.txt")
  [ "$failed" = 0 ] || { echo "$variant: $failed failed requests" >&2; cat "$work/wrk.txt" >&2; exit 1; }
  echo "${rps:-0} ${p99:--}"
}

for round in $(seq "$runs"); do
  for v in "${variants[@]}"; do
    read -r rps p99 < <(measure "$v")
    echo "$v $rps $p99" >> "$work/results"
    echo "round $round: $v $rps req/s, p99 $p99" >&2
  done
done

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
rr=$(awk '$1 == "round-robin" {print $2}' "$work/results" | median)
echo "| variant | requests/s (median of $runs) | ratio to round-robin | p99 (each round) |"
echo "| --- | ---: | ---: | --- |"
for v in "${variants[@]}"; do
  m=$(awk -v v="$v" '$1 == v {print $2}' "$work/results" | median)
  p=$(awk -v v="$v" '$1 == v {print $3}' "$work/results" | paste -sd' ')
  echo "| $v | $m | $(awk -v m="$m" -v r="$rr" 'BEGIN {printf "%.2f", m / r}') | $p |"
done
