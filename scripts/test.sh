#!/usr/bin/env bash
# Runs every test nbdfault has, the way CI does (.ci/run calls exactly this), on Debian 12 as root.
# Installs what it needs first. The unit and integration tests run only inside a clean Debian 12
# root that holds nothing but what scripts/lib/packages.sh installs (scripts/clean-root.sh), with
# NBDFAULT_REQUIRE_TOOLS=1, so a test whose tool no package list names fails here on every
# machine. The kernel matrix and the Docker smoke test run on this machine. Leaves the checkout
# as it found it: results and logs go under target/.
#
#   bash scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/packages.sh
source scripts/lib/packages.sh
# shellcheck source=scripts/lib/client-tests.sh
source scripts/lib/client-tests.sh

step() { printf '\n==> %s (%d s)\n' "$*" "$((SECONDS - started))" >&2; }
started=$SECONDS

# The VM's guest needs static binaries: lints, the policy check and the matrix share one static
# build here, and the clean root builds the tests with the same flags. With an explicit target,
# build scripts and proc macros stay dynamic.
export CARGO_BUILD_TARGET=x86_64-unknown-linux-gnu
export RUSTFLAGS='-C target-feature=+crt-static'

step "packages (the kernel matrix's and the fuzzers'; the tests install their own in the clean root)"
install_packages "${CLIENT_TEST_PACKAGES[@]}" "${FUZZ_PACKAGES[@]}"

step "format and lints"
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings

step "unit and integration tests (real clients against the real server), in a clean Debian 12 root"
bash scripts/clean-root.sh

step "coverage-guided fuzzing: handshake, transmission, policy parser, 30 s each (build included, about 5 min)"
# Its own build (release, instrumented, in fuzz/target) and not the static one above.
env -u CARGO_BUILD_TARGET -u RUSTFLAGS bash scripts/fuzz.sh all 30

step "every scenario in the library is a valid policy"
cargo run --quiet --locked -p nbdfault -- policy check policies/scenarios/*.yaml

step "the writeback-error oracle on XFS and ext4, kernels 5.10, 6.1, 6.12 and sid (7.x) in qemu, and a --vmlinuz/--modules boot; verdicts compared with the committed matrix"
bash scripts/client-tests-matrix.sh

step "the kernel's nbd-client over TLS with a client certificate, kernel 6.1 in qemu (about 35 s)"
build_client_tests
"$CLIENT_TESTS_BIN/nbdfault-client-tests" vm-tls --kernel 6.1

step "a device-wide power cut met by the kernel's nbd-client -C 2, kernel 6.1 in qemu (about 15 s)"
"$CLIENT_TESTS_BIN/nbdfault-client-tests" vm-power-cut --kernel 6.1

step "the Docker image: built from the Dockerfile, run, attached, faulted, stopped"
bash docker/ci-smoke-test.sh

if [[ -n $(git status --porcelain) ]]; then
    echo "the tests left the checkout changed; results and logs belong under target/:" >&2
    git status --short >&2
    exit 1
fi
step "all tests passed"
