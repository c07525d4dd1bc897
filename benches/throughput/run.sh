#!/usr/bin/env bash
# lb beside HAProxy (mode tcp), nginx (stream) and a direct connection, on the same nginx
# HTTP backends; prints every row of issue 10's table as medians and ratios.
#
#   cargo build --release && benches/throughput/run.sh
#   PARTS=memory benches/throughput/run.sh     # any of: throughput memory syscalls packets profile
#   LB_BASELINE=/path/to/older/lb benches/throughput/run.sh   # adds a column (before/after)
#
# throughput: RUNS rounds (default 3); in each, every workload runs against every peer in
# turn (interleaved, so a slow moment of the shared machine hits every peer alike; each
# round starts with the next peer):
#   keep-alive    wrk -t2 -cCONNECTIONS (64), a 128-byte page, DURATION s (default 8)
#   new-conn      the same with `Connection: close`: a new connection per request
#   ab            ab -c CONNECTIONS: a new connection per request, one client thread
#   bulk          wrk -t1 -c1 fetching a 64 MiB file over one keep-alive connection
# Each run reads the proxy's CPU time (user + system, /proc/PID/stat, all of its threads
# and processes) before and after: proxy CPU per request, and per GB for bulk. p99 is
# wrk's (ab's for ab). Failed requests (socket errors, non-2xx) are printed; they should
# be 0.
# The summary gives each peer's median over the rounds, lb ÷ HAProxy of the medians, and
# the lowest and highest lb ÷ HAProxy of single rounds.
#
# memory: resident memory per idle proxied connection. Each proxy, freshly started,
# carries IDLE_COUNTS connections (default 5000 and 9900) to an echo backend, each with
# 64 KiB each way, and holds them idle; the growth of its resident memory (VmRSS, all of
# its processes) since before the connections, divided by their count. 10,000 connections
# need more than 20,000 descriptors in the proxy; raise `ulimit -n` (or IDLE_COUNTS) where
# the hard limit allows.
#
# syscalls: system calls per request, `strace -c -f` on each proxy during wrk -t1 -c16
# -d5s, keep-alive and new connection (strace slows the proxy: counts, not speed).
#
# profile: where each proxy's CPU goes, perf record during one keep-alive and one
# new-connection run: the kernel's share, and CPU per request inside each system call.
#
# packets: TCP segments per request on the whole machine (nstat), keep-alive and new
# connection, wrk -t2 -cCONNECTIONS for 3 s against each peer and a direct connection.
#
# Needs wrk, ab (apache2-utils), haproxy, nginx-light, libnginx-mod-stream (Debian
# packages), python3, strace for the syscalls part, nstat (iproute2) for the packets part and
# perf (linux-perf; as root, or with kernel.perf_event_paranoid ≤ 1 and kernel symbols
# visible) for the profile part. Each peer is tuned as its own documentation recommends for
# plain TCP balancing on this machine: HAProxy with `mode tcp`, one thread per CPU (its
# default) and `option splice-auto`; nginx with `worker_processes auto` and a `stream`
# upstream; lb with its defaults (`threads: auto`). THREADS=N gives each proxy N threads
# (HAProxy `nbthread`, nginx `worker_processes`, lb `threads`), to compare them at the same
# count other than one per CPU.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
lb="$repo/target/release/lb"
duration="${DURATION:-8}"
connections="${CONNECTIONS:-64}"
base="${PORT:-18600}"
parts="${PARTS:-throughput memory}"
idle_counts="${IDLE_COUNTS:-5000 9900}"
runs="${RUNS:-3}"
threads="${THREADS:-}"
work="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

for tool in wrk ab haproxy nginx python3; do
  command -v "$tool" >/dev/null || { echo "needs $tool (apt-get install wrk apache2-utils haproxy nginx-light libnginx-mod-stream)" >&2; exit 1; }
done
[ -x "$lb" ] || { echo "build lb first: cargo build --release" >&2; exit 1; }
stream_module=$(ls /usr/lib/nginx/modules/ngx_stream_module.so 2>/dev/null || true)
[ -n "$stream_module" ] || { echo "needs libnginx-mod-stream" >&2; exit 1; }

b1=$base; b2=$((base + 1)); p_lb=$((base + 2)); p_haproxy=$((base + 3)); p_nginx=$((base + 4)); p_base=$((base + 5)); admin=$((base + 6))

# A process and its children (nginx's workers), one PID a line.
tree() { echo "$1"; pgrep -P "$1" || true; }

