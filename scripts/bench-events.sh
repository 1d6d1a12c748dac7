#!/usr/bin/env bash
# What the live event stream (GET /v1/exports/{name}/events) costs the data path: the same fio
# jobs (fio's nbd engine, one connection, a 1 GiB memory export) against a server nobody
# watches, one the live page watches (a subscriber at the page's rate, 2,000 request events a
# second, the rest summed up), and one a subscriber takes every event from (?rate=0).
# A benchmark, not a test: docs/performance.md records a run and how to read it.
#
#   scripts/bench-events.sh [ROUNDS] [SECONDS_PER_RUN]
#   NBDFAULT_BIN=/path/to/nbdfault scripts/bench-events.sh ...     # another build
#   NBDFAULT_REFERENCE_BIN=/path/to/nbdfault scripts/bench-events.sh ...
#       also a reference build without events ("no events"), run beside the others: for the
#       cost of the stream while nobody subscribes (docs/performance.md says how it was made)
#
# The subscriber is curl, reading the stream as fast as it comes; its own CPU time is not counted,
# the server's work for it (queueing, encoding, writing) is. Every round runs every mode once per
# row, in turn, each with a fresh server, so a load spike hits one round of every mode; the table
# gives medians over rounds: IOPS, the server's CPU time per request, and for QD1 the mean and
# 99th percentile completion latency fio saw. Also whether a subscriber was dropped (it should
# not be) and what it received. The load average is printed before and after.
set -euo pipefail

rounds=${1:-5}
seconds=${2:-5}
repo=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/lib/packages.sh
source "$repo/scripts/lib/packages.sh"
install_packages fio libnbd-bin curl python3

work=$(mktemp -d "${TMPDIR:-/tmp}/nbdfault-bench-events.XXXXXX")
server_pid=
subscriber_pid=
cleanup() {
    [[ -n $subscriber_pid ]] && kill "$subscriber_pid" 2>/dev/null
    [[ -n $server_pid ]] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
    [[ -s ${results:-} ]] && cp "$results" "${TMPDIR:-/tmp}/nbdfault-bench-events-results.jsonl"
    rm -rf "$work"
}
trap cleanup EXIT

# shellcheck source=scripts/lib/nbdfault-bin.sh
source "$repo/scripts/lib/nbdfault-bin.sh"
nbdfault_binary
results=$work/results.jsonl
port=$((20000 + RANDOM % 20000))
control=127.0.0.1:$((port + 1))
uri="nbd://127.0.0.1:$port/disk"

# row name | fio arguments
rows=(
    "4k randwrite QD32|--rw=randwrite --bs=4k --iodepth=32"
    "4k randread QD1|--rw=randread --bs=4k --iodepth=1"
)
# mode name | binary | subscriber's ?rate= (empty: no subscriber)
modes=()
[[ -n ${NBDFAULT_REFERENCE_BIN:-} ]] && modes+=("no events|$NBDFAULT_REFERENCE_BIN|")
modes+=(
    "no subscriber|$nbdfault|"
    "page subscriber (rate 2000)|$nbdfault|2000"
    "every event (rate 0)|$nbdfault|0"
)

start_server() {
    "$1" serve -q --listen "127.0.0.1:$port" --control "$control" --export disk=memory:1GiB >/dev/null 2>&1 &
    server_pid=$!
    wait_for_nbd "$uri" "$1" || exit 1
}

# Subscribes with curl; the stream's bytes, and whether it was dropped for reading too slowly
# (not the `dropped` event every stream gets at shutdown), are counted when it ends.
subscribe() {
    rm -f "$work/received" "$work/dropped"
    curl -sN -o >(grep -c 'reads too slowly' >"$work/dropped") -w '%{size_download}' \
        "http://$control/v1/exports/disk/events?rate=$1" >"$work/received" &
    subscriber_pid=$!
    # The hello event is there once the subscription is.
    sleep 0.3
}

stop_server() {
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=
    if [[ -n $subscriber_pid ]]; then
        wait "$subscriber_pid" 2>/dev/null || true
        subscriber_pid=
        # The process substitution may finish a moment after curl.
        for _ in $(seq 50); do [[ -s $work/dropped ]] && break; sleep 0.1; done
    fi
}

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

