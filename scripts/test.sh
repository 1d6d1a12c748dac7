#!/usr/bin/env bash
# Runs every test nbdfault has, the way CI does (.ci/run calls exactly this), on Debian 12 as root.
# Installs what it needs first. The lints and the unit and integration tests run only inside a
# clean Debian 12 root that holds nothing but what scripts/lib/packages.sh installs
# (scripts/clean-root.sh), with NBDFAULT_REQUIRE_TOOLS=1, so a test whose tool no package list
# names fails here on every machine. The static binaries that root builds and tests are the ones
# the kernel matrix and the TLS boot then run on this machine. Leaves the checkout as it found it:
# results and logs go under target/.
#
# The commit under test is HEAD (the clean root clones it): commit first.
#
# Two cores go furthest when downloads overlap compiling: while the clean root is prepared and
# builds, the fuzz targets build and this machine's packages install in the background (logs in
# target/test-logs/). Each stage prints its time and the load average when it ends, and a table
# of them all at the end.
#
#   bash scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/packages.sh
source scripts/lib/packages.sh

LOGS=target/test-logs
BIN=target/test-bin
mkdir -p "$LOGS"
started=$SECONDS
STAGE=""
STAGE_STARTED=$SECONDS
TIMES=()

load() { cut -d' ' -f1-3 /proc/loadavg; }
# CPU seconds used by this script's children that have ended (their user and system time, from
# /proc/PID/stat): with the time on the clock, it tells how busy a stage kept the cores.
children_cpu() {
    local stat
    stat=$(<"/proc/$$/stat")
    read -r -a fields <<<"${stat##*) }"
    echo $(((fields[13] + fields[14]) / $(getconf CLK_TCK)))
}
STAGE_CPU=0
end_stage() {
    [[ -n $STAGE ]] || return 0
    local took=$((SECONDS - STAGE_STARTED)) cpu=$(($(children_cpu) - STAGE_CPU))
    printf '<== %d s, %d s of CPU (load %s): %s\n' "$took" "$cpu" "$(load)" "$STAGE" >&2
    TIMES+=("$(printf '%5d s  %5d s CPU  %s' "$took" "$cpu" "$STAGE")")
    STAGE=""
}
step() {
    end_stage
    STAGE=$1
    STAGE_STARTED=$SECONDS
    STAGE_CPU=$(children_cpu)
    printf '\n==> %s (at %d s, load %s)\n' "$*" "$((SECONDS - started))" "$(load)" >&2
}

# Background jobs: name -> pid, each in a process group of its own (its pid); output in
# target/test-logs/NAME.log, its time in NAME.time.
declare -A JOBS=()
background() {
    local name=$1
    shift
    # shellcheck disable=SC2016 # expanded by the job's shell
    setsid bash -c 't0=$SECONDS; status=0; "${@:3}" >"$1" 2>&1 || status=$?; echo $((SECONDS - t0)) >"$2"; exit $status' \
        job "$LOGS/$name.log" "$LOGS/$name.time" "$@" &
    JOBS[$name]=$!
    printf '    %s started in the background (log %s)\n' "$name" "$LOGS/$name.log" >&2
}
join() {
    local name=$1 status=0
    wait "${JOBS[$name]}" || status=$?
    unset "JOBS[$name]"
    if ((status != 0)); then
        tail -n 40 "$LOGS/$name.log" >&2
        printf 'FAILED: %s (background, status %d; log above, whole in %s)\n' "$name" "$status" "$LOGS/$name.log" >&2
        exit 1
    fi
    printf '    %s (background) took %s s\n' "$name" "$(cat "$LOGS/$name.time")" >&2
    TIMES+=("$(printf '%5d s             %s (background; its CPU counts in the stage that waited for it)' "$(cat "$LOGS/$name.time")" "$name")")
}
# On the way out (a failure, Ctrl-C): builds still running are stopped; a package installation is
# waited for, since stopping dpkg midway would leave the machine's packages half configured.
stop_jobs() {
    local name
    for name in "${!JOBS[@]}"; do
        if [[ $name == host-packages ]]; then
            echo "    waiting for the package installation to finish" >&2
        else
            kill -TERM -- "-${JOBS[$name]}" 2>/dev/null || true
        fi
        wait "${JOBS[$name]}" 2>/dev/null || true
    done
}
trap stop_jobs EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

step "format"
cargo fmt --all --check

step "packages needed at once: debootstrap (the clean root), g++ (libFuzzer)"
install_packages debootstrap "${FUZZ_PACKAGES[@]}"
background fuzz-build env -u CARGO_BUILD_TARGET -u RUSTFLAGS bash scripts/fuzz.sh build
# This machine's packages beyond those: the kernel matrix's (qemu and the rest), and the Docker
# smoke test's, downloaded now and installed by the smoke test itself.
# shellcheck disable=SC2016 # expanded by the job's shell
background host-packages bash -c 'source scripts/lib/packages.sh && source scripts/lib/client-tests.sh &&
    install_packages "${CLIENT_TEST_PACKAGES[@]}" && bash docker/ci-smoke-test.sh --download-packages'

step "lints, then unit and integration tests (real clients against the real server), in a clean Debian 12 root"
bash scripts/clean-root.sh --lints --copy-binaries "$BIN"

step "coverage-guided fuzzing: handshake, transmission, policy parser, 30 s each, two at a time"
join fuzz-build
join host-packages
FUZZ_JOBS=2 env -u CARGO_BUILD_TARGET -u RUSTFLAGS bash scripts/fuzz.sh all 30

step "every scenario in the library is a valid policy"
"$BIN/nbdfault" policy check policies/scenarios/*.yaml

# The matrix and the TLS boot run the static binaries the clean root built and tested.
export CLIENT_TESTS_PREBUILT=$BIN
step "the writeback-error oracle on XFS, ext4 and btrfs, kernels 5.10, 6.1, 6.12 and sid (7.x) in qemu, and a --vmlinuz/--modules boot; verdicts compared with the committed matrix"
bash scripts/client-tests-matrix.sh

step "the kernel's nbd-client over TLS with a client certificate, kernel 6.1 in qemu"
"$BIN/nbdfault-client-tests" vm-tls --kernel 6.1

step "a device-wide power cut met by the kernel's nbd-client -C 2, kernel 6.1 in qemu"
"$BIN/nbdfault-client-tests" vm-power-cut --kernel 6.1

step "the Docker image: built from the Dockerfile, run, attached, faulted, stopped; compose"
bash docker/ci-smoke-test.sh

step "the checkout is as the tests found it"
if [[ -n $(git status --porcelain) ]]; then
    echo "the tests left the checkout changed; results and logs belong under target/:" >&2
    git status --short >&2
    exit 1
fi
end_stage
printf '\nStages:\n' >&2
printf '%s\n' "${TIMES[@]}" >&2
printf '\n==> all tests passed in %d s (load %s)\n' "$((SECONDS - started))" "$(load)" >&2