# The sum, over a process and its children, of what awk program $3 prints from their
# /proc/PID/$2 (0 for a process that is gone).
tree_sum() { # $1 pid, $2 file under /proc/PID, $3 awk program
  local total=0 pid
  for pid in $(tree "$1"); do
    total=$((total + $(awk "$3" "/proc/$pid/$2" 2>/dev/null || echo 0)))
  done
  echo "$total"
}

# CPU time (user + system) of a process and its children, in clock ticks.
cpu_ticks() { tree_sum "$1" stat '{print $14 + $15}'; }

# wrk's latency (850.00us, 1.25ms, 2.05s) in ms.
to_ms() { awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n += 0; else if (v ~ /s$/) n *= 1000; printf "%.2f", n }'; }
# wrk's amount read (8.75GB) in bytes.
to_bytes() { awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /KB$/) n *= 1024; else if (v ~ /MB$/) n *= 1048576; else if (v ~ /GB$/) n *= 1073741824; else if (v ~ /TB$/) n *= 1099511627776; printf "%.0f", n }'; }

# Starts the backends and every peer: their pids in peer_pid, ports in peer_port.
declare -A peer_pid peer_port
start_peers() {
  # The backends: one nginx serving a 128-byte page and a 64 MiB file on two ports. Its
  # workers run as an unprivileged user, so they must be able to enter the (mktemp,
  # 0700) work folder.
  chmod 755 "$work"
  mkdir -p "$work/backend"
  head -c 128 /dev/zero | tr '\0' 'x' > "$work/backend/index.html"
  head -c 64M /dev/zero > "$work/backend/big"
  chmod -R a+rX "$work/backend"
  cat > "$work/backend.conf" <<CONF
worker_processes 1;
pid $work/backend.pid;
error_log $work/backend.err;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  sendfile on;
  server { listen 127.0.0.1:$b1 reuseport; listen 127.0.0.1:$b2 reuseport; root $work/backend; }
}
CONF
  nginx -c "$work/backend.conf" -g "daemon off;" & pids+=($!)

  # maxconn: what 20,000 descriptors allow with splice's pipes (a quarter of maxconn).
  cat > "$work/haproxy.cfg" <<CONF
global
  maxconn 4000
  nbthread ${threads:-$(nproc)}
defaults
  mode tcp
  option splice-auto
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
  haproxy -f "$work/haproxy.cfg" -db & peer_pid[haproxy]=$!; pids+=($!)

  cat > "$work/nginx-stream.conf" <<CONF
load_module $stream_module;
worker_processes ${threads:-auto};
pid $work/stream.pid;
error_log $work/stream.err;
events { worker_connections 20000; }
stream {
  upstream be { server 127.0.0.1:$b1; server 127.0.0.1:$b2; }
  server { listen 127.0.0.1:$p_nginx reuseport; proxy_pass be; proxy_connect_timeout 2s; }
}
CONF
  nginx -c "$work/nginx-stream.conf" -g "daemon off;" & peer_pid[nginx-stream]=$!; pids+=($!)

  lb_config() { # $1 listen port, $2 admin line
    cat <<CONF
$2
${threads:+threads: $threads}
services:
  - name: bench
    listen: 127.0.0.1:$1
    backends: ["127.0.0.1:$b1", "127.0.0.1:$b2"]
CONF
  }
  lb_config "$p_lb" "admin: { listen: 127.0.0.1:$admin }" > "$work/lb.yaml"
  "$lb" --config "$work/lb.yaml" 2> "$work/lb.log" & peer_pid[lb]=$!; pids+=($!)
  peer_port=([direct]=$b1 [lb]=$p_lb [haproxy]=$p_haproxy [nginx-stream]=$p_nginx)
  peers=(direct lb haproxy nginx-stream)
  if [ -n "${LB_BASELINE:-}" ]; then
    # No admin section: a baseline from before the admin API would refuse one.
    lb_config "$p_base" "" > "$work/lb-base.yaml"
    "$LB_BASELINE" --config "$work/lb-base.yaml" 2> "$work/lb-base.log" & peer_pid[lb-baseline]=$!; pids+=($!)
    peer_port[lb-baseline]=$p_base
    peers+=(lb-baseline)
  fi
  for peer in "${peers[@]}"; do
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:${peer_port[$peer]}/" >/dev/null 2>&1 && break; sleep 0.1; done
  done
}

stop_peers() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  pids=()
}

