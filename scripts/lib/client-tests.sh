# shellcheck shell=bash disable=SC2034 # sourced: its variables are used by the scripts that source it
# Shared by scripts/demo.sh and scripts/client-tests-matrix.sh: the packages the VM harness needs
# and the static build it runs. Sourced, not run.

# qemu (TCG), the real nbd-client, busybox and mkfs (xfs, ext4, btrfs) for the guest's
# initramfs, cpio for the harness's own tests, and Debian's archive keys for the private apt
# configuration that fetches kernels. qemu-utils is named with qemu-system-x86 so both come from
# the same Debian release. openssl makes the certificates of `vm-tls`; binutils' objcopy strips the
# guest binary's debug information for a smaller initramfs.
CLIENT_TEST_PACKAGES=(qemu-system-x86 qemu-utils nbd-client busybox-static xfsprogs e2fsprogs btrfs-progs cpio
    debian-archive-keyring libc6-dev openssl binutils)

# Builds nbdfault and nbdfault-client-tests statically linked (the guest has no C library), for
# the explicit target so build scripts stay dynamic. The harness finds the server next to itself
# and puts itself into the guest. Sets CLIENT_TESTS_BIN. With CLIENT_TESTS_PREBUILT=DIR, uses the
# two binaries in DIR instead (scripts/test.sh: those the clean root built and tested).
build_client_tests() {
    if [[ -n ${CLIENT_TESTS_PREBUILT:-} ]]; then
        local binary
        for binary in nbdfault nbdfault-client-tests; do
            [[ -x $CLIENT_TESTS_PREBUILT/$binary ]] || {
                echo "CLIENT_TESTS_PREBUILT=$CLIENT_TESTS_PREBUILT has no $binary" >&2
                return 1
            }
        done
        echo "==> using the static nbdfault and nbdfault-client-tests in $CLIENT_TESTS_PREBUILT" >&2
        CLIENT_TESTS_BIN=$CLIENT_TESTS_PREBUILT
        return 0
    fi
    local target_dir=${CARGO_TARGET_DIR:-target}
    echo "==> building nbdfault and nbdfault-client-tests (static, $target_dir)" >&2
    RUSTFLAGS='-C target-feature=+crt-static' cargo build --locked \
        --target x86_64-unknown-linux-gnu -p nbdfault -p nbdfault-client-tests
    CLIENT_TESTS_BIN=$target_dir/x86_64-unknown-linux-gnu/debug
}
