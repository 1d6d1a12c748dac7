#!/usr/bin/env bash
# Runs the same fio jobs (fio's nbd engine, through libnbd, one connection) against nbdfault and
# its peers, and prints Markdown tables of medians: IOPS per row with the ratio to the best peer,
# then each server's threads, peak RSS and CPU per request.
#
#   scripts/bench-servers.sh [ROUNDS] [SECONDS_PER_RUN] [GROUPS]
#   NBDFAULT_BIN=/path/to/nbdfault scripts/bench-servers.sh ...   # another build of nbdfault
#   NBDFAULT_BEFORE_BIN=/path/to/old/nbdfault scripts/bench-servers.sh ...  # and an older build
#       beside it, as one more server of the tmpfs, memory and overlay groups ("nbdfault
#       before"), for an A/B in one run
#
# GROUPS (default all, comma-separated):
#   tmpfs    a 1 GiB image in /dev/shm: nbdfault file export (also with a 1,000-rule policy that
#            touches no request: the engine's cost), nbdkit file, qemu-nbd
#   disk     the same image on the disk under the repository: nbdfault, nbdkit file, qemu-nbd
#   memory   nbdfault memory:1GiB against nbdkit memory 1G
#   overlay  nbdfault overlay:IMG (copy-on-write in memory) against nbdkit --filter=cow file
#   one-cpu  not in the default: the tmpfs group's servers on the QD1 rows, each server and fio
#            both pinned to CPU 0, so no request pays for waking an idle CPU: the server's own
#            cost at QD1, whatever the scheduler would have placed where
#
# Trustworthy on a noisy, shared machine: every round runs every server once per row, in turn
# (a load spike hits one round of every server, not every run of one), each run starts a fresh
# server, and the tables report medians over the rounds. A run on the disk image is synced to
# the disk before the next starts, so no server pays for another's writeback. The load average
# is printed before and after. A benchmark, not a test: docs/performance.md records a run and
# how to read it.
set -euo pipefail

rounds=${1:-5}
seconds=${2:-5}
groups=${3:-tmpfs,disk,memory,overlay}
[[ $groups =~ ^(tmpfs|disk|memory|overlay|one-cpu)(,(tmpfs|disk|memory|overlay|one-cpu))*$ ]] ||
    { echo "unknown group in '$groups': the groups are tmpfs, disk, memory, overlay, one-cpu" >&2; exit 2; }
repo=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/lib/packages.sh
source "$repo/scripts/lib/packages.sh"
install_packages "${BENCH_PACKAGES[@]}"

shm_dir=$(mktemp -d /dev/shm/nbdfault-bench.XXXXXX)
disk_dir=$(mktemp -d "$repo/target/bench.XXXXXX" 2>/dev/null || { mkdir -p "$repo/target" && mktemp -d "$repo/target/bench.XXXXXX"; })
server_pid=
sampler_pid=
cleanup() {
    [[ -n $sampler_pid ]] && kill "$sampler_pid" 2>/dev/null
    [[ -n $server_pid ]] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
    # The raw results outlive a failed run: every finished run is one JSON line there.
    [[ -s ${results:-} ]] && cp "$results" "${TMPDIR:-/tmp}/nbdfault-bench-results.jsonl"
    rm -rf "$shm_dir" "$disk_dir"
}
trap cleanup EXIT

# shellcheck source=scripts/lib/nbdfault-bin.sh
source "$repo/scripts/lib/nbdfault-bin.sh"
nbdfault_binary
results=$disk_dir/results.jsonl
port=$((20000 + RANDOM % 20000))
uri="nbd://127.0.0.1:$port/disk"

# A 1 GiB image of random data in each place, so reads hit data and not holes.
dd if=/dev/urandom of="$shm_dir/disk.img" bs=1M count=1024 status=none
cp "$shm_dir/disk.img" "$disk_dir/disk.img"

# 1,000 rules on ranges past the end of the 1 GiB export: the engine looks every request up,
# and no rule ever matches.
policy=$disk_dir/policy.yaml
# shellcheck source=scripts/lib/bench-policy.sh
source "$repo/scripts/lib/bench-policy.sh"
write_thousand_rule_policy "$policy"
"$nbdfault" policy check "$policy" >/dev/null

