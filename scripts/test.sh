#!/usr/bin/env bash
# Runs every test nbdfault has, the way CI does (.ci/run calls exactly this), on Debian 12 as root.
# Installs what it needs first.
#
#   bash scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/packages.sh
source scripts/lib/packages.sh

step() { printf '\n==> %s\n' "$*" >&2; }
started=$SECONDS

step "packages"
install_packages "${SERVER_TEST_PACKAGES[@]}"

step "format and lints"
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings

step "unit and integration tests (real clients against the real server)"
cargo nextest run --workspace --locked --no-fail-fast

step "every scenario in the library is a valid policy"
cargo run --quiet --locked -p nbdfault -- policy check policies/scenarios/*.yaml

step "all tests passed in $((SECONDS - started)) s"
