#!/usr/bin/env bash
# Throughput of lb beside HAProxy (mode tcp) and nginx (stream), and a direct connection,
# on the same two nginx HTTP backends, under wrk. Prints a Markdown table of requests/s,
# p99 latency and the ratio to the direct connection.
#
# Then resident memory per idle proxied connection: each proxy, freshly started, carries
# IDLE_COUNTS connections (default 5000 and 9900) to an echo backend, each with 64 KiB
# each way, and holds them idle; the growth of its resident memory (VmRSS, all of its
# processes) since before the connections, divided by their count. RUNS rounds (default
# 3), the proxies interleaved within each; prints every measurement, then medians and
# ratios. 10,000 connections need more than 20,000 descriptors in the proxy; raise
# `ulimit -n` (or IDLE_COUNTS) where the hard limit allows.
#
#   cargo build --release && benches/throughput/run.sh
#   PARTS=memory benches/throughput/run.sh      # only one of: throughput, memory
#
# Needs wrk, haproxy, nginx-light, libnginx-mod-stream (Debian packages) and python3. Each peer
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
parts="${PARTS:-throughput memory}"
idle_counts="${IDLE_COUNTS:-5000 9900}"
runs="${RUNS:-3}"
work="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

for tool in wrk haproxy nginx python3; do
  command -v "$tool" >/dev/null || { echo "needs $tool (apt-get install wrk haproxy nginx-light libnginx-mod-stream)" >&2; exit 1; }
done
[ -x "$lb" ] || { echo "build lb first: cargo build --release" >&2; exit 1; }
stream_module=$(ls /usr/lib/nginx/modules/ngx_stream_module.so 2>/dev/null || true)
[ -n "$stream_module" ] || { echo "needs libnginx-mod-stream" >&2; exit 1; }

b1=$base; b2=$((base + 1)); p_lb=$((base + 2)); p_haproxy=$((base + 3)); p_nginx=$((base + 4)); p_base=$((base + 5)); admin=$((base + 6))

# Requests/s and p99 under wrk, every peer started once.
throughput() {
# The backends: one nginx serving a 128-byte body on two ports. Its workers run as an
# unprivileged user, so they must be able to enter the (mktemp, 0700) work folder.
chmod 755 "$work"
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
  errors=$(awk -F'[ ,]+' '/Socket errors/ {n += $5+$7+$9+$11} /Non-2xx/ {n += $NF} END {print n + 0}' "$work/wrk.txt")
  echo "${rps:-0} ${p99:-?} ${errors:-0}"
}

echo "| load | peer | requests/s | vs direct | p99 latency | failed requests |"
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
# The memory part starts its own proxies, fresh for each measurement.
for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
pids=()
}

# Resident memory of a process and its children, in kB.
rss_kb() { # $1 pid
  local total=0 pid
  for pid in "$1" $(pgrep -P "$1" || true); do
    total=$((total + $(awk '/^VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)))
  done
  echo "$total"
}

# Starts one proxy on $p_mem in front of the echo backend; prints its pid (its output goes
# elsewhere, or the command substitution that reads the pid would wait for it to exit).
start_proxy() { # $1 peer name
  case "$1" in
    lb|lb-baseline)
      local bin="$lb"; [ "$1" = lb-baseline ] && bin="$LB_BASELINE"
      # As in the throughput part, no admin section for a baseline from before the admin API.
      [ "$1" = lb ] && echo "admin: { listen: 127.0.0.1:$admin }" > "$work/lb-idle.yaml"
      [ "$1" = lb-baseline ] && : > "$work/lb-idle.yaml"
      printf 'services:\n  - name: idle\n    listen: 127.0.0.1:%s\n    max_connections: 20000\n    backends: ["127.0.0.1:%s"]\n' \
        "$p_mem" "$b_echo" >> "$work/lb-idle.yaml"
      "$bin" --config "$work/lb-idle.yaml" > /dev/null 2> "$work/lb-idle.log" &
      ;;
    haproxy)
      # maxconn as high as 20,000 descriptors allow (HAProxy refuses 10000 under that limit).
      cat > "$work/haproxy-idle.cfg" <<CONF
global
  maxconn 9990
defaults
  mode tcp
  timeout connect 2s
  timeout client 1h
  timeout server 1h
frontend fe
  bind 127.0.0.1:$p_mem
  default_backend be
backend be
  server echo 127.0.0.1:$b_echo
CONF
      haproxy -f "$work/haproxy-idle.cfg" -db > /dev/null 2>&1 &
      ;;
    nginx-stream)
      cat > "$work/nginx-idle.conf" <<CONF
load_module $stream_module;
worker_processes auto;
pid $work/idle.pid;
error_log $work/idle.err;
events { worker_connections 20000; }
stream {
  server { listen 127.0.0.1:$p_mem reuseport; proxy_pass 127.0.0.1:$b_echo; proxy_connect_timeout 2s; proxy_timeout 1h; }
}
CONF
      nginx -c "$work/nginx-idle.conf" -g "daemon off;" > /dev/null 2>&1 &
      ;;
  esac
  echo $!
}

