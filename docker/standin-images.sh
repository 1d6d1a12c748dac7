#!/usr/bin/env bash
# Builds local stand-ins for the base images a Dockerfile names, for machines that cannot reach a
# container registry (CI here: Debian packages and crates are reachable, Docker Hub and gcr.io are
# not). The Dockerfile stays exactly what users build; only its FROM images are made locally and
# tagged with the names it uses:
#
#   rust:VERSION-SUITE               Debian SUITE (debootstrap minbase) + gcc + libc6-dev, this
#                                    host's Rust toolchain laid out as in the official image
#                                    (RUSTUP_HOME=/usr/local/rustup, CARGO_HOME=/usr/local/cargo),
#                                    and this workspace's crates vendored into CARGO_HOME with a
#                                    source replacement (see "Why vendored crates" below)
#   gcr.io/distroless/cc-debian12[:TAG]  what distroless cc is made of: the Debian 12 packages
#                                    base-files netbase tzdata ca-certificates libc6 libssl3
#                                    libgcc-s1 libgomp1 libstdc++6, unpacked, no shell; the users
#                                    root, nonroot (65532) and nobody; USER 65532 for :nonroot tags
#   debian:SUITE[-slim]              Debian SUITE, debootstrap minbase (with gcc when a rust
#                                    stand-in of the same suite is made too)
#
# Why vendored crates in the builder image: a real `rust` image downloads crates during
# `cargo build`; here the build must be offline, and the Dockerfile must not change. So the
# stand-in carries the crates of Cargo.lock (`cargo vendor` on the host) and its
# $CARGO_HOME/config.toml replaces crates.io with them and sets net.offline. The Dockerfile's
# `cargo build --release --locked` runs unchanged and still checks Cargo.lock, and the build
# context is the repository as users have it (no .cargo/ or vendor/ added to it).
#
# Usage (as root, with a running Docker engine; DOCKER_HOST is honoured):
#   docker/standin-images.sh [--dockerfile FILE]... [--image NAME]... [--workdir DIR]
# Default: the FROM images of the repository's Dockerfile. Prints each tag it made on stdout.
# Needs: debootstrap, apt-get (Debian), cargo and rustc from rustup, and the docker client (env
# DOCKER, default /usr/bin/docker when present: it is Debian's, matching Debian's engine).
# Env: DEBIAN_MIRROR (default http://deb.debian.org/debian).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
if [[ -z ${DOCKER:-} ]]; then
    if [[ -x /usr/bin/docker ]]; then DOCKER=/usr/bin/docker; else DOCKER=docker; fi
fi
# What gcr.io/distroless/cc-debian12 contains (its base, plus the C and C++ runtime libraries).
DISTROLESS_CC_PACKAGES=(base-files netbase tzdata ca-certificates libc6 libssl3 libgcc-s1 libgomp1 libstdc++6)

log() { printf '[standin %3ds] %s\n' "$SECONDS" "$*" >&2; }
die() {
    printf 'standin-images: %s\n' "$*" >&2
    exit 1
}

# Refuses to delete a directory something is mounted under: rm -rf would go through the mount.
remove_tree() {
    local dir=$1
    [[ -e $dir ]] || return 0
    if findmnt -rn -o TARGET | grep "^$dir\(/\|$\)" >/dev/null; then
        die "$dir has mounts under it; not removing it"
    fi
    rm -rf --one-file-system "$dir"
}