# row name | fio arguments
rows=(
    "4k randread QD32|--rw=randread --bs=4k --iodepth=32"
    "4k randwrite QD32|--rw=randwrite --bs=4k --iodepth=32"
    "4k randread QD1|--rw=randread --bs=4k --iodepth=1"
    "4k randwrite QD1|--rw=randwrite --bs=4k --iodepth=1"
    "64k randrw 70/30 QD16|--rw=randrw --rwmixread=70 --bs=64k --iodepth=16"
    "1M read QD8|--rw=read --bs=1M --iodepth=8"
    "1M write QD8|--rw=write --bs=1M --iodepth=8"
)

# Each group: "server name|command to start it" (IMG is the group's image).
servers_of() {
    local img
    case $1 in
    tmpfs | disk)
        [[ $1 == tmpfs ]] && img=$shm_dir/disk.img || img=$disk_dir/disk.img
        echo "nbdfault|$nbdfault serve -q --listen 127.0.0.1:$port --no-control --export disk=file:$img"
        [[ $1 == tmpfs ]] && echo "nbdfault + 1,000 rules|$nbdfault serve -q --listen 127.0.0.1:$port --no-control --export disk=file:$img --policy disk=$policy"
        [[ $1 == tmpfs && -n ${NBDFAULT_BEFORE_BIN:-} ]] && echo "nbdfault before|$NBDFAULT_BEFORE_BIN serve -q --listen 127.0.0.1:$port --no-control --export disk=file:$img"
        echo "nbdkit file|nbdkit --foreground --exit-with-parent --port $port --ipaddr 127.0.0.1 --exportname disk file file=$img"
        echo "qemu-nbd|qemu-nbd --persistent --shared=8 --bind 127.0.0.1 --port $port --export-name disk --format raw --cache=writeback --aio=threads $img"
        ;;
    memory)
        echo "nbdfault|$nbdfault serve -q --listen 127.0.0.1:$port --no-control --export disk=memory:1GiB"
        [[ -n ${NBDFAULT_BEFORE_BIN:-} ]] && echo "nbdfault before|$NBDFAULT_BEFORE_BIN serve -q --listen 127.0.0.1:$port --no-control --export disk=memory:1GiB"
        echo "nbdkit memory|nbdkit --foreground --exit-with-parent --port $port --ipaddr 127.0.0.1 --exportname disk memory 1G"
        ;;
    overlay)
        echo "nbdfault|$nbdfault serve -q --listen 127.0.0.1:$port --no-control --export disk=overlay:$shm_dir/disk.img"
        [[ -n ${NBDFAULT_BEFORE_BIN:-} ]] && echo "nbdfault before|$NBDFAULT_BEFORE_BIN serve -q --listen 127.0.0.1:$port --no-control --export disk=overlay:$shm_dir/disk.img"
        echo "nbdkit cow|nbdkit --foreground --exit-with-parent --port $port --ipaddr 127.0.0.1 --exportname disk --filter=cow file file=$shm_dir/disk.img"
        ;;
    one-cpu)
        servers_of tmpfs | grep -v "1,000 rules" | sed 's/|/|taskset -c 0 /'
        ;;
    esac
}

start_server() {
    # shellcheck disable=SC2086 # the command line is meant to split
    $1 >/dev/null 2>&1 &
    server_pid=$!
    wait_for_nbd "$uri" "$1" || exit 1
}

stop_server() {
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=
}

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

