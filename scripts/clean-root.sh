#!/usr/bin/env bash
# Runs the unit and integration tier (`cargo nextest run --workspace`) inside a clean Debian 12
# root that holds nothing but what the project's scripts install, from a fresh clone of the
# commit under test. A tool or Python module a test needs but no package list names fails here
# on every machine, not only on a fresh one. scripts/test.sh (and so CI) runs the tier only here.
#
#   bash scripts/clean-root.sh               # the tier, strict: a missing tool fails its test
#   bash scripts/clean-root.sh --lints --copy-binaries DIR
#                                            # what scripts/test.sh runs: clippy first (in the
#                                            # same target dir), the tier, then the static
#                                            # nbdfault and nbdfault-client-tests copied to DIR
#   bash scripts/clean-root.sh --only-rust   # only Rust, gcc and libc6-dev: tests that need an
#                                            # outside tool skip, each with one line saying why
#   bash scripts/clean-root.sh --only-rust -- cargo test --workspace --locked --offline
#   bash scripts/clean-root.sh --shell       # a shell in the prepared root, to look around
#
# What it uses from the host, and where it keeps things (all outside the repository):
#   ~/.cache/nbdfault/clean-root/bookworm-minbase-V.tar   the pristine root: `debootstrap
#       --variant=minbase bookworm` from the archive URL of the host's own apt sources, with the
#       package lists; made once (about 40 s), unpacked afresh for every run
#   ~/.cache/nbdfault/clean-root/debs/       downloaded packages, hard-linked in and out
#   ~/.cache/nbdfault/clean-root/target/     the tier's target dir, so a run rebuilds only the
#                                            workspace (separate for --only-rust); the build is
#                                            the static one the VMs run, without incremental
#                                            caches (a CI run builds each crate once)
#   the host's Rust toolchain (`rustc --print sysroot`) and cargo-nextest, read-only, and the
#   host's crate registry ($CARGO_HOME/registry), read-write; crates are fetched on the host.
# Needs root (chroot, mounts, namespaces) on Debian with debootstrap (installed when missing).
#
# The root runs in private mount and PID namespaces: /proc, /sys, /dev (with /dev/pts), a fresh
# /dev/shm and the bind mounts exist only there and vanish with its last process, whatever way the
# run ends (Ctrl-C included); the unpacked root is then removed. Tests inside can still make
# network namespaces (`unshare --net`, `ip netns`). The commit under test is HEAD: uncommitted
# changes are not in the clone, and the script says so.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib/packages.sh
source "$REPO/scripts/lib/packages.sh"

# Bump when the base root's recipe changes: an older cached tarball is then rebuilt.
BASE_VERSION=1
CACHE=${NBDFAULT_CACHE:-$HOME/.cache/nbdfault}/clean-root
BASE=$CACHE/bookworm-minbase-$BASE_VERSION.tar

log() { printf '[clean-root %3d s] %s\n' "$((SECONDS - started))" "$*" >&2; }
die() { printf 'clean-root.sh: %s\n' "$*" >&2; exit 1; }
started=$SECONDS

# The URL of the Debian archive that serves bookworm in the host's own apt sources (one-line or
# deb822 format); security updates come from the URL that serves bookworm-security.
apt_uri_for() {
    local suite=$1 file
    for file in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [[ -r $file ]] || continue
        awk -v suite="$suite" '
            /^[[:space:]]*#/ { next }
            /^deb[[:space:]]/ {
                i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                if ($(i + 1) == suite) { print $i; exit }
                next
            }
            /^URIs:/ { uri = $2 }
            /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite) found = 1 }
            /^[[:space:]]*$/ { if (found && uri) { print uri; exit } uri = ""; found = 0 }
            END { if (found && uri) print uri }' "$file"
    done | head -n 1
}

