#!/usr/bin/env bash
# Runs every test nbdfault has, the way CI does (.ci/run calls exactly this), on Debian 12 as root.
# Installs what it needs first.
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

# One build for everything: the VM's guest needs static binaries, so the tests use them too and
# every crate is compiled once. With an explicit target, build scripts and proc macros stay dynamic.
export CARGO_BUILD_TARGET=x86_64-unknown-linux-gnu
export RUSTFLAGS='-C target-feature=+crt-static'

step "packages"
install_packages "${SERVER_TEST_PACKAGES[@]}" "${CLIENT_TEST_PACKAGES[@]}" "${FUZZ_PACKAGES[@]}"

step "format and lints"
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings

step "unit and integration tests (real clients against the real server)"
cargo nextest run --workspace --locked --no-fail-fast

step "coverage-guided fuzzing: handshake, transmission, policy parser, 30 s each (build included, about 5 min)"
# Its own build (release, instrumented, in fuzz/target) and not the static one above.
env -u CARGO_BUILD_TARGET -u RUSTFLAGS bash scripts/fuzz.sh all 30

step "every scenario in the library is a valid policy"
cargo run --quiet --locked -p nbdfault -- policy check policies/scenarios/*.yaml

step "the writeback-error oracle on XFS and ext4, kernels 5.10, 6.1, 6.12 and sid (7.x) in qemu, and a --vmlinuz/--modules boot"
bash scripts/client-tests-matrix.sh

step "the kernel's nbd-client over TLS with a client certificate, kernel 6.1 in qemu (about 35 s)"
build_client_tests
"$CLIENT_TESTS_BIN/nbdfault-client-tests" vm-tls --kernel 6.1

step "the Docker image: built from the Dockerfile, run, attached, faulted, stopped"
bash docker/ci-smoke-test.sh

step "all tests passed"
