#!/usr/bin/env bash
# Profiles nbdfault serving fio's 4k random writes at QD32 (file export, image on tmpfs) with
# `perf record -e cpu-clock` and draws a flame graph SVG with inferno.
#
#   scripts/profile-server.sh OUTPUT.svg [NBDFAULT_BINARY]
#
# inferno comes from crates.io into ~/.cache/nbdfault/inferno (never into the repository).
set -euo pipefail
output=$1
repo=$(cd "$(dirname "$0")/.." && pwd)
nbdfault=${2:-${CARGO_TARGET_DIR:-$repo/target}/release/nbdfault}
# shellcheck source=scripts/lib/packages.sh
source "$repo/scripts/lib/packages.sh"
install_packages "${BENCH_PACKAGES[@]}"
inferno=$HOME/.cache/nbdfault/inferno
[[ -x $inferno/bin/inferno-flamegraph ]] || cargo install inferno --locked --root "$inferno"

# shellcheck source=scripts/lib/bench-scratch.sh
source "$repo/scripts/lib/bench-scratch.sh"
bench_scratch nbdfault-profile
port=$((20000 + RANDOM % 20000))
"$nbdfault" serve -q --listen "127.0.0.1:$port" --no-control --export "disk=file:$work/disk.img" >/dev/null &
server_pid=$!
# shellcheck source=scripts/lib/nbdfault-bin.sh
source "$repo/scripts/lib/nbdfault-bin.sh"
wait_for_nbd "nbd://127.0.0.1:$port/disk" "$nbdfault serve"
fio --name=profile --ioengine=nbd --uri="nbd://127.0.0.1:$port/disk" --size=256M --rw=randwrite --bs=4k \
    --iodepth=32 --time_based --runtime=7 >/dev/null &
fio_pid=$!
sleep 1
perf record -e cpu-clock -F 499 --call-graph dwarf,16384 -p "$server_pid" -o "$work/perf.data" -- sleep 5 2>/dev/null
wait "$fio_pid"
perf script -i "$work/perf.data" 2>/dev/null | "$inferno/bin/inferno-collapse-perf" >"$work/folded"
"$inferno/bin/inferno-flamegraph" --title "nbdfault: fio 4k randwrite QD32, file on tmpfs" <"$work/folded" >"$output"
echo "wrote $output" >&2
