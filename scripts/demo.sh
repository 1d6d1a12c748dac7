#!/usr/bin/env bash
# The demo: boot a Debian kernel in qemu (software emulation), attach it with the real nbd-client
# to an nbdfault server on this machine, make XFS writeback fail on exactly one file's blocks, and
# tell in plain words what an mmap'd page, read() and the server's disk showed. Installs what it
# needs; Debian 12, as root.
#
#   bash scripts/demo.sh                 # kernel 5.10 (bullseye): also shows the 2020 thread's bug
#   KERNEL=6.12 bash scripts/demo.sh     # any Debian kernel version
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/packages.sh
source scripts/lib/packages.sh
# shellcheck source=scripts/lib/client-tests.sh
source scripts/lib/client-tests.sh

kernel=${KERNEL:-5.10}
out=${OUT:-nbdfault-results/demo}
install_packages "${CLIENT_TEST_PACKAGES[@]}"
build_client_tests
"$CLIENT_TESTS_BIN/nbdfault-client-tests" vm --kernel "$kernel" --fs xfs \
    --only views,errseq-fsync,submission --story --out "$out"
