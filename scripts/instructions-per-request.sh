#!/usr/bin/env bash
# Counts the user-space instructions nbdfault runs per request under valgrind's callgrind: a
# measure that the machine's load does not move, for costs too small for fio to show on a shared
# machine (the policy engine's, the power gate's, the metrics').
#
#   scripts/instructions-per-request.sh [REQUESTS] [NBDFAULT_BINARY]
#
# For each fio row (4 KiB random writes and reads at QD1 and QD32, one connection, a 256 MiB file
# export on tmpfs), with no policy and with the 1,000-rule policy of bench-servers.sh that no
# request matches: the server starts under callgrind with instrumentation off, fio warms it up with 2,000
# requests, then instrumentation is switched on for REQUESTS more (default 20,000). Prints the
# instructions per request of the whole server and of the engine's decision (inclusive). At QD1
# every request takes the same path through the runtime, so the counts repeat to a few
# instructions; at QD32 they move by a few percent with how many requests each wake-up finds. Kernel time (system calls, copies) is not
# counted: compare with the CPU per request of bench-servers.sh for the whole cost.
set -euo pipefail
requests=${1:-20000}
repo=$(cd "$(dirname "$0")/.." && pwd)
nbdfault=${2:-${CARGO_TARGET_DIR:-$repo/target}/release/nbdfault}
# shellcheck source=scripts/lib/packages.sh
source "$repo/scripts/lib/packages.sh"
install_packages "${BENCH_PACKAGES[@]}"
# shellcheck source=scripts/lib/bench-policy.sh
source "$repo/scripts/lib/bench-policy.sh"
[[ -x $nbdfault ]] || cargo build --release --quiet -p nbdfault --manifest-path "$repo/Cargo.toml"

# shellcheck source=scripts/lib/bench-scratch.sh
source "$repo/scripts/lib/bench-scratch.sh"
# shellcheck source=scripts/lib/nbdfault-bin.sh
source "$repo/scripts/lib/nbdfault-bin.sh"
bench_scratch nbdfault-instructions
write_thousand_rule_policy "$work/policy.yaml"

# Instructions per request of one fio row against one server command line.
count() {
    local args=$1 policy=$2 port=$((20000 + RANDOM % 20000))
    local uri="nbd://127.0.0.1:$port/disk" out="$work/callgrind.out"
    rm -f "$out"*
    # shellcheck disable=SC2086 # $policy is empty or two words
    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out" \
        "$nbdfault" serve -q --listen "127.0.0.1:$port" --no-control --export "disk=file:$work/disk.img" $policy \
        >/dev/null 2>"$work/valgrind.log" &
    server_pid=$!
    wait_for_nbd "$uri" "nbdfault serve under callgrind" 600
    # shellcheck disable=SC2086 # the row's arguments are meant to split
    fio --name=warm --ioengine=nbd --uri="$uri" --size=256M --number_ios=2000 $args >/dev/null
    callgrind_control -i on "$server_pid" >/dev/null 2>&1
    # shellcheck disable=SC2086
    fio --name=count --ioengine=nbd --uri="$uri" --size=256M --number_ios="$requests" $args >/dev/null
    callgrind_control -i off "$server_pid" >/dev/null 2>&1
    callgrind_control -d "$server_pid" >/dev/null 2>&1
    kill "$server_pid"
    wait "$server_pid" 2>/dev/null || true
    server_pid=
    # The whole server, and the engine's decision alone (inclusive).
    callgrind_annotate --inclusive=yes "$out".1 2>/dev/null | awk -v n="$requests" '
        /PROGRAM TOTALS/ { gsub(",", "", $1); total = $1 }
        /nbdfault_policies::engine::Engine::decide[^:]/ && !decide { gsub(",", "", $1); decide = $1 }
        END { printf "%d %d\n", total / n, decide / n }'
}

echo "| row | per request, no policy | per request, 1,000 rules | difference | in Engine::decide, no policy | in Engine::decide, 1,000 rules |"
echo "|---|---|---|---|---|---|"
for row in "4k randwrite QD1|--rw=randwrite --bs=4k --iodepth=1" "4k randread QD1|--rw=randread --bs=4k --iodepth=1" \
    "4k randwrite QD32|--rw=randwrite --bs=4k --iodepth=32" "4k randread QD32|--rw=randread --bs=4k --iodepth=32"; do
    read -r plain plain_decide < <(count "${row#*|}" "")
    read -r rules rules_decide < <(count "${row#*|}" "--policy disk=$work/policy.yaml")
    difference=$(awk -v a="$plain" -v b="$rules" 'BEGIN { printf "%+d (%+.1f%%)", b - a, (b / a - 1) * 100 }')
    echo "| ${row%%|*} | $plain | $rules | $difference | $plain_decide | $rules_decide |"
done
