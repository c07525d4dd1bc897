#!/bin/sh
# Stands in for the tutorial's database query ("how many users?"): prints the count as
# JSON for lb's feed to broadcast. Each call squares the previous count (5, 25, 625, ...)
# so a change is easy to see; the count lives in $COUNT_FILE.
f="${COUNT_FILE:-${TMPDIR:-/tmp}/lb-example-users-count}"
n=$(cat "$f" 2>/dev/null || echo 0)
if [ "$n" -le 0 ] || [ "$n" -gt 1000000000 ]; then n=5; else n=$((n * n)); fi
echo "$n" > "$f"
echo "{\"usersCount\": $n}"