# Runs one row against the running server and appends a JSON line to the results.
run_row() {
    local group=$1 server=$2 row=$3 args=$4 round=$5
    local before after threads_file=$disk_dir/threads
    echo 0 >"$threads_file"
    # The most threads the server had at any moment of the run, sampled every 200 ms.
    (
        most=0
        for _ in $(seq $((seconds * 5 + 25))); do
            now=$(awk '/^Threads:/ { print $2 }' "/proc/$server_pid/status" 2>/dev/null || echo 0)
            ((now > most)) && most=$now && echo "$most" >"$threads_file"
            sleep 0.2
        done
    ) &
    sampler_pid=$!
    before=$(cpu_ticks "$server_pid")
    # shellcheck disable=SC2086 # the row's arguments are meant to split
    "${fio_cpu[@]}" fio --name=bench --ioengine=nbd --uri="$uri" --size=1G --time_based --runtime="$seconds" \
        --output-format=json --output="$disk_dir/fio.json" $args >/dev/null
    after=$(cpu_ticks "$server_pid")
    kill "$sampler_pid" 2>/dev/null || true
    wait "$sampler_pid" 2>/dev/null || true
    sampler_pid=
    local rss
    rss=$(awk '/^VmHWM:/ { print $2 }' "/proc/$server_pid/status")
    python3 - "$disk_dir/fio.json" "$group" "$server" "$row" "$round" "$((after - before))" \
        "$(cat "$threads_file")" "$rss" "$(getconf CLK_TCK)" >>"$results" <<'EOF'
import json, sys
path, group, server, row, round_, ticks, threads, rss_kib, hz = sys.argv[1:]
job = json.load(open(path))["jobs"][0]
ios = job["read"]["total_ios"] + job["write"]["total_ios"]
iops = job["read"]["iops"] + job["write"]["iops"]
print(json.dumps({
    "group": group, "server": server, "row": row, "round": int(round_), "iops": iops,
    "cpu_us_per_request": int(ticks) / int(hz) * 1e6 / max(ios, 1),
    "threads": int(threads), "rss_mib": int(rss_kib) / 1024,
}))
EOF
}

echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
started=$SECONDS
for round in $(seq "$rounds"); do
    for group in ${groups//,/ }; do
        mapfile -t servers < <(servers_of "$group")
        fio_cpu=()
        [[ $group == one-cpu ]] && fio_cpu=(taskset -c 0)
        for row in "${rows[@]}"; do
            [[ $group == one-cpu && $row != *QD1\|* ]] && continue
            for server in "${servers[@]}"; do
                start_server "${server#*|}"
                run_row "$group" "${server%%|*}" "${row%%|*}" "${row#*|}" "$round"
                stop_server
                # What a run wrote to the disk image reaches the disk before the next run
                # starts: writeback left behind by one server would slow the next one's reads.
                [[ $group == disk ]] && sync "$disk_dir/disk.img"
            done
        done
    done
    echo "round $round of $rounds done after $((SECONDS - started)) s; load average $(cut -d' ' -f1-3 /proc/loadavg)" >&2
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

python3 - "$results" "$(nproc)" <<'EOF'
import json, statistics, sys
from collections import defaultdict
runs = [json.loads(line) for line in open(sys.argv[1])]
cores = int(sys.argv[2])
by = defaultdict(list)
for run in runs:
    by[(run["group"], run["server"], run["row"])].append(run)
def median(group, server, row, key):
    values = [run[key] for run in by[(group, server, row)]]
    return statistics.median(values) if values else None
groups, servers, rows = [], defaultdict(list), []
for run in runs:
    if run["group"] not in groups:
        groups.append(run["group"])
    if run["server"] not in servers[run["group"]]:
        servers[run["group"]].append(run["server"])
    if run["row"] not in rows:
        rows.append(run["row"])
rounds = max(run["round"] for run in runs)
for group in groups:
    names = servers[group]
    ours = [name for name in names if name.startswith("nbdfault")]
    rules = [name for name in ours if "rules" in name]
    peers = [name for name in names if not name.startswith("nbdfault")]
    group_rows = [row for row in rows if by[(group, names[0], row)]]
    print(f"\n### {group}: IOPS, median of {rounds} rounds\n")
    print("| row | " + " | ".join(names) + " | nbdfault / best peer |" + (" policy cost |" if rules else ""))
    print("|---" * (len(names) + 2 + bool(rules)) + "|")
    for row in group_rows:
        iops = {name: median(group, name, row, "iops") for name in names}
        best = max(iops[name] for name in peers)
        line = f"| {row} | " + " | ".join(f"{iops[name]:,.0f}" for name in names)
        line += f" | {iops['nbdfault'] / best:.2f} |"
        if rules:
            line += f" {1 - iops[rules[0]] / iops['nbdfault']:+.1%} |"
        print(line)
    print(f"\n### {group}: server threads (most seen) / peak RSS MiB / CPU us per request, medians\n")
    print("| row | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for row in group_rows:
        cells = []
        for name in names:
            threads = max(run["threads"] for run in by[(group, name, row)])
            cells.append(f"{threads} / {median(group, name, row, 'rss_mib'):.0f} / {median(group, name, row, 'cpu_us_per_request'):.1f}")
        print(f"| {row} | " + " | ".join(cells) + " |")
print(f"\nthreads limit (cores + 4): {cores + 4}")
EOF
