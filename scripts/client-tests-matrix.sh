#!/usr/bin/env bash
# The kernel matrix CI runs: Debian kernels 5.10 (bullseye), 6.1 (bookworm), 6.12 (trixie) and the
# newest one Debian ships in unstable (sid, 7.x), each booted in qemu with XFS and ext4 tested on
# nbdfault. Writes the JSON reports to client-tests/results/ and regenerates docs/results.md from
# them. Then boots sid's kernel once more the way a kernel developer boots their own build
# (--vmlinuz and --modules of an unpacked tree), to prove that path. Exits non-zero when a
# guaranteed invariant was violated or a check could not be carried out.
#
#   bash scripts/client-tests-matrix.sh
#   KERNELS="6.1 7.2" bash scripts/client-tests-matrix.sh
#   CUSTOM_KERNEL="" bash scripts/client-tests-matrix.sh   # skip the --vmlinuz/--modules run
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/packages.sh
source scripts/lib/packages.sh
# shellcheck source=scripts/lib/client-tests.sh
source scripts/lib/client-tests.sh

read -r -a kernels <<<"${KERNELS:-5.10 6.1 6.12 sid}"
custom_kernel=${CUSTOM_KERNEL-sid}
results=client-tests/results
started=$SECONDS
install_packages "${CLIENT_TEST_PACKAGES[@]}"
build_client_tests
bin=$CLIENT_TESTS_BIN/nbdfault-client-tests
# The matrix shows the current kernels only: reports of older builds go.
mkdir -p "$results"
rm -f "$results"/*.json "$results"/*.log
status=0
times=()
for kernel in "${kernels[@]}"; do
    echo "==> kernel $kernel" >&2
    t0=$SECONDS
    "$bin" vm --kernel "$kernel" --fs all --out "$results" || status=1
    times+=("$kernel $((SECONDS - t0)) s")
    echo "==> kernel $kernel took $((SECONDS - t0)) s" >&2
done
"$bin" matrix --results "$results" --output docs/results.md --made-by "scripts/client-tests-matrix.sh"

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
echo "==> matrix done in $((SECONDS - started)) s (status $status); docs/results.md regenerated" >&2
exit $status