# One run of one workload against one peer; prints "rate p99 cpu failed": requests/s,
# p99 in ms and µs of proxy CPU per request, or for bulk Gbit/s, "-" and proxy CPU
# seconds per GB. "-" for the CPU of a direct connection (no proxy).
measure() { # $1 workload, $2 peer
  local port=${peer_port[$2]} pid=${peer_pid[$2]:-} before=0 after=0 hz
  hz=$(getconf CLK_TCK)
  [ -n "$pid" ] && before=$(cpu_ticks "$pid")
  case "$1" in
    keep-alive) wrk -t2 -c"$connections" -d"${duration}s" --latency "http://127.0.0.1:$port/" > "$work/out.txt" 2>&1 || true ;;
    new-conn) wrk -t2 -c"$connections" -d"${duration}s" --latency -H "Connection: close" "http://127.0.0.1:$port/" > "$work/out.txt" 2>&1 || true ;;
    ab) ab -q -c "$connections" -t "$duration" -n 10000000 "http://127.0.0.1:$port/" > "$work/out.txt" 2>&1 || true ;;
    bulk) wrk -t1 -c1 -d"${duration}s" "http://127.0.0.1:$port/big" > "$work/out.txt" 2>&1 || true ;;
  esac
  [ -n "$pid" ] && after=$(cpu_ticks "$pid")
  local ticks=$((after - before)) rate p99 units failed
  if [ "$1" = ab ]; then
    rate=$(awk '/^Requests per second/ {printf "%d", $4}' "$work/out.txt")
    p99=$(awk '$1 == "99%" {printf "%.2f", $2}' "$work/out.txt")
    units=$(awk '/^Complete requests/ {print $3}' "$work/out.txt")
    failed=$(awk '/^Failed requests/ {n += $3} /^Non-2xx/ {n += $3} END {print n + 0}' "$work/out.txt")
  else
    rate=$(awk '/Requests\/sec/ {printf "%d", $2}' "$work/out.txt")
    p99=$(to_ms "$(awk '$1 == "99%" {print $2}' "$work/out.txt")")
    units=$(awk '/requests in/ {print $1}' "$work/out.txt")
    failed=$(awk -F'[ ,]+' '/Socket errors/ {n += $5+$7+$9+$11} /Non-2xx/ {n += $NF} END {print n + 0}' "$work/out.txt")
  fi
  if [ "$1" = bulk ]; then
    local bytes; bytes=$(to_bytes "$(awk '/requests in/ {print $5}' "$work/out.txt")")
    awk -v b="${bytes:-0}" -v d="$duration" -v t="$ticks" -v hz="$hz" -v f="$failed" -v proxy="$pid" \
      'BEGIN { printf "%.2f - %s %s\n", b * 8 / d / 1e9, (proxy != "" && b > 0) ? sprintf("%.3f", t / hz / (b / 1e9)) : "-", f }'
  else
    awk -v r="${rate:-0}" -v p="${p99:--}" -v t="$ticks" -v hz="$hz" -v n="${units:-0}" -v f="$failed" -v proxy="$pid" \
      'BEGIN { printf "%s %s %s %s\n", r, p, (proxy != "" && n > 0) ? sprintf("%.2f", t / hz * 1e6 / n) : "-", f }'
  fi
}

