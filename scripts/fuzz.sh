#!/usr/bin/env bash
# Coverage-guided fuzzing with libFuzzer (libfuzzer-sys, on stable Rust, no sanitizer) of the
# handshake, the transmission phase (request decoder and request path) and the policy parser.
# Starts from the committed seeds in fuzz/seeds/TARGET (every one is run first); what the fuzzer
# finds goes to fuzz/corpus/TARGET (ignored by git) and is reused by the next run. A crash stops
# the run, leaves the input in fuzz/artifacts/TARGET/ and exits non-zero: turn it into a
# regression test beside the code it crashed (see docs/server.md, "Fuzzing").
#
#   bash scripts/fuzz.sh                    # every target, 30 s each (what CI runs)
#   bash scripts/fuzz.sh handshake 600      # one target, 10 minutes
#   bash scripts/fuzz.sh all 300            # every target, 5 minutes each
#   bash scripts/fuzz.sh build              # only build the targets
#   bash scripts/fuzz.sh repro policy fuzz/artifacts/policy/crash-...   # run one input again
#
# The targets are built with plain `cargo build` and the flags `cargo fuzz build --sanitizer none`
# (cargo-fuzz 0.13) passes, so cargo-fuzz need not be installed; `cargo fuzz` still works in
# fuzz/ for its other commands (tmin, cmin, coverage). Env: FUZZ_JOBS (targets fuzzed at once,
# default 1; each takes one core for its whole time).
set -euo pipefail
cd "$(dirname "$0")/.."

TARGETS=(handshake transmission policy)
# Inputs longer than this are cut: real options, request bursts and policies are far smaller,
# and short inputs keep executions fast.
MAX_LEN=8192
TRIPLE=$(rustc -vV | sed -n 's/^host: //p')
BIN_DIR=fuzz/target/$TRIPLE/release

# What cargo-fuzz 0.13 passes for `build --sanitizer none` in release mode on Linux (see its
# src/project.rs): SanitizerCoverage with 8-bit counters, the PC table, compare tracing and the
# stack depth for libFuzzer; no branch folding, so every branch stays a branch; one codegen unit
# (ThinLTO can inline across the instrumented code); `--cfg fuzzing`; line tables for
# backtraces. Flags from the environment's RUSTFLAGS come last, as with cargo-fuzz.
FLAGS=(-Cpasses=sancov-module
    -Cllvm-args=-sanitizer-coverage-level=4
    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters
    -Cllvm-args=-sanitizer-coverage-pc-table
    -Cllvm-args=-sanitizer-coverage-trace-compares
    --cfg fuzzing
    -Cllvm-args=-simplifycfg-branch-fold-threshold=0
    -Cllvm-args=-sanitizer-coverage-stack-depth
    -Ccodegen-units=1)

build() {
    # libFuzzer is C++: libfuzzer-sys builds it with the system's compiler.
    command -v c++ >/dev/null || { echo "fuzzing needs a C++ compiler: apt-get install g++" >&2; exit 1; }
    # The fuzz workspace builds the server with the versions main's lock file pins (plus
    # libFuzzer's own crates): its lock file is a copy, made fresh for every run, never committed.
    cp Cargo.lock fuzz/Cargo.lock
    RUSTFLAGS="${FLAGS[*]}${RUSTFLAGS:+ $RUSTFLAGS}" cargo build --manifest-path fuzz/Cargo.toml \
        --target "$TRIPLE" --release --config 'profile.release.debug="line-tables-only"' --bins
}

# Runs one target's binary on the arguments given, as `cargo fuzz run` does.
run_target() {
    local target=$1
    shift
    mkdir -p "fuzz/artifacts/$target"
    "$BIN_DIR/$target" -artifact_prefix="fuzz/artifacts/$target/" "$@"
}

known() {
    [[ " ${TARGETS[*]} " == *" $1 "* && -d fuzz/seeds/$1 ]] || {
        echo "no such target: $1 (targets: ${TARGETS[*]})" >&2
        exit 2
    }
}

# Fuzzes one target for a while; output in fuzz/TARGET.log, a summary (or the crash) on stderr.
fuzz_target() {
    local target=$1 seconds=$2 t0=$SECONDS runs
    mkdir -p "fuzz/corpus/$target"
    if ! run_target "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" \
        -max_total_time="$seconds" -max_len=$MAX_LEN -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"fuzz/$target.log" 2>&1; then
        tail -n 40 "fuzz/$target.log" >&2
        echo "==> $target FAILED: the input is in fuzz/artifacts/$target/; repeat it with" >&2
        echo "    bash scripts/fuzz.sh repro $target fuzz/artifacts/$target/FILE" >&2
        return 1
    fi
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "fuzz/$target.log" | grep -o '[0-9]*$' || true)
    echo "==> $target: ${runs:-?} runs in $((SECONDS - t0)) s, no crash; corpus $(find "fuzz/corpus/$target" -type f | wc -l) inputs" >&2
    rm -f "fuzz/$target.log"
}

case ${1:-all} in
build)
    build
    exit
    ;;
repro)
    target=${2:?usage: scripts/fuzz.sh repro TARGET INPUT}
    input=${3:?usage: scripts/fuzz.sh repro TARGET INPUT}
    known "$target"
    build
    run_target "$target" "$input"
    exit
    ;;
all) targets=("${TARGETS[@]}") ;;
*)
    known "$1"
    targets=("$1")
    ;;
esac
seconds=${2:-30}
jobs=${FUZZ_JOBS:-1}

started=$SECONDS
echo "==> building the fuzz targets (release, coverage instrumented)" >&2
build
echo "==> built in $((SECONDS - started)) s" >&2
status=0
pids=()
for target in "${targets[@]}"; do
    echo "==> fuzzing $target for $seconds s" >&2
    fuzz_target "$target" "$seconds" &
    pids+=($!)
    if ((${#pids[@]} >= jobs)); then
        wait "${pids[0]}" || status=1
        pids=("${pids[@]:1}")
    fi
done
for pid in "${pids[@]}"; do
    wait "$pid" || status=1
done
echo "==> fuzzing done in $((SECONDS - started)) s (status $status)" >&2
exit $status
