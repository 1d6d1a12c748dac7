#!/usr/bin/env bash
# The kernel matrix CI runs: Debian kernels 5.10 (bullseye), 6.1 (bookworm) and 6.12 (trixie),
# each booted in qemu with XFS and ext4 tested on nbdfault.
#
# The run's JSON reports and its Markdown matrix go to target/client-tests/ (ignored by git),
# then its verdicts are compared with the committed ones (client-tests/results/*.json, which
# docs/results.md shows): a verdict that changed, or a kernel or check on one side only, fails
# the run naming each cell (kernel, filesystem, check, old -> new). Timings and evidence do not
# count. Also exits non-zero when a guaranteed invariant was violated or a check could not be
# carried out.
#
# With --refresh, the run's reports replace the committed ones (for the kernels it ran) and
# docs/results.md is regenerated from them: commit both. That is the only way they change.
#
#   bash scripts/client-tests-matrix.sh                 # run and compare (CI)
#   bash scripts/client-tests-matrix.sh --refresh       # run and rewrite the committed matrix
#   KERNELS="6.1 6.16" bash scripts/client-tests-matrix.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/packages.sh
source scripts/lib/packages.sh
# shellcheck source=scripts/lib/client-tests.sh
source scripts/lib/client-tests.sh

refresh=false
case ${1:-} in
"") ;;
--refresh) refresh=true ;;
*) echo "usage: bash scripts/client-tests-matrix.sh [--refresh]" >&2; exit 2 ;;
esac
partial=()
[[ -n ${KERNELS:-} ]] && partial=(--partial)
read -r -a kernels <<<"${KERNELS:-5.10 6.1 6.12}"
committed=client-tests/results
out=${CARGO_TARGET_DIR:-target}/client-tests
results=$out/results
started=$SECONDS
install_packages "${CLIENT_TEST_PACKAGES[@]}"
build_client_tests
rm -rf "$results"
mkdir -p "$results"
status=0
for kernel in "${kernels[@]}"; do
    echo "==> kernel $kernel" >&2
    t0=$SECONDS
    "$CLIENT_TESTS_BIN/nbdfault-client-tests" vm --kernel "$kernel" --fs all --out "$results" || status=1
    echo "==> kernel $kernel took $((SECONDS - t0)) s" >&2
done
"$CLIENT_TESTS_BIN/nbdfault-client-tests" matrix --results "$results" --output "$out/results.md" \
    --made-by "bash scripts/client-tests-matrix.sh"

if $refresh; then
    "$CLIENT_TESTS_BIN/nbdfault-client-tests" compare --committed "$committed" --run "$results" "${partial[@]}" || true
    # A full run shows the current kernels only: reports of older builds go. A partial run
    # replaces the reports of the kernel series it ran (same major.minor and filesystem).
    if ((${#partial[@]})); then
        for report in "$results"/*.json; do
            name=$(basename "$report")            # 6.1.193-xfs.json
            series=$(cut -d. -f1-2 <<<"$name")   # 6.1
            rm -f "$committed/$series".[0-9]*-"${name##*-}"
        done
    else
        rm -f "$committed"/*.json
    fi
    cp "$results"/*.json "$committed/"
    "$CLIENT_TESTS_BIN/nbdfault-client-tests" matrix --results "$committed" --output docs/results.md
    echo "==> matrix done in $((SECONDS - started)) s (status $status); $committed and docs/results.md refreshed: commit them" >&2
else
    "$CLIENT_TESTS_BIN/nbdfault-client-tests" compare --committed "$committed" --run "$results" "${partial[@]}" || status=1
    echo "==> matrix done in $((SECONDS - started)) s (status $status); this run's matrix: $out/results.md" >&2
fi
exit $status
