# shellcheck shell=bash disable=SC2034 # sourced: its variables are used by the scripts that source it
# Installs Debian packages that are missing, with one `apt-get update` first. Sourced by the
# scripts in scripts/; needs root (or sudo) on Debian 12.
#
#   install_packages PACKAGE...

install_packages() {
    local missing=()
    local package
    for package in "$@"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep '^install ok installed$' >/dev/null || missing+=("$package")
    done
    ((${#missing[@]} == 0)) && return 0
    local sudo=()
    if ((EUID != 0)); then
        command -v sudo >/dev/null || {
            echo "installing ${missing[*]} needs root: run as root or install sudo" >&2
            return 1
        }
        sudo=(sudo)
    fi
    echo "==> installing ${missing[*]}" >&2
    # Another apt run (a user's, or scripts/test.sh's own in the background) may hold the lock.
    local wait=(-o DPkg::Lock::Timeout=600)
    "${sudo[@]}" apt-get "${wait[@]}" update -qq
    # qemu-utils is named with qemu-system-x86 so both come from the same Debian release: a newer
    # qemu-utils (from backports) would otherwise be removed, taking qemu-img and qemu-io with it.
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get "${wait[@]}" install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# What building the workspace needs beyond Rust: a C compiler and linker for rustc and the crates
# that build C, and the C library's static parts for the static build the VMs run.
BUILD_PACKAGES=(gcc libc6-dev)

# What the server's integration tests drive: libnbd's tools and Python binding, qemu-img/qemu-io,
# fio's nbd engine, nbdkit for comparisons, nbd-client -l, ip and unshare for a network namespace,
# chattr, curl, the Python modules that check the policy schema (jsonschema, yaml), Prometheus's
# own exposition parser for /metrics, and headless Chromium with its WebDriver and Selenium for the
# live page's browser test.
SERVER_TEST_PACKAGES=(libnbd-bin python3-libnbd qemu-utils fio nbdkit nbd-client iproute2 e2fsprogs util-linux curl
    python3-jsonschema python3-yaml python3-prometheus-client chromium chromium-driver python3-selenium)

# What the client test suite's unit tests run on the host: mkfs and the filesystems' debuggers
# (xfs_db, debugfs) to check layouts, cpio to list an initramfs, a static busybox, openssl for
# the certificates of the TLS boot.
CLIENT_UNIT_TEST_PACKAGES=(xfsprogs e2fsprogs btrfs-progs cpio busybox-static openssl)

# Everything `cargo nextest run --workspace` needs: scripts/clean-root.sh installs exactly this
# into a clean Debian 12 root, so a tool a test runs but no list names fails CI. Each tool a test
# needs is also named, with its package, in the test helper (testing/src/lib.rs), which checks
# that the package is in this list.
TEST_PACKAGES=("${BUILD_PACKAGES[@]}" "${SERVER_TEST_PACKAGES[@]}" "${CLIENT_UNIT_TEST_PACKAGES[@]}")

# What scripts/bench-servers.sh drives and compares against: fio's nbd engine, nbdinfo, nbdkit
# (file and memory plugins, cow filter), qemu-nbd; linux-perf for the profiles in docs/.
BENCH_PACKAGES=(fio libnbd-bin nbdkit qemu-utils python3 linux-perf valgrind)

# scripts/fuzz.sh: libfuzzer-sys compiles libFuzzer, which is C++.
FUZZ_PACKAGES=(g++)
