#!/usr/bin/env bash
# The kernel matrix CI runs: Debian kernels 5.10 (bullseye), 6.1 (bookworm) and 6.12 (trixie),
# each booted in qemu with XFS and ext4 tested on nbdfault. Writes the JSON reports to
# client-tests/results/ and regenerates docs/results.md from them. Exits non-zero when a
# guaranteed invariant was violated or a check could not be carried out.
#
#   bash scripts/client-tests-matrix.sh
#   KERNELS="6.1 6.16" bash scripts/client-tests-matrix.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/packages.sh
source scripts/lib/packages.sh
# shellcheck source=scripts/lib/client-tests.sh
source scripts/lib/client-tests.sh

read -r -a kernels <<<"${KERNELS:-5.10 6.1 6.12}"
results=client-tests/results
started=$SECONDS
install_packages "${CLIENT_TEST_PACKAGES[@]}"
build_client_tests
# The matrix shows the current kernels only: reports of older builds go.
mkdir -p "$results"
rm -f "$results"/*.json "$results"/*.log
status=0
for kernel in "${kernels[@]}"; do
    echo "==> kernel $kernel" >&2
    t0=$SECONDS
    "$CLIENT_TESTS_BIN/nbdfault-client-tests" vm --kernel "$kernel" --fs all --out "$results" || status=1
    echo "==> kernel $kernel took $((SECONDS - t0)) s" >&2
done
"$CLIENT_TESTS_BIN/nbdfault-client-tests" matrix --results "$results" --output docs/results.md \
    --made-by "scripts/client-tests-matrix.sh"
echo "==> matrix done in $((SECONDS - started)) s (status $status); docs/results.md regenerated" >&2
exit $status
