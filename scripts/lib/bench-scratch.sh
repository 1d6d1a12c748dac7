# shellcheck shell=bash
# The scratch space of the single-server measuring scripts (profile-server.sh,
# instructions-per-request.sh): a directory in /dev/shm, `$work`, holding a 256 MiB image of
# random data, `$work/disk.img`. At exit the server whose pid is in `$server_pid`, if any, is
# stopped and the directory removed.
bench_scratch() {
    local name=$1
    work=$(mktemp -d "/dev/shm/$name.XXXXXX")
    server_pid=
    trap bench_scratch_cleanup EXIT
    dd if=/dev/urandom of="$work/disk.img" bs=1M count=256 status=none
}

bench_scratch_cleanup() {
    [[ -n $server_pid ]] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
    rm -rf "$work"
}
