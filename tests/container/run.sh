#!/usr/bin/env bash
# The container image, end to end with podman (contract §8 "Container"): builds the
# Dockerfile's `prebuilt` stage from a statically linked lb built here (no Docker Hub
# needed), adds the test worker and a config the way an app image would, runs it, and
# checks what a user sees: lb is PID 1 as uid 10001, traffic reaches the workers,
# `lb restart` through `podman exec` replaces them, `podman healthcheck run` passes, and
# `podman stop -t N` ends the container with code 0 while a connection open at the stop
# is served to its end. Also checks that the image's user is numeric and not root, that
# the same check rejects images running as root, and that the recipe in docs/production.md
# (lb copied into an app's image with COPY --from) builds and runs.
#
# Run as root (podman with runc and vfs storage, all of it in a temp folder that is
# removed at the end). Skips, saying why, where podman cannot run.
set -euo pipefail

repo="$(cd "$(dirname "$0")/../.." && pwd)"
here="$repo/tests/container"

skip() {
  echo "container test skipped: $*"
  exit 0
}
[ "$(id -u)" = 0 ] || skip "needs root (podman here runs rootful, with runc and vfs storage)"
for tool in podman runc python3; do
  command -v "$tool" >/dev/null 2>&1 || skip "$tool is not installed"
done

started=$SECONDS
step() { printf '[%3ds] %s\n' "$((SECONDS - started))" "$*"; }
fail() {
  echo "container test FAILED: $*" >&2
  exit 1
}

# --- a statically linked lb and test worker ---------------------------------------------
triple="$(rustc -vV | sed -n 's/^host: //p')"
step "building a static lb and lb-test-worker for $triple (profile container-test)"
# crt-static with an explicit --target applies to the binaries only (build scripts and
# proc macros stay dynamic), into target/$triple, so the host build is left alone. The
# container-test profile (Cargo.toml) is unoptimised: the same code and image layout in
# a fraction of a release build's time.
RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --profile container-test \
  --locked --manifest-path "$repo/Cargo.toml" --target "$triple" --bin lb --bin lb-test-worker
bin="$repo/target/$triple/container-test"

