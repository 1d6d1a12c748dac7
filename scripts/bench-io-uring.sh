#!/usr/bin/env bash
# What io_uring would cost the file export, measured on the files themselves (no server): fio's
# io_uring engine against its psync engine (pread/pwrite, what the I/O threads and the inline
# path do) on a 1 GiB image in /dev/shm (tmpfs) and on the disk under the repository, the page
# cache warm and cold. Per row: IOPS, CPU time per I/O of the fio process including io_uring's
# io-wq workers (perf stat's task-clock follows them), system calls per I/O, and how many I/Os
# io_uring handed to an io-wq worker thread (the tracepoint io_uring:io_uring_queue_async_work).
#
#   scripts/bench-io-uring.sh [IOS_PER_ROW]
#
# A benchmark, not a test: docs/performance.md records a run and how to read it.
set -euo pipefail
ios=${1:-40000}
repo=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/lib/packages.sh
source "$repo/scripts/lib/packages.sh"
install_packages "${BENCH_PACKAGES[@]}"
shm_dir=$(mktemp -d /dev/shm/nbdfault-uring.XXXXXX)
mkdir -p "$repo/target"
disk_dir=$(mktemp -d "$repo/target/uring.XXXXXX")
trap 'rm -rf "$shm_dir" "$disk_dir"' EXIT
dd if=/dev/urandom of="$shm_dir/disk.img" bs=1M count=1024 status=none
cp "$shm_dir/disk.img" "$disk_dir/disk.img"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
echo "| file system | page cache | row | engine | IOPS | CPU us per I/O | system calls per I/O | io-wq hand-offs per I/O |"
echo "|---|---|---|---|---|---|---|---|"
for place in "tmpfs:$shm_dir/disk.img" "ext4:$disk_dir/disk.img"; do
    name=${place%%:*} file=${place#*:}
    for cache in warm cold; do
        [[ $name == tmpfs && $cache == cold ]] && continue
        for row in "randread 1" "randread 32" "randwrite 1" "randwrite 32"; do
            read -r rw depth <<<"$row"
            for engine in psync io_uring; do
                # psync is synchronous: one I/O at a time whatever the depth.
                [[ $engine == psync && $depth != 1 ]] && continue
                [[ $cache == warm ]] && cat "$file" >/dev/null
                perf stat -x, -o "$disk_dir/stat" \
                    -e task-clock,raw_syscalls:sys_enter,io_uring:io_uring_queue_async_work -- \
                    fio --name=uring --filename="$file" --size=1G --rw="$rw" --bs=4k --ioengine="$engine" \
                    --iodepth="$depth" --number_ios="$ios" --invalidate="$([[ $cache == cold ]] && echo 1 || echo 0)" \
                    --output-format=json --output="$disk_dir/fio.json" >/dev/null
                python3 - "$disk_dir" "$name" "$cache" "$rw" "$depth" "$engine" <<'PY'
import json, sys
where, name, cache, rw, depth, engine = sys.argv[1:]
job = json.load(open(f"{where}/fio.json"))["jobs"][0]
ios = job["read"]["total_ios"] + job["write"]["total_ios"]
iops = job["read"]["iops"] + job["write"]["iops"]
counts = {}
for line in open(f"{where}/stat"):
    fields = line.strip().split(",")
    if len(fields) > 3 and fields[0] and not line.startswith("#"):
        try:
            counts[fields[2]] = float(fields[0])
        except ValueError:
            pass
print(f"| {name} | {cache} | 4k {rw} QD{depth} | {engine} | {iops:,.0f} | "
      f"{counts.get('task-clock', 0) * 1000 / ios:.2f} | {counts.get('raw_syscalls:sys_enter', 0) / ios:.2f} | "
      f"{counts.get('io_uring:io_uring_queue_async_work', 0) / ios:.2f} |")
PY
            done
        done
    done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
