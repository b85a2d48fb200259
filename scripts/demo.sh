#!/usr/bin/env bash
# The built-in demo: mount a demo directory, use it from one "container" (mount namespace),
# show that a second one is refused while the first holds it, then unmount.
set -euo pipefail
cd "$(dirname "$0")/.."
lockfs=.venv/bin/lockfs
demo=${LOCKFS_DEMO_DIR:-/tmp/lockfs-demo}

cleanup() { "$lockfs" unmount "$demo/dst" 2>/dev/null || true; }
trap cleanup EXIT
cleanup
rm -rf "$demo" && mkdir -p "$demo/src" "$demo/dst"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "lockfs mount $demo/src $demo/dst"
"$lockfs" mount "$demo/src" "$demo/dst" --log-file "$demo/lockfs.log"
grep " $demo/dst " /proc/mounts

step "client A (its own mount namespace) writes a file and keeps it open"
unshare -m sh -c "echo 'written by client A through lockfs' > $demo/dst/hello.txt; exec 3<$demo/dst/hello.txt; exec sleep 3" &
holder=$!
for _ in $(seq 100); do [ -s "$demo/src/hello.txt" ] && break; sleep 0.05; done
echo "in SRC: $(cat "$demo/src/hello.txt")"

step "client B (another mount namespace) tries to read and write while A holds the directory"
unshare -m sh -c "cat $demo/dst/hello.txt" || echo "-> refused, as it should be"
unshare -m sh -c "echo intruder > $demo/dst/other.txt" || echo "-> refused, as it should be"
echo "client B can still list and stat: $(unshare -m ls "$demo/dst")"

step "lockfs status $demo/dst"
"$lockfs" status "$demo/dst"

step "client A exits; client B now gets the directory"
wait "$holder"
for _ in $(seq 100); do "$lockfs" status "$demo/dst" | grep -q "state: *free" && break; sleep 0.05; done
unshare -m sh -c "cat $demo/dst/hello.txt"

step "daemon log"
cat "$demo/lockfs.log"

step "lockfs unmount $demo/dst"
"$lockfs" unmount "$demo/dst"
trap - EXIT
echo "demo done"