# --- podman, configured inside a temp folder --------------------------------------------
tmp="$(mktemp -d /tmp/lb-container-test.XXXXXX)"
mkdir -p "$tmp/storage/root" "$tmp/storage/run" "$tmp/engine" "$tmp/ctx" "$tmp/app"
background=()
containers=()
cleanup() {
  local status=$?
  for pid in "${background[@]}"; do kill "$pid" 2>/dev/null || true; done
  # The test's containers first (their conmon, network and mounts), then the folder with
  # the storage and the images. The environment is spelled out so that nothing outside
  # the test's own storage is ever touched.
  for c in "${containers[@]}"; do
    CONTAINERS_CONF="$tmp/containers.conf" CONTAINERS_STORAGE_CONF="$tmp/storage.conf" \
      timeout 30 podman rm -f -t 0 "$c" >/dev/null 2>&1 || true
  done
  if [ "$status" != 0 ] && [ -s "$tmp/podman.stderr" ]; then
    echo "--- podman's stderr (last 30 lines) ---" >&2
    tail -n 30 "$tmp/podman.stderr" >&2
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT

# runc: crun refuses this host's hybrid cgroups. No systemd runs here, so cgroupfs and a
# file event log. The container's limits must not exceed what its runtime was given, since
# raising them needs CAP_SYS_RESOURCE, which this host does not grant: open files at the
# host's hard limit, processes at the 32768 that conmon runs with here.
nofile="$(ulimit -Hn)"
nproc="$(ulimit -Hu)"
if [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; then nproc=32768; fi
cat >"$tmp/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$tmp/engine/events.log"
tmp_dir = "$tmp/engine"
EOF
cat >"$tmp/storage.conf" <<EOF
[storage]
driver = "vfs"
graphroot = "$tmp/storage/root"
runroot = "$tmp/storage/run"
EOF
export CONTAINERS_CONF="$tmp/containers.conf" CONTAINERS_STORAGE_CONF="$tmp/storage.conf"

# podman with a deadline. Its stderr (without systemd it logs an error about health check
# timers on every start and stop) goes to a file, shown if the test fails.
pm() { timeout 120 podman "$@" 2>>"$tmp/podman.stderr"; }

# Runs "$@" until it succeeds, for at most $1 seconds.
wait_for() {
  local seconds=$1
  shift
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.1
  done
}

# --- the image, and the check of its user ------------------------------------------------
image=localhost/lb-container-test:image
step "podman build --target prebuilt (the Dockerfile's final layout, lb from the host)"
cp "$bin/lb" "$tmp/ctx/lb"
pm build --quiet --format docker --target prebuilt -f "$repo/Dockerfile" -t "$image" "$tmp/ctx" >/dev/null \
  || fail "podman build of the prebuilt stage failed"

# Kubernetes' runAsNonRoot can only verify a numeric uid, and it must not be 0.
user_is_numeric_non_root() {
  local user
  user="$(pm image inspect --format '{{.Config.User}}' "$1")"
  if [[ ! "$user" =~ ^([0-9]+)(:[0-9]+)?$ ]]; then
    echo "$1: USER is '${user}', not a numeric uid[:gid]"
    return 1
  fi
  if [ "${BASH_REMATCH[1]}" -eq 0 ]; then
    echo "$1: USER is '${user}', which is root"
    return 1
  fi
  echo "$1: USER is $user"
}
user_is_numeric_non_root "$image" || fail "the image's user"
# The same check must reject images that run as root or by name.
printf 'FROM %s\nUSER 0\n' "$image" >"$tmp/Containerfile.root"
printf 'FROM %s\nUSER 0:0\n' "$image" >"$tmp/Containerfile.root-group"
printf 'FROM %s\nUSER nobody\n' "$image" >"$tmp/Containerfile.named"
printf 'FROM scratch\nCOPY --from=%s /usr/local/bin/lb /usr/local/bin/lb\n' "$image" >"$tmp/Containerfile.no-user"
for variant in root root-group named no-user; do
  pm build --quiet --format docker -f "$tmp/Containerfile.$variant" -t "localhost/lb-container-test:$variant" "$tmp/ctx" >/dev/null \
    || fail "podman build of the $variant variant failed"
  if why="$(user_is_numeric_non_root "localhost/lb-container-test:$variant")"; then
    fail "the user check accepted the $variant variant: $why"
  fi
  echo "rejected as it should be: $why"
done

# --- an app image: the test worker and its config on top of the lb image -----------------
cp "$bin/lb-test-worker" "$tmp/app/"
cat >"$tmp/app/lb.yaml" <<'EOF'
services:
  - name: web
    listen: 0.0.0.0:8080
    workers:
      # A list: the image has no shell for `sh -c`.
      command: ["lb-test-worker"]
      count: 2
      env: { HELLO: "1" }
      rollout_watch: 1s
      drain_timeout: 20s
      stop_timeout: 2s
EOF
cat >"$tmp/app/Containerfile" <<EOF
FROM $image
COPY lb-test-worker /usr/local/bin/lb-test-worker
COPY lb.yaml /etc/lb/lb.yaml
EOF
app=localhost/lb-container-test:app
pm build --quiet --format docker -t "$app" "$tmp/app" >/dev/null || fail "podman build of the app image failed"

# --- run it -------------------------------------------------------------------------------
name=lb-container-test
step "podman run $app"
containers+=("$name")
pm run -d --name "$name" -p 127.0.0.1::8080 "$app" >/dev/null || fail "podman run failed"
addr="$(pm port "$name" 8080/tcp)"
[ -n "$addr" ] || fail "no published port for 8080"

# The image's HEALTHCHECK (lb health) passes once both workers are ready.
wait_for 30 pm healthcheck run "$name" || fail "podman healthcheck run did not pass within 30 s"
step "podman healthcheck run: healthy"

# PID 1 and its uid, as the kernel reports them (podman runs no user namespace here, so the
# uids are the host's).
host_pid="$(pm inspect --format '{{.State.Pid}}' "$name")"
status_of_pid1="$(cat "/proc/$host_pid/status")"
nspid="$(awk '/^NSpid:/ { print $NF }' <<<"$status_of_pid1")"
uids="$(awk '/^Uid:/ { print $2, $3, $4, $5 }' <<<"$status_of_pid1")"
gids="$(awk '/^Gid:/ { print $2, $3, $4, $5 }' <<<"$status_of_pid1")"
comm="$(cat "/proc/$host_pid/comm")"
[ "$nspid" = 1 ] || fail "lb is pid $nspid in the container, not 1"
[ "$comm" = lb ] || fail "pid 1 in the container is $comm, not lb"
[ "$uids" = "10001 10001 10001 10001" ] || fail "pid 1 runs with uids $uids"
[ "$gids" = "10001 10001 10001 10001" ] || fail "pid 1 runs with gids $gids"
echo "pid 1 in the container: $comm, uid and gid 10001"
pm top "$name" pid user group args

# Traffic through lb to both workers.
declare -A seen=()
for _ in 1 2 3 4; do
  line="$(python3 "$here/client.py" hello "$addr")" || fail "no answer through $addr"
  seen["${line%% pid=*}"]=1
done
[ -n "${seen[id=0]:-}" ] && [ -n "${seen[id=1]:-}" ] || fail "connections did not reach both workers: ${!seen[*]}"
echo "served through $addr by workers: ${!seen[*]}"

# --- rolling restart through podman exec --------------------------------------------------
pids() {
  pm exec "$name" lb status --json | python3 -c '
import json, sys
for w in json.load(sys.stdin)["services"][0]["workers"]:
    print(w["id"], w["pid"], w["state"], w["restarts"])'
}
before="$(pids)"
step "podman exec $name lb restart"
pm exec "$name" lb restart || fail "lb restart exited non-zero"
after="$(pids)"
echo "workers (id pid state restarts) before: $(tr '\n' ';' <<<"$before") after: $(tr '\n' ';' <<<"$after")"
python3 - "$before" "$after" <<'EOF' || fail "lb restart did not replace every worker"
import sys
before = {int(l.split()[0]): l.split() for l in sys.argv[1].splitlines()}
after = {int(l.split()[0]): l.split() for l in sys.argv[2].splitlines()}
assert sorted(after) == [0, 1], after
for slot, (_, pid, state, restarts) in after.items():
    assert pid != before[slot][1], f"slot {slot} kept pid {pid}"
    assert state == "ready", f"slot {slot} is {state}"
    assert int(restarts) >= 1, f"slot {slot} restarts {restarts}"
EOF
new_pids=" $(awk '{ print $2 }' <<<"$after" | tr '\n' ' ')"
line="$(python3 "$here/client.py" hello "$addr")" || fail "no answer after the restart"
pid="${line#* pid=}"
pid="${pid%% *}"
[[ "$new_pids" == *" $pid "* ]] || fail "served by pid $pid, not one of the new workers:$new_pids"
echo "served by a new worker after the restart: $line"

# --- podman stop with a connection open ---------------------------------------------------
longest="$(pm exec "$name" lb check | sed -n 's/^longest stop: \([0-9]*\)s.*/\1/p')"
[ -n "$longest" ] || fail "lb check printed no longest stop"
timeout_s=$((longest + 10))
python3 "$here/client.py" hold "$addr" "$tmp/held" "$tmp/go" >"$tmp/hold.out" &
holder=$!
background+=("$holder")
wait_for 15 test -e "$tmp/held" || fail "the held connection did not open"
step "podman stop -t $timeout_s (lb check: longest stop ${longest}s) with a connection open"
stop_began=$SECONDS
pm stop -t "$timeout_s" "$name" >/dev/null &
stopper=$!
background+=("$stopper")
# lb stops listening (shutdown_delay 0s), so new clients are refused...
python3 "$here/client.py" refused "$addr" 15 || fail "lb kept accepting after podman stop"
# ...while the stop waits for the connection that is still open.
kill -0 "$stopper" 2>/dev/null || fail "podman stop returned while a connection was open"
touch "$tmp/go"
wait "$holder" || fail "the connection open at the stop was not served to its end"
wait "$stopper" || fail "podman stop failed"
stop_took=$((SECONDS - stop_began))
exit_code="$(pm inspect --format '{{.State.ExitCode}}' "$name")"
[ "$exit_code" = 0 ] || fail "the container exited with $exit_code"
[ "$stop_took" -lt "$timeout_s" ] || fail "podman stop took ${stop_took}s, the whole -t $timeout_s"
echo "the open connection was served to its end ($(cat "$tmp/hold.out")); container exited 0 in ${stop_took}s"

# --- docs/production.md's recipe: lb copied into an app's image ----------------------------
# Its Dockerfile block, with the test's images in place of the runtime and of lb:0.1.0. No
# CMD there: lb and `lb health` read lb.yaml in the WORKDIR.
recipe="$tmp/recipe"
mkdir -p "$recipe"
awk '/^## Docker and podman/ { on = 1 } on && /^```dockerfile/ { code = 1; next } code && /^```/ { exit } code' \
  "$repo/docs/production.md" >"$recipe/Containerfile.docs"
grep -q '^COPY --from=lb:0.1.0 /usr/local/bin/lb /usr/local/bin/lb$' "$recipe/Containerfile.docs" \
  || fail "the Docker and podman section of docs/production.md has no COPY --from recipe"
sed -e 's|^FROM .*|FROM scratch|' -e "s|--from=lb:0.1.0|--from=$image|" \
  "$recipe/Containerfile.docs" >"$recipe/Containerfile"
cp "$bin/lb-test-worker" "$recipe/"
sed 's|command: \["lb-test-worker"\]|command: ["/app/lb-test-worker"]|' "$tmp/app/lb.yaml" >"$recipe/lb.yaml"
grep -q /app/lb-test-worker "$recipe/lb.yaml" || fail "the recipe's config names no worker"
pm build --quiet --format docker -f "$recipe/Containerfile" -t localhost/lb-container-test:recipe "$recipe" >/dev/null \
  || fail "podman build of the docs recipe failed"
user_is_numeric_non_root localhost/lb-container-test:recipe || fail "the recipe image's user"
step "podman run the docs recipe"
containers+=(lb-container-recipe)
pm run -d --name lb-container-recipe -p 127.0.0.1::8080 localhost/lb-container-test:recipe >/dev/null \
  || fail "podman run of the docs recipe failed"
recipe_addr="$(pm port lb-container-recipe 8080/tcp)"
wait_for 30 pm healthcheck run lb-container-recipe || fail "the recipe's health check did not pass within 30 s"
line="$(python3 "$here/client.py" hello "$recipe_addr")" || fail "the recipe served nothing"
echo "the docs recipe: healthy, served by $line"
pm stop -t "$timeout_s" lb-container-recipe >/dev/null || fail "podman stop of the recipe failed"
exit_code="$(pm inspect --format '{{.State.ExitCode}}' lb-container-recipe)"
[ "$exit_code" = 0 ] || fail "the recipe container exited with $exit_code"

step "container test passed"