# Runs a command in ROOT inside private mount and PID namespaces, with the kernel file systems
# mounted there only. Extra bind mounts come as SOURCE:TARGET[:ro] words before `--`.
in_root() {
    local root=$1
    shift
    local binds=()
    while [[ $1 != -- ]]; do
        binds+=("$1")
        shift
    done
    shift
    # --kill-child: if unshare dies, the namespace's first process gets SIGKILL, and with it every
    # process in the PID namespace; the mount namespace (and every mount) goes with them. In a
    # background subshell (IN_ROOT_EXEC set), unshare takes the subshell's place, so its pid is $!.
    ${IN_ROOT_EXEC:+exec} unshare --mount --propagation private --pid --fork --kill-child=SIGKILL \
        bash -euo pipefail -c '
        root=$1; shift
        # The root a mount of its own, as / is on a machine: `ip netns exec` remounts / as a slave.
        mount --bind "$root" "$root"
        mount -t proc proc "$root/proc"
        mount --rbind /sys "$root/sys"
        mount --rbind /dev "$root/dev"
        mount -t tmpfs -o mode=1777,nosuid,nodev shm "$root/dev/shm"
        while [[ $1 != -- ]]; do
            IFS=: read -r source target options <<<"$1"
            shift
            if [[ -d $source ]]; then mkdir -p "$root$target"; else mkdir -p "$(dirname "$root$target")"; touch "$root$target"; fi
            mount --bind "$source" "$root$target"
            [[ $options == ro ]] && mount -o remount,bind,ro "$root$target"
        done
        shift
        # Not exec: this shell stays the namespace'"'"'s PID 1 and reaps orphaned processes.
        chroot "$root" "$@"
        status=$?
        exit $status' in-root "$root" "${binds[@]}" -- "$@"
}

# Lays ROOT out as a fresh machine would have it: DNS, no services started by package scripts,
# dpkg without an fsync per file (the root is thrown away anyway).
prepare_root() {
    local root=$1
    cp /etc/resolv.conf "$root/etc/resolv.conf"
    # debootstrap writes no /etc/hosts; a Debian install has one, and without it "localhost"
    # is a DNS question (chromedriver's clients ask for it) that many resolvers do not answer.
    printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
    printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
    chmod 755 "$root/usr/sbin/policy-rc.d"
    echo force-unsafe-io >"$root/etc/dpkg/dpkg.cfg.d/nbdfault-unsafe-io"
    printf 'Acquire::Languages "none";\n' >"$root/etc/apt/apt.conf.d/90nbdfault"
}

