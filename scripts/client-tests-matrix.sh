#!/usr/bin/env bash
# The kernel matrix CI runs: Debian kernels 5.10 (bullseye), 6.1 (bookworm), 6.12 (trixie) and the
# newest one Debian ships in unstable (sid, 7.x), each booted in qemu with XFS and ext4 tested on
# nbdfault. Then boots sid's kernel once more the way a kernel developer boots their own build
# (--vmlinuz and --modules of an unpacked tree), to prove that path.
#
# The run's JSON reports and its Markdown matrix go to target/client-tests/ (ignored by git);
# then its verdicts are compared with the committed ones (client-tests/results/*.json, which
# docs/results.md shows): a verdict that changed, or a kernel or check on one side only, fails
# the run naming each cell (kernel, filesystem, check, old -> new). Timings and evidence do not
# count. Some verdicts vary between runs of one kernel (a race inside it: btrfs on 7.2 sometimes
# reports an O_DIRECT write whose data failed as written), so when the first run differs, the same
# kernels are run once more: the run fails if the second one differs too, and otherwise says
# loudly which verdicts varied. Also exits non-zero when a guaranteed invariant was violated or
# a check could not be carried out.
#
# With --refresh, the run's reports replace the committed ones (of the kernels it ran) and
# docs/results.md is regenerated from them: commit both. Nothing else changes them.
#
#   bash scripts/client-tests-matrix.sh                 # run and compare (CI)
#   bash scripts/client-tests-matrix.sh --refresh       # run, then rewrite the committed matrix
#   KERNELS="6.1 7.2" bash scripts/client-tests-matrix.sh
#   CUSTOM_KERNEL="" bash scripts/client-tests-matrix.sh   # skip the --vmlinuz/--modules run
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
*)
    echo "usage: bash scripts/client-tests-matrix.sh [--refresh]" >&2
    exit 2
    ;;
esac
# A run of chosen kernels leaves the other committed columns alone.
partial=()
[[ -n ${KERNELS:-} ]] && partial=(--partial)
read -r -a kernels <<<"${KERNELS:-5.10 6.1 6.12 sid}"
custom_kernel=${CUSTOM_KERNEL-sid}
committed=client-tests/results
out=${CARGO_TARGET_DIR:-target}/client-tests
results=$out/results
started=$SECONDS
install_packages "${CLIENT_TEST_PACKAGES[@]}"
build_client_tests
bin=$CLIENT_TESTS_BIN/nbdfault-client-tests
rm -rf "$results"
mkdir -p "$results"
status=0
times=()
for kernel in "${kernels[@]}"; do
    echo "==> kernel $kernel" >&2
    t0=$SECONDS
    "$bin" vm --kernel "$kernel" --fs all --out "$results" || status=1
    times+=("$kernel $((SECONDS - t0)) s")
    echo "==> kernel $kernel took $((SECONDS - t0)) s" >&2
done
"$bin" matrix --results "$results" --output "$out/results.md" --made-by "bash scripts/client-tests-matrix.sh"

if [[ -n $custom_kernel ]]; then
    echo "==> kernel $custom_kernel as a developer's build: vm --vmlinuz --modules" >&2
    t0=$SECONDS
    tree=$(mktemp -d)
    trap 'rm -rf "$tree"' EXIT
    listing=$("$bin" kernel --kernel "$custom_kernel" --extract "$tree/root")
    vmlinuz=$(sed -n 's/^vmlinuz //p' <<<"$listing")
    modules=$(sed -n 's/^modules-dir //p' <<<"$listing")
    if "$bin" vm --vmlinuz "$vmlinuz" --modules "$modules" --fs xfs --only views --out "$tree/out"; then
        release=$(basename "$modules")
        # The report must come from the kernel we handed over, by its own uname -r.
        if ! grep -q "\"release\": \"$release\"" "$tree"/out/*-xfs.json; then
            echo "==> the --vmlinuz run reported another kernel than $release" >&2
            status=1
        fi
    else
        status=1
    fi
    times+=("$custom_kernel via --vmlinuz/--modules (views, xfs) $((SECONDS - t0)) s")
fi
printf '==> time per kernel: %s\n' "${times[@]}" >&2

if $refresh; then
    "$bin" compare --committed "$committed" --run "$results" "${partial[@]}" || true
    # A full run shows the current kernels only: reports of older builds go. A partial run
    # replaces the reports of the kernel series it ran (same major.minor and filesystem).
    if ((${#partial[@]})); then
        for report in "$results"/*.json; do
            name=$(basename "$report")          # 6.1.193-xfs.json
            series=$(cut -d. -f1-2 <<<"$name") # 6.1
            rm -f "$committed/$series".[0-9]*-"${name##*-}"
        done
    else
        rm -f "$committed"/*.json
    fi
    cp "$results"/*.json "$committed/"
    "$bin" matrix --results "$committed" --output docs/results.md
    echo "==> matrix done in $((SECONDS - started)) s (status $status); $committed/ and docs/results.md refreshed: commit them" >&2
elif ! "$bin" compare --committed "$committed" --run "$results" "${partial[@]}"; then
    echo "==> verdicts differ from the committed ones: the same kernels once more, to tell a change from a verdict that varies" >&2
    rerun=$out/results-rerun
    rm -rf "$rerun"
    mkdir -p "$rerun"
    for kernel in "${kernels[@]}"; do
        "$bin" vm --kernel "$kernel" --fs all --out "$rerun" || status=1
    done
    if "$bin" compare --committed "$committed" --run "$rerun" "${partial[@]}"; then
        echo "==> WARNING: the differences above did not show again: those verdicts vary between runs of the same kernel" >&2
    else
        status=1
    fi
    echo "==> matrix done in $((SECONDS - started)) s (status $status); the first run's matrix: $out/results.md" >&2
else
    echo "==> matrix done in $((SECONDS - started)) s (status $status); this run's matrix: $out/results.md" >&2
fi
exit $status
