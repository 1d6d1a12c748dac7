#!/usr/bin/env bash
# NBD read latency while policies are swapped in a loop, or large export views are read in a
# loop, next to the same reads with a quiet control API.
# A benchmark, not a test: docs/performance.md records a run and how to read it.
#
#   scripts/bench-policy-swaps.sh [ROUNDS] [SECONDS_PER_RUN]
#   NBDFAULT_BIN=/path/to/nbdfault scripts/bench-policy-swaps.sh ...   # another build
#
# One release server (a 256 MiB memory export) for the whole run. Each round runs, in turn:
#   quiet  one libnbd client reads 4 KiB at random offsets, one request after the other;
#   swaps  the same, while a loop PUTs, one after the other, a valid 10,000-rule policy (850 KB),
#          `rules: [[[...` 80,000 deep and an alias bomb (5,000 aliases to 5,000 ranges), the
#          inputs that froze every read before the control plane moved off the data path;
#   views  the same, with a 10,000-rule policy that matches no read installed, while a loop GETs,
#          one after the other, the export's view (1.4 MB of JSON: the policy's source, a counter
#          per rule) and /metrics, what the live page and a Prometheus scraper ask for.
# Rounds interleave the three, so a load spike hits each; the table gives medians over rounds of
# each run's p50, p99 and largest latency, and the control requests done. The load average is
# printed.
set -euo pipefail

rounds=${1:-5}
seconds=${2:-10}
repo=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/lib/packages.sh
source "$repo/scripts/lib/packages.sh"
install_packages "${SERVER_TEST_PACKAGES[@]}"

work=$(mktemp -d "${TMPDIR:-/tmp}/nbdfault-swaps.XXXXXX")
server_pid=
swapper_pid=
cleanup() {
    [[ -n $swapper_pid ]] && kill "$swapper_pid" 2>/dev/null
    [[ -n $server_pid ]] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

# shellcheck source=scripts/lib/nbdfault-bin.sh
source "$repo/scripts/lib/nbdfault-bin.sh"
nbdfault_binary

/usr/bin/python3 - "$work" <<'EOF'
import sys
work = sys.argv[1]
with open(f"{work}/valid.yaml", "w") as f:
    f.write("rules:\n  - name: all-reads\n    when: { op: read }\n    then: { delay: 1ms }\n")
    for i in range(10000):
        f.write(f"  - name: rule-{i}\n    when: {{ op: write, range: {i}MiB..+4KiB }}\n    then: {{ error: EIO }}\n")
with open(f"{work}/views.yaml", "w") as f:
    f.write("rules:\n")
    for i in range(10000):
        f.write(f"  - name: rule-{i}\n    when: {{ op: write, range: {i}MiB..+4KiB }}\n    then: {{ error: EIO }}\n")
with open(f"{work}/nested.yaml", "w") as f:
    f.write("rules: " + "[" * 80000 + "]" * 80000 + "\n")
with open(f"{work}/bomb.yaml", "w") as f:
    ranges = ", ".join(f"{i}s..+1s" for i in range(5000))
    f.write(f"rules:\n  - name: anchor\n    when: {{ range: &ranges [{ranges}] }}\n    then: {{}}\n")
    for i in range(5000):
        f.write(f"  - {{ name: r{i}, when: {{ range: *ranges }}, then: {{}} }}\n")
EOF

"$nbdfault" serve -q --listen 127.0.0.1:0 --control 127.0.0.1:0 --export disk=memory:256MiB \
    >"$work/ready" 2>"$work/stderr" &
server_pid=$!
for _ in $(seq 100); do [[ -s $work/ready ]] && break; sleep 0.1; done
ready=$(head -1 "$work/ready")
nbd=$(/usr/bin/python3 -c 'import json,sys; print(json.loads(sys.argv[1])["nbd"][0])' "$ready")
control=$(/usr/bin/python3 -c 'import json,sys; print(json.loads(sys.argv[1])["control"])' "$ready")
uri="nbd://$nbd/disk"
policy_url="http://$control/v1/exports/disk/policy"
view_url="http://$control/v1/exports/disk"
metrics_url="http://$control/metrics"

swap_loop() {
    local swaps=0
    while [[ ! -e $work/stop ]]; do
        for file in valid nested bomb; do
            curl -s -o /dev/null -X PUT --data-binary "@$work/$file.yaml" "$policy_url" || true
            swaps=$((swaps + 1))
        done
    done
    echo "$swaps" >"$work/swaps"
}

view_loop() {
    local views=0
    while [[ ! -e $work/stop ]]; do
        curl -s -o /dev/null "$view_url" || true
        curl -s -o /dev/null "$metrics_url" || true
        views=$((views + 2))
    done
    echo "$views" >"$work/swaps"
}

echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
results=$work/results.jsonl
for round in $(seq "$rounds"); do
    for mode in quiet swaps views; do
        rm -f "$work/stop" "$work/swaps"
        case $mode in
        swaps) swap_loop & ;;
        views)
            curl -sf -o /dev/null -X PUT --data-binary "@$work/views.yaml" "$policy_url"
            view_loop &
            ;;
        esac
        [[ $mode == quiet ]] || swapper_pid=$!
        line=$(/usr/bin/python3 "$repo/server/tests/python/nbd_probe.py" read-latency "$uri" "$seconds")
        swaps=0
        if [[ $mode != quiet ]]; then
            touch "$work/stop"
            wait "$swapper_pid"
            swapper_pid=
            swaps=$(cat "$work/swaps")
            curl -s -o /dev/null -X DELETE "$policy_url"
        fi
        echo "{\"round\": $round, \"mode\": \"$mode\", \"swaps\": $swaps, \"latency\": $line}" >>"$results"
    done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"

/usr/bin/python3 - "$results" "$rounds" "$seconds" <<'EOF'
import json, statistics, sys
runs = [json.loads(line) for line in open(sys.argv[1])]
print(f"\n{sys.argv[2]} rounds of {sys.argv[3]} s per mode, medians over rounds\n")
print("| mode | reads | p50 ms | p99 ms | max ms | control requests done |")
print("| --- | --- | --- | --- | --- | --- |")
for mode in ("quiet", "swaps", "views"):
    rows = [run for run in runs if run["mode"] == mode]
    med = lambda key: statistics.median(run["latency"][key] for run in rows)
    swaps = statistics.median(run["swaps"] for run in rows)
    print(f"| {mode} | {med('reads'):.0f} | {med('p50_ms'):.3f} | {med('p99_ms'):.3f} | {med('max_ms'):.1f} | {swaps:.0f} |")
EOF
