# shellcheck shell=bash disable=SC2034,SC2154 # sourced: reads `$repo` and sets `$nbdfault` for the script that sources it
# What the benchmark and screenshot scripts share about the server they run.

# Sets `$nbdfault` to the binary to measure: NBDFAULT_BIN if set (to compare another build),
# else this checkout's release build, built first. `$repo` is the repository's root.
nbdfault_binary() {
    if [[ -z ${NBDFAULT_BIN:-} ]]; then
        cargo build --release --quiet -p nbdfault --manifest-path "$repo/Cargo.toml"
    fi
    nbdfault=${NBDFAULT_BIN:-${CARGO_TARGET_DIR:-$repo/target}/release/nbdfault}
}

# Waits until an NBD server answers at URI (nbdinfo gets its size), up to TENTHS tenths of a
# second (default 100); fails, saying which server command did not start, if it never does.
wait_for_nbd() {
    local uri=$1 command=$2 tenths=${3:-100}
    for _ in $(seq "$tenths"); do
        nbdinfo --size "$uri" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "the server did not start within $((tenths / 10)) s: $command" >&2
    return 1
}