make_base() {
    mkdir -p "$CACHE"
    install_packages debootstrap
    local work
    work=$(mktemp -d "$CACHE/base.XXXXXX")
    # shellcheck disable=SC2064 # the path is fixed now
    trap "remove_root '$work'" EXIT
    log "debootstrap --variant=minbase bookworm from $MIRROR (once; cached as $BASE)"
    if ! debootstrap --variant=minbase bookworm "$work/root" "$MIRROR" >"$work/debootstrap.log" 2>&1; then
        tail -20 "$work/debootstrap.log" >&2
        die "debootstrap failed (log above)"
    fi
    {
        echo "deb $MIRROR bookworm main"
        echo "deb $MIRROR bookworm-updates main"
        [[ -n $SECURITY ]] && echo "deb $SECURITY bookworm-security main"
    } >"$work/root/etc/apt/sources.list"
    prepare_root "$work/root"
    in_root "$work/root" -- /usr/bin/apt-get update -qq
    rm -rf "$work/root"/var/cache/apt/archives/*.deb "$work/root/etc/resolv.conf"
    tar --numeric-owner -C "$work/root" -cf "$work/base.tar" .
    mv "$work/base.tar" "$BASE"
    rm -f "$CACHE"/bookworm-minbase-*.tar.old
    log "base root ready ($(du -m "$BASE" | cut -f1) MB)"
    remove_root "$work"
    trap - EXIT
}

# Removes an unpacked root, refusing while anything is mounted under it (rm -rf would go
# through the mount), and after killing processes still rooted in it.
remove_root() {
    local dir=$1 proc target
    [[ -e $dir ]] || return 0
    for proc in /proc/[0-9]*; do
        target=$(readlink "$proc/root" 2>/dev/null) || continue
        [[ $target == "$dir"/* ]] && kill -KILL "${proc#/proc/}" 2>/dev/null
    done
    # grep reads all of findmnt's output (no -q): under pipefail an early exit would fail the pipe.
    if findmnt -rn -o TARGET | grep "^$dir\(/\|$\)" >/dev/null; then
        echo "clean-root.sh: $dir still has mounts under it; not removing it" >&2
        return 1
    fi
    rm -rf --one-file-system "$dir"
}

ROOT_PID=""
stop_root() {
    if [[ -n $ROOT_PID ]]; then
        kill -KILL "$ROOT_PID" 2>/dev/null
        wait "$ROOT_PID" 2>/dev/null
        ROOT_PID=""
    fi
    return 0
}

# Packages downloaded in this run join the cache for the next one; the unpacked root goes.
cleanup() {
    local status=$?
    # Packages downloaded in this run join the cache for the next one.
    find "$RUN/root/var/cache/apt/archives" -maxdepth 1 -name '*.deb' -exec cp -nl {} "$CACHE/debs/" \; 2>/dev/null || true
    remove_root "$RUN" || status=1
    exit "$status"
}

main() {
    mode=strict
    command=()
    lints=false
    copy_to=""
    while (($#)); do
        case $1 in
        --only-rust) mode=only-rust ;;
        --shell) mode=shell ;;
        --lints) lints=true ;;
        --copy-binaries)
            copy_to=${2:?--copy-binaries needs a directory}
            shift
            ;;
        --)
            shift
            command=("$@")
            break
            ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
            return 0
            ;;
        *) die "unknown argument $1 (see --help)" ;;
        esac
        shift
    done
    ((EUID == 0)) || die "needs root (chroot, mounts and namespaces): run it as root, as CI does"
    MIRROR=${DEBIAN_MIRROR:-$(apt_uri_for bookworm)}
    MIRROR=${MIRROR:-http://deb.debian.org/debian}
    SECURITY=$(apt_uri_for bookworm-security)

    [[ -s $BASE ]] || make_base

    commit=$(git -C "$REPO" rev-parse HEAD)
    if [[ -n $(git -C "$REPO" status --porcelain --untracked-files=no) ]]; then
        log "note: uncommitted changes are not tested here; the clean root tests commit ${commit:0:12}"
    fi

    # Crates are fetched on the host (which has the CA certificates); the root builds offline.
    cargo fetch --locked --manifest-path "$REPO/Cargo.toml" >/dev/null

    RUN=$(mktemp -d "$CACHE/run.XXXXXX")
    trap cleanup EXIT
    # Ctrl-C or SIGTERM: SIGKILL to the namespaces' first process ends every process in them,
    # and with them every mount; cleanup then removes the root.
    trap 'log "interrupted: ending the root'"'"'s processes, removing it"; stop_root; exit 130' INT
    trap 'log "terminated: ending the root'"'"'s processes, removing it"; stop_root; exit 143' TERM

    log "unpacking the base root; cloning ${commit:0:12}"
    mkdir -p "$RUN/root" "$CACHE/debs"
    tar --numeric-owner -C "$RUN/root" -xf "$BASE"
    prepare_root "$RUN/root"
    cp -l "$CACHE"/debs/*.deb "$RUN/root/var/cache/apt/archives/" 2>/dev/null || true
    git init -q "$RUN/root/src"
    git -C "$REPO" push -q "$RUN/root/src" "$commit:refs/heads/under-test"
    git -C "$RUN/root/src" checkout -q under-test

    sysroot=$(rustc --print sysroot) || die "rustc not found: install Rust with rustup"
    nextest=$(command -v cargo-nextest) || die "cargo-nextest not found: install it (cargo install cargo-nextest --locked)"
    CARGO_HOME=${CARGO_HOME:-$HOME/.cargo}
    target=$CACHE/target
    [[ $mode == only-rust ]] && target=$CACHE/target-only-rust
    mkdir -p "$target" "$CARGO_HOME/registry"
    binds=("$sysroot:/opt/rust:ro" "$nextest:/usr/local/bin/cargo-nextest:ro"
        "$CARGO_HOME/registry:/root/.cargo/registry" "$target:/target")

    # The same static build as the host's (scripts/test.sh): the tests run the binaries the VMs run.
    environment=(HOME=/root PATH=/opt/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
        LANG=C.UTF-8 TERM="${TERM:-dumb}" CI="${CI:-}" CARGO_HOME=/root/.cargo CARGO_TARGET_DIR=/target
        CARGO_NET_OFFLINE=true CARGO_BUILD_TARGET=x86_64-unknown-linux-gnu
        RUSTFLAGS='-C target-feature=+crt-static' CARGO_INCREMENTAL=0 NEXTEST_HIDE_PROGRESS_BAR=1)

    # What is built while the packages install (it needs only BUILD_PACKAGES): the lints if asked
    # for, and the tier's build; then, with every package in, the command.
    build=()
    $lints && build+=("cargo clippy --workspace --all-targets --locked -- -D warnings")
    case $mode in
    strict)
        packages='"${TEST_PACKAGES[@]}"'
        environment+=(NBDFAULT_REQUIRE_TOOLS=1)
        if ((${#command[@]} == 0)); then
            build+=("cargo nextest run --workspace --locked --no-run")
            command=(cargo nextest run --workspace --locked --no-fail-fast)
        fi
        ;;
    only-rust)
        packages='"${BUILD_PACKAGES[@]}"'
        ((${#command[@]})) || command=(cargo nextest run --workspace --locked --no-fail-fast)
        ;;
    shell)
        packages='"${TEST_PACKAGES[@]}"'
        command=(bash -i)
        ;;
    esac
    build_script=""
    for step in "${build[@]}"; do
        build_script+="t0=\$SECONDS; echo \"==> $step\" >&2; $step; echo \"==> done in \$((SECONDS - t0)) s\" >&2; "
    done

    # Inside: the packages, installed by the function a user's run of the scripts uses (the C
    # compiler first, then the rest while the workspace builds), then the command.
    # shellcheck disable=SC2016 # expanded inside the root
    script='
    set -eo pipefail
    cd /src
    source scripts/lib/packages.sh
    install_packages "${BUILD_PACKAGES[@]}"
    build=$NBDFAULT_CLEAN_ROOT_BUILD
    unset NBDFAULT_CLEAN_ROOT_BUILD
    if [[ -n $build ]]; then
        install_packages '"$packages"' >/tmp/packages.log 2>&1 &
        installing=$!
        echo "==> C compiler in after $SECONDS s; building while the other packages install" >&2
        status=0
        bash -euo pipefail -c "$build" || status=$?
        wait "$installing" || { cat /tmp/packages.log >&2; echo "==> installing the packages failed" >&2; exit 1; }
        ((status == 0)) || exit $status
    else
        install_packages '"$packages"'
    fi
    echo "==> clean root ready in $SECONDS s ($(dpkg-query -W | wc -l) packages); running: $*" >&2
    exec "$@"'
    environment+=("NBDFAULT_CLEAN_ROOT_BUILD=$build_script")

    log "mode $mode; entering the root"
    local run_in_root=(in_root "$RUN/root" "${binds[@]}" -- /usr/bin/env -i "${environment[@]}" /bin/bash -c "$script"
        clean-root "${command[@]}")
    set +e
    if [[ $mode == shell ]]; then
        "${run_in_root[@]}"
        status=$?
    else
        # In the background, so a signal to this script is handled at once (bash runs a trap only
        # after the foreground command ends), not after the tests.
        IN_ROOT_EXEC=1 "${run_in_root[@]}" &
        ROOT_PID=$!
        wait "$ROOT_PID"
        status=$?
        ROOT_PID=""
    fi
    set -e
    # The checkout must be as clean as the clone was: results and logs go to ignored directories.
    if [[ $mode != shell && -n $(git -C "$RUN/root/src" status --porcelain) ]]; then
        log "the tests left the checkout changed; they must write under target/ or a temporary directory:"
        git -C "$RUN/root/src" status --short >&2
        status=1
    fi
    if ((status == 0)) && [[ -n $copy_to ]]; then
        mkdir -p "$copy_to"
        cp "$target/x86_64-unknown-linux-gnu/debug/nbdfault" "$target/x86_64-unknown-linux-gnu/debug/nbdfault-client-tests" "$copy_to/"
        log "copied the static nbdfault and nbdfault-client-tests to $copy_to"
    fi
    log "done (status $status)"
    return $status
}

# One line, so bash has read all of it before it runs: editing the script meanwhile is harmless.
main "$@"; exit $?