run_row() {
    local mode=$1 row=$2 args=$3 round=$4 subscribed=$5
    local before after
    before=$(cpu_ticks "$server_pid")
    # shellcheck disable=SC2086 # the row's arguments are meant to split
    fio --name=bench --ioengine=nbd --uri="$uri" --size=1G --time_based --runtime="$seconds" \
        --output-format=json --output="$work/fio.json" $args >/dev/null
    after=$(cpu_ticks "$server_pid")
    stop_server
    local received=-1 dropped=-1
    if [[ -n $subscribed ]]; then
        received=$(cat "$work/received" 2>/dev/null || echo 0)
        dropped=$(cat "$work/dropped" 2>/dev/null || echo -1)
    fi
    python3 - "$work/fio.json" "$mode" "$row" "$round" "$((after - before))" "$(getconf CLK_TCK)" \
        "$received" "$dropped" >>"$results" <<'EOF'
import json, sys
path, mode, row, round_, ticks, hz, received, dropped = sys.argv[1:]
job = json.load(open(path))["jobs"][0]
ios = job["read"]["total_ios"] + job["write"]["total_ios"]
side = job["read"] if job["read"]["total_ios"] else job["write"]
print(json.dumps({
    "mode": mode, "row": row, "round": int(round_),
    "iops": job["read"]["iops"] + job["write"]["iops"],
    "cpu_us_per_request": int(ticks) / int(hz) * 1e6 / max(ios, 1),
    "clat_mean_us": side["clat_ns"]["mean"] / 1e3,
    "clat_p99_us": side["clat_ns"]["percentile"]["99.000000"] / 1e3,
    "received_mib": int(received) / 2**20, "dropped": int(dropped),
}))
EOF
}

echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
started=$SECONDS
for round in $(seq "$rounds"); do
    for row in "${rows[@]}"; do
        for mode in "${modes[@]}"; do
            IFS='|' read -r name binary rate <<<"$mode"
            start_server "$binary"
            [[ -n $rate ]] && subscribe "$rate"
            run_row "$name" "${row%%|*}" "${row#*|}" "$round" "$rate"
        done
    done
    echo "round $round of $rounds done after $((SECONDS - started)) s; load average $(cut -d' ' -f1-3 /proc/loadavg)" >&2
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

python3 - "$results" <<'EOF'
import json, statistics, sys
from collections import defaultdict
runs = [json.loads(line) for line in open(sys.argv[1])]
by = defaultdict(list)
modes, rows = [], []
for run in runs:
    by[(run["mode"], run["row"])].append(run)
    if run["mode"] not in modes:
        modes.append(run["mode"])
    if run["row"] not in rows:
        rows.append(run["row"])
rounds = max(run["round"] for run in runs)
base = "no subscriber"
print(f"\n### medians of {rounds} rounds\n")
print("| row | mode | IOPS | vs no subscriber | CPU us / request | clat mean us | clat p99 us | stream MiB | dropped |")
print("|---|---|---|---|---|---|---|---|---|")
for row in rows:
    for mode in modes:
        group = by[(mode, row)]
        median = lambda key: statistics.median(run[key] for run in group)
        ratio = median("iops") / statistics.median(run["iops"] for run in by[(base, row)])
        stream = f"{median('received_mib'):.1f}" if group[0]["dropped"] >= 0 else "-"
        dropped = str(sum(run["dropped"] for run in group)) if group[0]["dropped"] >= 0 else "-"
        print(f"| {row} | {mode} | {median('iops'):,.0f} | {ratio:.3f} | {median('cpu_us_per_request'):.1f} | "
              f"{median('clat_mean_us'):.1f} | {median('clat_p99_us'):.1f} | {stream} | {dropped} |")
print("\nIOPS per round (spread):")
for row in rows:
    for mode in modes:
        print(f"  {row} / {mode}: " + ", ".join(f"{run['iops']:,.0f}" for run in by[(mode, row)]))
EOF