# On exit, also after an interruption: a debootstrap stopped mid-install leaves /proc and /sys
# mounted in its root and may leave processes in it; both are this script's, so they go too.
remove_work() {
    local proc root target
    for proc in /proc/[0-9]*; do
        root=$(readlink "$proc/root" 2>/dev/null) || continue
        [[ $root == "$WORK"/* ]] && kill -KILL "${proc#/proc/}" 2>/dev/null && sleep 0.2
    done
    { findmnt -rn -o TARGET | grep "^$WORK/" || true; } | sort -r | while read -r target; do
        umount "$target" 2>/dev/null || umount -l "$target"
    done
    remove_tree "$WORK"
}

# The FROM images of a Dockerfile, without its own stage names.
from_images() {
    local dockerfile=$1
    awk '
        toupper($1) == "FROM" {
            image = ""; stage = ""
            for (i = 2; i <= NF; i++) {
                if ($i ~ /^--/) continue
                if (image == "") { image = $i; continue }
                if (toupper($i) == "AS" && i < NF) stage = $(i + 1)
            }
            if (!(image in stages)) print image
            if (stage != "") stages[stage] = 1
        }' "$dockerfile"
}

# debootstrap once per suite into WORK/debootstrap-SUITE; echoes the root directory.
debootstrap_root() {
    local suite=$1 root="$WORK/debootstrap-$1"
    if [[ ! -e $root/.complete ]]; then
        local include=()
        [[ " ${NEED_GCC[*]} " == *" $suite "* ]] && include=("--include=gcc,libc6-dev")
        log "debootstrap $suite (minbase ${include[*]}) from $DEBIAN_MIRROR"
        debootstrap --variant=minbase "${include[@]}" "$suite" "$root" "$DEBIAN_MIRROR" >"$WORK/debootstrap-$suite.log" 2>&1 ||
            {
                tail -20 "$WORK/debootstrap-$suite.log" >&2
                die "debootstrap $suite failed (log above)"
            }
        # What a registry image does not carry: downloaded packages, package lists, device nodes
        # (the engine provides /dev).
        rm -rf "${root:?}"/var/cache/apt/archives/*.deb "${root:?}"/var/lib/apt/lists/* "${root:?}"/dev/*
        touch "$root/.complete"
        log "debootstrap $suite done"
    fi
    printf '%s\n' "$root"
}

# Imports a root directory as an image: import_root DIR TAG [--change ...]...
import_root() {
    local root=$1 tag=$2
    shift 2
    tar --numeric-owner --exclude=./.complete -C "$root" -cf - . | "$DOCKER" import "$@" - "$tag" >/dev/null
    log "made $tag ($("$DOCKER" image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1 / 1e6}'))"
    printf '%s\n' "$tag"
}

make_debian() {
    local image=$1 suite root
    suite=${image#*:}
    suite=${suite%-slim}
    root=$(debootstrap_root "$suite")
    import_root "$root" "$image" --change 'CMD ["bash"]'
}

make_rust() {
    local image=$1 tag version suite
    tag=${image#*:}          # 1.95-bookworm
    version=${tag%%-*}       # 1.95
    suite=${tag#*-}          # bookworm
    [[ $tag == *-* && -n $version && -n $suite ]] || die "$image: expected rust:VERSION-SUITE, such as rust:1.95-bookworm"

    local sysroot host rustc_version
    sysroot=$(rustc --print sysroot) || die "rustc not found: the builder stand-in copies this host's Rust toolchain (install it with rustup)"
    host=$(rustc -vV | sed -n 's/^host: //p')
    rustc_version=$(rustc -vV | sed -n 's/^release: //p')
    [[ -x $sysroot/bin/cargo && -d $sysroot/lib/rustlib/$host/lib ]] ||
        die "$sysroot is not a rustup toolchain (bin/cargo, lib/rustlib/$host/lib): install Rust with rustup"
    if [[ $rustc_version != "$version" && $rustc_version != "$version".* ]]; then
        log "warning: $image stands in with this host's rustc $rustc_version"
    fi

    local base root toolchain
    base=$(debootstrap_root "$suite")
    root="$WORK/rust-$tag"
    remove_tree "$root"
    log "builder root: Debian $suite + rustc $rustc_version ($host) + vendored crates"
    # Take the debootstrap root over unless a debian stand-in of the same suite still needs it.
    if [[ " ${NEED_PLAIN[*]} " == *" $suite "* ]]; then
        cp -a "$base" "$root"
    else
        mv "$base" "$root"
    fi
    # The official image's layout: toolchains under RUSTUP_HOME, commands in CARGO_HOME/bin.
    toolchain="/usr/local/rustup/toolchains/$rustc_version-$host"
    mkdir -p "$root$toolchain" "$root/usr/local/cargo/bin"
    cp -a "$sysroot/bin" "$sysroot/lib" "$root$toolchain/" # share/ (docs, man pages) is left out
    local command
    for command in cargo rustc rustdoc; do
        ln -s "$toolchain/bin/$command" "$root/usr/local/cargo/bin/$command"
    done
    # Every crate of Cargo.lock, from the registry or this host's cargo cache.
    cargo vendor --quiet --locked --manifest-path "$REPO/Cargo.toml" "$root/usr/local/cargo/vendor" >/dev/null
    cat >"$root/usr/local/cargo/config.toml" <<'EOF'
# Stand-in for the official rust image on a machine without a registry (docker/standin-images.sh):
# crates come from the directory vendored from Cargo.lock, never from the network.
[source.crates-io]
replace-with = "vendored-sources"

[source.vendored-sources]
directory = "/usr/local/cargo/vendor"

[net]
offline = true
EOF
    import_root "$root" "$image" \
        --change 'ENV RUSTUP_HOME=/usr/local/rustup' \
        --change 'ENV CARGO_HOME=/usr/local/cargo' \
        --change 'ENV PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change "ENV RUST_VERSION=$rustc_version" \
        --change 'CMD ["bash"]'
    remove_tree "$root"
}

make_distroless_cc() {
    local image=$1 tag user=0
    tag=${image##*:}
    [[ $image == *:* && $tag != */* ]] || tag=latest
    [[ $tag == nonroot* ]] && user=65532

    local debs="$WORK/distroless-debs" root="$WORK/distroless-root"
    remove_tree "$debs"
    remove_tree "$root"
    mkdir -p "$debs" "$root"
    log "distroless cc root from ${DISTROLESS_CC_PACKAGES[*]}"
    # This host's apt sources are Debian 12's; root downloads without the _apt sandbox user, who
    # cannot enter the private work directory.
    (cd "$debs" && apt-get download -qq -o APT::Sandbox::User=root "${DISTROLESS_CC_PACKAGES[@]}") ||
        die "apt-get download failed: run apt-get update first"
    local deb
    for deb in "$debs"/*.deb; do
        dpkg-deb -x "$deb" "$root"
    done
    # As distroless: copyright files but no other docs, no man pages; the CA bundle that
    # ca-certificates' maintainer script would have generated.
    find "$root/usr/share/doc" -type f ! -name copyright -delete
    rm -rf "$root/usr/share/man" "$root/usr/share/info" "$root/usr/share/lintian" "$root/usr/share/locale"
    mkdir -p "$root/etc/ssl/certs"
    find "$root/usr/share/ca-certificates" -name '*.crt' -print0 | sort -z | xargs -0 cat >"$root/etc/ssl/certs/ca-certificates.crt"
    cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
    cat >"$root/etc/group" <<'EOF'
root:x:0:
nobody:x:65534:
nonroot:x:65532:
EOF
    printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"
    mkdir -p "$root/root" "$root/home/nonroot" "$root/tmp"
    chmod 700 "$root/root" "$root/home/nonroot"
    chown 65532:65532 "$root/home/nonroot"
    chmod 1777 "$root/tmp"
    [[ ! -e $root/bin/sh ]] || die "the distroless stand-in must have no shell"
    local workdir=/
    ((user == 65532)) && workdir=/home/nonroot
    import_root "$root" "$image" \
        --change "USER $user" \
        --change "WORKDIR $workdir" \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt'
    remove_tree "$root"
    remove_tree "$debs"
}

main() {
    local dockerfiles=() images=() workdir=""
    while (($#)); do
        case $1 in
            --dockerfile) dockerfiles+=("$2"); shift 2 ;;
            --image) images+=("$2"); shift 2 ;;
            --workdir) workdir=$2; shift 2 ;;
            -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
            *) die "unknown argument $1 (see --help)" ;;
        esac
    done
    ((${#dockerfiles[@]} + ${#images[@]})) || dockerfiles=("$REPO/Dockerfile")
    local dockerfile image
    for dockerfile in "${dockerfiles[@]}"; do
        mapfile -t -O "${#images[@]}" images < <(from_images "$dockerfile")
    done
    ((EUID == 0)) || die "needs root (debootstrap, file ownership in the images)"
    "$DOCKER" version >/dev/null 2>&1 || die "no Docker engine answers ($DOCKER version failed; DOCKER_HOST=${DOCKER_HOST:-unset})"

    # A private work directory, removed on exit: roots are hundreds of MB.
    WORK=$(mktemp -d "${workdir:-${TMPDIR:-/tmp}}/standin.XXXXXX")
    trap remove_work EXIT

    # Suites that need gcc in their debootstrap (rust stand-ins), and suites a debian stand-in is
    # imported from, known before the first debootstrap runs. Debian stand-ins are made first.
    NEED_GCC=()
    NEED_PLAIN=()
    local suite
    for image in "${images[@]}"; do
        case $image in
            rust:*-*) NEED_GCC+=("${image##*-}") ;;
            debian:*) suite=${image#*:} && NEED_PLAIN+=("${suite%-slim}") ;;
        esac
    done
    mapfile -t images < <(printf '%s\n' "${images[@]}" | awk '!seen[$0]++' | awk '/^debian:/ { print; next } { rest[++n] = $0 } END { for (i = 1; i <= n; i++) print rest[i] }')
    for image in "${images[@]}"; do
        case $image in
            rust:*) make_rust "$image" ;;
            gcr.io/distroless/cc-debian12 | gcr.io/distroless/cc-debian12:*) make_distroless_cc "$image" ;;
            debian:*) make_debian "$image" ;;
            *) die "no stand-in for $image: teach docker/standin-images.sh how to make it" ;;
        esac
    done
}

main "$@"
