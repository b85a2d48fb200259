#!/usr/bin/env bash
# The hazard lockfs exists for, shown with the real PostgreSQL server (run as root):
#
#   1. plain directory: two postmasters, each in its own PID, IPC, network and mount
#      namespaces (what two containers are), both start on ONE data directory, because
#      postmaster.pid's PID and its SysV shared-memory key mean nothing across namespaces.
#   2. the same data directory through lockfs: the second postmaster is refused with
#      "Device or resource busy"; the first keeps serving.
#
# Usage: sudo scripts/hazard.sh     (HAZARD_DIR=/some/dir to choose where it works)
set -euo pipefail
cd "$(dirname "$0")/.."
lockfs=$PWD/.venv/bin/lockfs
[ -x "$lockfs" ] || lockfs=$(command -v lockfs)
bindir=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
work=${HAZARD_DIR:-/tmp/lockfs-hazard}

as_postgres=(setpriv --reuid=postgres --regid=postgres --init-groups)
container=(unshare --ipc --net --pid --fork --kill-child --mount-proc)
pids=()

cleanup() {
    for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    "$lockfs" unmount "$work/lockfs/dst" 2>/dev/null || true
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

# start_postmaster NAME DATADIR: a postmaster in its own namespaces, logging to $work/NAME.log
start_postmaster() {
    local name=$1 datadir=$2
    mkdir -p "$work/sock-$name" && chown postgres: "$work/sock-$name"
    "${container[@]}" "${as_postgres[@]}" "$bindir/postgres" -D "$datadir" \
        -k "$work/sock-$name" -c listen_addresses='' >"$work/$name.log" 2>&1 &
    pids+=($!)
    # wait until it is ready or has exited (at most 30 s)
    for _ in $(seq 300); do
        grep -q "ready to accept connections" "$work/$name.log" && break
        kill -0 "$!" 2>/dev/null || break
        sleep 0.1
    done
    echo "--- postmaster $name (log $work/$name.log):"
    sed 's/^/    /' "$work/$name.log"
}

# stop_all: SIGINT (fast shutdown) to each postmaster, i.e. to the child of its unshare
stop_all() {
    for pid in "${pids[@]}"; do
        pkill -INT -P "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    pids=()
}

cleanup
rm -rf "$work"
mkdir -p "$work/plain/data" "$work/lockfs/src" "$work/lockfs/dst"
chmod 755 "$work"
chown postgres: "$work/plain/data" "$work/lockfs/src"
chmod 700 "$work/plain/data" "$work/lockfs/src"

step "1. plain directory $work/plain/data: initdb, then two namespaced postmasters"
"${as_postgres[@]}" "$bindir/initdb" -D "$work/plain/data" --no-locale -E UTF8 -A trust >/dev/null
start_postmaster plain-A "$work/plain/data"
start_postmaster plain-B "$work/plain/data"
ready=$(grep -l "ready to accept connections" "$work"/plain-?.log | wc -l)
echo "postmasters ready on ONE data directory: $ready of 2"
stop_all

step "2. lockfs: lockfs mount $work/lockfs/src $work/lockfs/dst"
"$lockfs" mount "$work/lockfs/src" "$work/lockfs/dst" --log-file "$work/lockfs.log"
unshare -m "${as_postgres[@]}" "$bindir/initdb" -D "$work/lockfs/dst" --no-locale -E UTF8 \
    -A trust >/dev/null
echo "initdb through the mount: ok"
start_postmaster lockfs-A "$work/lockfs/dst"
start_postmaster lockfs-B "$work/lockfs/dst"
ready=$(grep -l "ready to accept connections" "$work"/lockfs-?.log | wc -l)
echo "postmasters ready on ONE data directory: $ready of 2"
echo "A still answers: $("$bindir/psql" -X -h "$work/sock-lockfs-A" -U postgres -Atc 'select 42')"
"$lockfs" status "$work/lockfs/dst"
stop_all
"$lockfs" unmount "$work/lockfs/dst"
trap - EXIT
step "lockfs log"
cat "$work/lockfs.log"
