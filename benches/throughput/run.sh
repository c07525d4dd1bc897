#!/usr/bin/env bash
# Throughput of lb beside HAProxy (mode tcp) and nginx (stream), and a direct connection,
# on the same two nginx HTTP backends, under wrk. Prints a Markdown table of requests/s,
# p99 latency and the ratio to the direct connection.
#
#   cargo build --release && benches/throughput/run.sh
#
# Needs wrk, haproxy, nginx-light and libnginx-mod-stream (Debian packages). Each peer
# is set up as its own documentation recommends for plain TCP balancing: HAProxy with
# `mode tcp`, `balance roundrobin` and one thread per core (its default); nginx with
# `worker_processes auto` and a `stream` upstream; lb with its defaults. Two runs per
# peer: keep-alive (the copy path) and a new connection per request (accept + connect).
# LB_BASELINE=/path/to/another/lb adds a column for a second lb build (before/after).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
lb="$repo/target/release/lb"
duration="${DURATION:-10}"
connections="${CONNECTIONS:-64}"
base="${PORT:-18600}"
work="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

for tool in wrk haproxy nginx; do
  command -v "$tool" >/dev/null || { echo "needs $tool (apt-get install wrk haproxy nginx-light libnginx-mod-stream)" >&2; exit 1; }
done
[ -x "$lb" ] || { echo "build lb first: cargo build --release" >&2; exit 1; }
stream_module=$(ls /usr/lib/nginx/modules/ngx_stream_module.so 2>/dev/null || true)
[ -n "$stream_module" ] || { echo "needs libnginx-mod-stream" >&2; exit 1; }

b1=$base; b2=$((base + 1)); p_lb=$((base + 2)); p_haproxy=$((base + 3)); p_nginx=$((base + 4)); p_base=$((base + 5)); admin=$((base + 6))

# The backends: one nginx serving a 128-byte body on two ports.
mkdir -p "$work/backend"
head -c 128 /dev/zero | tr '\0' 'x' > "$work/backend/index.html"
cat > "$work/backend.conf" <<CONF
worker_processes 1;
pid $work/backend.pid;
error_log $work/backend.err;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$b1 reuseport; listen 127.0.0.1:$b2 reuseport; root $work/backend; }
}
CONF
nginx -c "$work/backend.conf" -g "daemon off;" & pids+=($!)

cat > "$work/haproxy.cfg" <<CONF
global
  maxconn 8000
defaults
  mode tcp
  timeout connect 2s
  timeout client 1h
  timeout server 1h
frontend fe
  bind 127.0.0.1:$p_haproxy
  default_backend be
backend be
  balance roundrobin
  server b1 127.0.0.1:$b1
  server b2 127.0.0.1:$b2
CONF
haproxy -f "$work/haproxy.cfg" -db & pids+=($!)

cat > "$work/nginx-stream.conf" <<CONF
load_module $stream_module;
worker_processes auto;
pid $work/stream.pid;
error_log $work/stream.err;
events { worker_connections 20000; }
stream {
  upstream be { server 127.0.0.1:$b1; server 127.0.0.1:$b2; }
  server { listen 127.0.0.1:$p_nginx reuseport; proxy_pass be; proxy_connect_timeout 2s; }
}
CONF
nginx -c "$work/nginx-stream.conf" -g "daemon off;" & pids+=($!)

lb_config() { # $1 listen port, $2 admin line
  cat <<CONF
$2
services:
  - name: bench
    listen: 127.0.0.1:$1
    backends: ["127.0.0.1:$b1", "127.0.0.1:$b2"]
CONF
}
lb_config "$p_lb" "admin: { listen: 127.0.0.1:$admin }" > "$work/lb.yaml"
"$lb" --config "$work/lb.yaml" 2> "$work/lb.log" & pids+=($!)
peers=("direct:$b1" "lb:$p_lb" "haproxy:$p_haproxy" "nginx-stream:$p_nginx")
if [ -n "${LB_BASELINE:-}" ]; then
  # No admin section: a baseline from before the admin API would refuse one.
  lb_config "$p_base" "" > "$work/lb-base.yaml"
  "$LB_BASELINE" --config "$work/lb-base.yaml" 2> "$work/lb-base.log" & pids+=($!)
  peers+=("lb-baseline:$p_base")
fi

for peer in "${peers[@]}"; do
  port=${peer#*:}
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/" >/dev/null 2>&1 && break; sleep 0.1; done
done

# requests/s and p99 from one wrk run
measure() { # $1 port, $2 "close" for a new connection per request
  local header=()
  [ "$2" = close ] && header=(-H "Connection: close")
  wrk -t2 -c"$connections" -d"${duration}s" --latency "${header[@]}" "http://127.0.0.1:$1/" > "$work/wrk.txt" 2>&1 || true
  local rps p99 errors
  rps=$(awk '/Requests\/sec/ {printf "%d", $2}' "$work/wrk.txt")
  p99=$(awk '$1 == "99%" {print $2}' "$work/wrk.txt")
  errors=$(awk -F'[ ,]+' '/Socket errors/ {print $4+$6+$8+$10}' "$work/wrk.txt")
  echo "${rps:-0} ${p99:-?} ${errors:-0}"
}

echo "| load | peer | requests/s | vs direct | p99 latency | socket errors |"
echo "| --- | --- | --- | --- | --- | --- |"
for mode in keep-alive new-connection; do
  args=""; [ "$mode" = new-connection ] && args="close"
  direct=0
  for peer in "${peers[@]}"; do
    name=${peer%%:*}; port=${peer#*:}
    read -r rps p99 errors < <(measure "$port" "$args")
    [ "$name" = direct ] && direct=$rps
    ratio=$(awk -v a="$rps" -v b="$direct" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')
    echo "| $mode | $name | $rps | $ratio | $p99 | $errors |"
  done
done