# One measurement: a fresh proxy, one warm-up connection, then COUNT connections that
# each carry 64 KiB each way and stay open; prints bytes of resident memory per connection.
idle_memory() { # $1 peer, $2 count
  local pid before after holder
  pid=$(start_proxy "$1")
  for _ in $(seq 100); do
    python3 "$here/idle.py" hold "$p_mem" 1 65536 < /dev/null > /dev/null 2>&1 && break
    sleep 0.1
  done
  sleep 0.5
  before=$(rss_kb "$pid")
  rm -f "$work/hold.fifo" "$work/hold.out"; mkfifo "$work/hold.fifo"
  python3 "$here/idle.py" hold "$p_mem" "$2" 65536 < "$work/hold.fifo" > "$work/hold.out" &
  holder=$!
  exec 7> "$work/hold.fifo"
  for _ in $(seq 1200); do grep -q idle "$work/hold.out" 2>/dev/null && break; kill -0 "$holder" 2>/dev/null || break; sleep 0.1; done
  sleep 1
  after=$(rss_kb "$pid")
  grep -q idle "$work/hold.out" || after=""
  exec 7>&-
  wait "$holder" 2>/dev/null || true
  kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true
  sleep 1
  if [ -n "$after" ]; then echo $(( (after - before) * 1024 / $2 )); else echo "failed"; fi
}

memory() {
  b_echo=$((base + 7)); p_mem=$((base + 8))
  python3 "$here/idle.py" echo "$b_echo" & pids+=($!)
  local names=(lb haproxy nginx-stream)
  [ -n "${LB_BASELINE:-}" ] && names+=(lb-baseline)
  echo
  echo "| run | connections | peer | resident bytes per idle connection |"
  echo "| --- | --- | --- | --- |"
  for run in $(seq "$runs"); do
    for count in $idle_counts; do
      for name in "${names[@]}"; do
        per=$(idle_memory "$name" "$count")
        echo "| $run | $count | $name | $per |"
        echo "$count $name $per" >> "$work/memory.txt"
      done
    done
  done
  echo
  local extra="" rule=""
  [ -n "${LB_BASELINE:-}" ] && extra=" lb-baseline |" && rule=" --- |"
  echo "| connections (medians, bytes) | lb | HAProxy | nginx stream | lb ÷ HAProxy | lb ÷ nginx |$extra"
  echo "| --- | --- | --- | --- | --- | --- |$rule"
  median() { # $1 count, $2 peer
    awk -v c="$1" -v n="$2" '$1 == c && $2 == n && $3 != "failed" {print $3}' "$work/memory.txt" |
      sort -n | awk '{v[NR] = $1} END {if (NR) print v[int((NR + 1) / 2)]; else print "-"}'
  }
  ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }
  for count in $idle_counts; do
    l=$(median "$count" lb); h=$(median "$count" haproxy); n=$(median "$count" nginx-stream)
    extra=""; [ -n "${LB_BASELINE:-}" ] && extra=" $(median "$count" lb-baseline) |"
    echo "| $count | $l | $h | $n | $(ratio "$l" "$h") | $(ratio "$l" "$n") |$extra"
  done
}

case " $parts " in *" throughput "*) throughput ;; esac
case " $parts " in *" memory "*) memory ;; esac
