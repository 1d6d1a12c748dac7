#!/usr/bin/env bash
# Runs the same fio jobs (fio's nbd engine, through libnbd) against nbdfault, nbdkit's file plugin
# and qemu-nbd, each serving the same image file, and prints a Markdown table of the results.
#
#   scripts/bench-servers.sh [SECONDS_PER_JOB]
#
# A benchmark, not a test: the numbers depend on the machine. docs/performance.md records a run.
set -euo pipefail

seconds=${1:-10}
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
server_pid=
cleanup() {
    [[ -n $server_pid ]] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

need() {
    command -v "$1" >/dev/null || { echo "missing $1: apt-get install $2" >&2; exit 1; }
}
need fio fio
need nbdkit nbdkit
need qemu-nbd qemu-utils
need nbdinfo libnbd-bin

cargo build --release --quiet -p nbdfault --manifest-path "$repo/Cargo.toml"
nbdfault=${CARGO_TARGET_DIR:-$repo/target}/release/nbdfault

image=$work/disk.img
port=$((20000 + RANDOM % 20000))
truncate -s 1G "$image"
# Fill the image, so reads hit data and not holes.
dd if=/dev/urandom of="$image" bs=1M count=1024 conv=notrunc status=none

start_server() {
    case $1 in
    nbdfault) "$nbdfault" serve -q --listen "127.0.0.1:$port" --no-control --export "disk=file:$image" >/dev/null & ;;
    nbdkit) nbdkit --foreground --exit-with-parent --port "$port" --ipaddr 127.0.0.1 --exportname disk \
        file "file=$image" & ;;
    qemu-nbd) qemu-nbd --persistent --shared=8 --bind 127.0.0.1 --port "$port" --export-name disk \
        --format raw --cache=writeback --aio=threads "$image" & ;;
    esac
    server_pid=$!
    for _ in $(seq 100); do
        nbdinfo --size "nbd://127.0.0.1:$port/disk" >/dev/null 2>&1 && return
        sleep 0.1
    done
    echo "$1 did not start" >&2
    exit 1
}

stop_server() {
    kill "$server_pid"
    wait "$server_pid" 2>/dev/null || true
    server_pid=
}

# name: fio arguments
jobs=(
    "4k random read, QD32|--rw=randread --bs=4k --iodepth=32"
    "4k random write, QD32|--rw=randwrite --bs=4k --iodepth=32"
    "1M sequential read, QD8|--rw=read --bs=1M --iodepth=8"
    "1M sequential write, QD8|--rw=write --bs=1M --iodepth=8"
)

run_job() {
    # shellcheck disable=SC2086 # the job's arguments are meant to split
    fio --name=bench --ioengine=nbd --uri="nbd://127.0.0.1:$port/disk" --size=1G --time_based \
        --runtime="$seconds" --ramp_time=1 --output-format=json --output="$work/fio.json" $2 >/dev/null
    # fio's nbd engine prints a line of its own on stdout, so the JSON goes through a file.
    python3 -c '
import json, sys
job = json.load(open(sys.argv[1]))["jobs"][0]
side = job["read"] if job["read"]["io_bytes"] else job["write"]
iops, mib = side["iops"], side["bw_bytes"] / 2**20
p99 = side["clat_ns"]["percentile"]["99.000000"] / 1000
print(f"{iops:.0f} IOPS, {mib:.0f} MiB/s, p99 {p99:.0f} us")' "$work/fio.json"
}

declare -A results
servers=(nbdfault nbdkit qemu-nbd)
for server in "${servers[@]}"; do
    start_server "$server"
    for job in "${jobs[@]}"; do
        results["$server|${job%%|*}"]=$(run_job "${job%%|*}" "${job#*|}")
    done
    stop_server
done

echo "| job | nbdfault | nbdkit file plugin | qemu-nbd |"
echo "|---|---|---|---|"
for job in "${jobs[@]}"; do
    name=${job%%|*}
    row="| $name |"
    for server in "${servers[@]}"; do
        row+=" ${results["$server|$name"]} |"
    done
    echo "$row"
done
