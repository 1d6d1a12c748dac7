#!/usr/bin/env bash
# Coverage-guided fuzzing with libFuzzer (cargo fuzz, on stable Rust with --sanitizer none) of the
# handshake, the transmission phase (request decoder and request path) and the policy parser.
# Starts from the committed seeds in fuzz/seeds/TARGET; what the fuzzer finds goes to
# fuzz/corpus/TARGET (ignored by git) and is reused by the next run. A crash stops the run,
# leaves the input in fuzz/artifacts/TARGET/ and exits non-zero: turn it into a regression test
# beside the code it crashed (see docs/server.md, "Fuzzing").
#
#   bash scripts/fuzz.sh                    # every target, 30 s each (what CI runs)
#   bash scripts/fuzz.sh handshake 600      # one target, 10 minutes
#   bash scripts/fuzz.sh all 300            # every target, 5 minutes each
#   bash scripts/fuzz.sh repro policy fuzz/artifacts/policy/crash-...   # run one input again
set -euo pipefail
cd "$(dirname "$0")/.."

TARGETS=(handshake transmission policy)
CARGO_FUZZ_VERSION=0.13.2
# Inputs longer than this are cut: real options, request bursts and policies are far smaller,
# and short inputs keep executions fast.
MAX_LEN=8192

if ! cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
    echo "==> installing cargo-fuzz $CARGO_FUZZ_VERSION" >&2
    cargo install --locked cargo-fuzz --version "$CARGO_FUZZ_VERSION"
fi
# libFuzzer is C++: libfuzzer-sys builds it with the system's compiler.
command -v c++ >/dev/null || { echo "fuzzing needs a C++ compiler: apt-get install g++" >&2; exit 1; }

fuzz() { (cd fuzz && cargo fuzz "$@"); }
# The fuzz workspace builds the server with the versions main's lock file pins (plus libFuzzer's
# own crates): its lock file is a copy, made fresh for every run and never committed.
cp Cargo.lock fuzz/Cargo.lock

if [[ ${1:-} == repro ]]; then
    target=${2:?usage: scripts/fuzz.sh repro TARGET INPUT}
    input=$(realpath "${3:?usage: scripts/fuzz.sh repro TARGET INPUT}")
    fuzz run --sanitizer none "$target" "$input"
    exit
fi

what=${1:-all}
seconds=${2:-30}
if [[ $what == all ]]; then targets=("${TARGETS[@]}"); else targets=("$what"); fi

started=$SECONDS
echo "==> building the fuzz targets (release, coverage instrumented)" >&2
fuzz build --sanitizer none
echo "==> built in $((SECONDS - started)) s" >&2
for target in "${targets[@]}"; do
    [[ -d fuzz/seeds/$target ]] || { echo "no such target: $target (targets: ${TARGETS[*]})" >&2; exit 2; }
    mkdir -p "fuzz/corpus/$target"
    t0=$SECONDS
    echo "==> fuzzing $target for $seconds s" >&2
    if ! fuzz run --sanitizer none "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$seconds" -max_len=$MAX_LEN -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"fuzz/$target.log" 2>&1; then
        tail -n 40 "fuzz/$target.log" >&2
        echo "==> $target FAILED: the input is in fuzz/artifacts/$target/; repeat it with" >&2
        echo "    bash scripts/fuzz.sh repro $target fuzz/artifacts/$target/FILE" >&2
        exit 1
    fi
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "fuzz/$target.log" | grep -o '[0-9]*$' || true)
    echo "==> $target: ${runs:-?} runs in $((SECONDS - t0)) s, no crash; corpus $(find "fuzz/corpus/$target" -type f | wc -l) inputs" >&2
    rm -f "fuzz/$target.log"
done
echo "==> fuzzing done in $((SECONDS - started)) s" >&2