throughput() {
  start_peers
  echo "| run | workload | peer | requests/s (bulk: Gbit/s) | p99 ms | proxy µs CPU per request (bulk: s per GB) | failed |"
  echo "| --- | --- | --- | --- | --- | --- | --- |"
  local run turn order
  for run in $(seq "$runs"); do
    # Each round starts one peer later, so that no peer always runs right after the same
    # one (what a run leaves behind, such as sockets in TIME_WAIT, falls on every peer).
    turn=$(((run - 1) % ${#peers[@]}))
    order=("${peers[@]:turn}" "${peers[@]:0:turn}")
    for workload in keep-alive new-conn ab bulk; do
      for peer in "${order[@]}"; do
        read -r rate p99 cpu failed < <(measure "$workload" "$peer")
        echo "| $run | $workload | $peer | $rate | $p99 | $cpu | $failed |"
        echo "$workload $peer $rate $p99 $cpu $run" >> "$work/throughput.txt"
      done
    done
  done
  stop_peers
}

# The median of one column (3 rate, 4 p99, 5 cpu) of a workload's runs against a peer.
median_of() { # $1 workload, $2 peer, $3 column
  awk -v w="$1" -v p="$2" -v c="$3" '$1 == w && $2 == p && $c != "-" {print $c}' "$work/throughput.txt" |
    sort -g | awk '{v[NR] = $1} END {if (NR) print v[int((NR + 1) / 2)]; else print "-"}'
}

# lb ÷ HAProxy in each round, as "lowest–highest": the two ran minutes apart, so a round's
# ratio is spared most of what moved the machine between rounds, and a target is met for
# sure only where the whole range meets it.
round_ratios() { # $1 workload, $2 column
  awk -v w="$1" -v c="$2" '$1 == w && $c != "-" {v[$2, $6] = $c; round[$6] = 1}
    END {
      for (r in round) {
        if (!(("lb", r) in v) || !(("haproxy", r) in v) || v["haproxy", r] <= 0) continue
        x = v["lb", r] / v["haproxy", r]
        if (!n++) lo = hi = x; else {if (x < lo) lo = x; if (x > hi) hi = x}
      }
      if (n) printf "%.2f–%.2f", lo, hi; else print "-"
    }' "$work/throughput.txt"
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a != "-" && b != "-" && b > 0) printf "%.2f", a / b; else print "-" }'; }

summary_row() { # $1 label, $2 workload, $3 column, $4 "direct" for the ratio to direct
  local l h n d="-" extra=""
  l=$(median_of "$2" lb "$3"); h=$(median_of "$2" haproxy "$3"); n=$(median_of "$2" nginx-stream "$3")
  [ "$4" = direct ] && d=$(median_of "$2" direct "$3")
  [ -n "${LB_BASELINE:-}" ] && extra=" $(median_of "$2" lb-baseline "$3") |"
  echo "| $1 | $d | $l | $h | $n | $(ratio "$l" "$h") | $(round_ratios "$2" "$3") | $(ratio "$l" "$d") |$extra"
}

throughput_summary() {
  local extra="" rule=""
  [ -n "${LB_BASELINE:-}" ] && extra=" lb-baseline |" && rule=" --- |"
  echo
  echo "| workload (medians of $runs runs) | direct | lb | HAProxy | nginx stream | lb ÷ HAProxy | lb ÷ HAProxy, each round | lb ÷ direct |$extra"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- |$rule"
  summary_row "keep-alive tiny responses, requests/s" keep-alive 3 direct
  summary_row "keep-alive, p99 ms" keep-alive 4 direct
  summary_row "keep-alive, proxy µs CPU per request" keep-alive 5 -
  summary_row "new connection per request, requests/s (wrk)" new-conn 3 direct
  summary_row "new connection per request, requests/s (ab)" ab 3 direct
  summary_row "new connection, p99 ms (wrk)" new-conn 4 direct
  summary_row "new connection, proxy µs CPU per request (wrk)" new-conn 5 -
  summary_row "one bulk stream, Gbit/s" bulk 3 direct
  summary_row "bulk, proxy CPU s per GB" bulk 5 -
}

# System calls per request of each proxy, from strace -c.
syscalls() {
  command -v strace >/dev/null || { echo "needs strace" >&2; exit 1; }
  start_peers
  echo
  echo "| load | peer | system calls per request |"
  echo "| --- | --- | --- |"
  for mode in keep-alive new-conn; do
    for peer in "${peers[@]}"; do
      [ "$peer" = direct ] && continue
      local header=() tracer requests
      [ "$mode" = new-conn ] && header=(-H "Connection: close")
      local traced=()
      for p in $(tree "${peer_pid[$peer]}"); do traced+=(-p "$p"); done
      strace -c -f "${traced[@]}" -o "$work/strace.txt" 2> /dev/null &
      tracer=$!
      sleep 1
      wrk -t1 -c16 -d5s "${header[@]}" "http://127.0.0.1:${peer_port[$peer]}/" > "$work/out.txt" 2>&1 || true
      kill -INT "$tracer"; wait "$tracer" 2>/dev/null || true
      requests=$(awk '/requests in/ {print $1}' "$work/out.txt")
      # strace -c's table: % time, seconds, usecs/call, calls, [errors,] syscall.
      awk '/^-/ || /syscall/ || /total/ || NF < 5 {next} {print $NF, $4}' "$work/strace.txt" |
        sort -k2 -gr | awk -v r="$requests" -v m="$mode" -v p="$peer" '
          {t += $2; if ($2 / r >= 0.01) line = line sprintf(" `%s` %.2f,", $1, $2 / r)}
          END {sub(/,$/, "", line); printf "| %s | %s | %.2f:%s |\n", m, p, t / r, line}'
    done
  done
  stop_peers
}

# TCP segments per request on the whole machine (client, proxy and backend together), from
# the kernel's counters (nstat, iproute2): every packet costs CPU on both of its ends.
packets() {
  command -v nstat >/dev/null || { echo "needs nstat (iproute2)" >&2; exit 1; }
  export NSTAT_HISTORY="$work/nstat.history"
  start_peers
  echo
  echo "| load | peer | TCP segments per request | of which pure ACKs |"
  echo "| --- | --- | --- | --- |"
  for mode in keep-alive new-conn; do
    for peer in "${peers[@]}"; do
      local header=() requests
      [ "$mode" = new-conn ] && header=(-H "Connection: close")
      nstat -n > /dev/null
      wrk -t2 -c"$connections" -d3s "${header[@]}" "http://127.0.0.1:${peer_port[$peer]}/" > "$work/out.txt" 2>&1 || true
      requests=$(awk '/requests in/ {print $1}' "$work/out.txt")
      nstat 2> /dev/null | awk -v r="$requests" -v m="$mode" -v p="$peer" '
        $1 == "TcpOutSegs" {s = $2} $1 == "TcpExtTCPPureAcks" {a = $2}
        END {printf "| %s | %s | %.2f | %.2f |\n", m, p, s / r, a / r}'
    done
  done
  stop_peers
}

# Where each proxy's CPU goes: `perf record -e cpu-clock -g` on it (all of its threads and
# processes) during one measured run of a workload; prints its CPU per request, the share
# of it spent in the kernel, and the CPU per request inside each of its busiest system
# calls (inclusive: a call on loopback also runs the receiving side's TCP input). The CPU
# figure includes perf's own sampling.
syscall_names="accept4 connect socket close shutdown recvfrom sendto recvmsg sendmsg read write readv writev splice epoll_wait epoll_ctl setsockopt getsockopt ioctl fcntl"
profile() {
  command -v perf >/dev/null || { echo "needs perf (linux-perf)" >&2; exit 1; }
  start_peers
  echo
  echo "| load | peer | proxy µs CPU per request | in the kernel | µs per request inside each system call |"
  echo "| --- | --- | --- | --- | --- |"
  for mode in keep-alive new-conn; do
    for peer in "${peers[@]}"; do
      [ "$peer" = direct ] && continue
      local targets recorder rate p99 cpu failed kernel calls
      targets=$(tree "${peer_pid[$peer]}" | paste -sd,)
      perf record -q -e cpu-clock -g -p "$targets" -o "$work/perf.data" > /dev/null 2> "$work/perf.err" &
      recorder=$!; pids+=("$recorder")
      read -r rate p99 cpu failed < <(measure "$mode" "$peer")
      kill -INT "$recorder" 2>/dev/null || true; wait "$recorder" 2>/dev/null || true
      [ -s "$work/perf.data" ] || { echo "perf recorded nothing:" >&2; cat "$work/perf.err" >&2; exit 1; }
      # Every kernel sample, modules (conntrack) included.
      kernel=$(perf report -i "$work/perf.data" --no-children --sort sym -g none --stdio 2> /dev/null |
        awk '$2 == "[k]" {s += $1} END {printf "%.1f", s}' || true)
      # Inclusive shares of the kernel's system call entry points (`__x64_sys_close`, or
      # `__sys_sendmsg` where the kernel inlined the first): the kernel's own stacks are
      # whole, whatever the proxy was built with.
      calls=$(perf report -i "$work/perf.data" --children --sort sym -g none --stdio 2> /dev/null |
        awk -v cpu="$cpu" -v known="$syscall_names" '
          BEGIN {split(known, k, " "); for (i in k) wanted[k[i]] = 1}
          $3 == "[k]" {name = $4; sub(/^_+(x64_|do_)?sys_/, "", name)
            if (name in wanted && $1 + 0 > share[name]) share[name] = $1 + 0}
          END {for (n in share) if (share[n] >= 2) printf "%s %.1f\n", n, share[n] / 100 * cpu}' |
        sort -k2 -gr | awk '{line = line sprintf(" `%s` %s,", $1, $2)} END {sub(/,$/, "", line); print line}' || true)
      echo "| $mode | $peer | $cpu | ${kernel:-?} % |$calls |"
    done
  done
  stop_peers
}

# Resident memory of a process and its children, in kB.
rss_kb() { tree_sum "$1" status '/^VmRSS/ {print $2}'; }

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
case " $parts " in *" throughput "*) throughput_summary ;; esac
case " $parts " in *" syscalls "*) syscalls ;; esac
case " $parts " in *" packets "*) packets ;; esac
case " $parts " in *" profile "*) profile ;; esac
