#!/usr/bin/env bash
# CI smoke test of the Docker image, on a fresh Debian 12 machine, as root, where Debian packages
# and crates can be downloaded but no container registry is reachable:
#
#   bash docker/ci-smoke-test.sh
#
#  1. installs what it needs (docker.io, docker-compose, debootstrap, libnbd-bin, qemu-utils, curl,
#     iproute2);
#  2. starts a private Docker engine: no bridge, no iptables or forwarding changes, all state in a
#     temporary directory (the host's network configuration is not touched);
#  3. makes local stand-ins for the base images the Dockerfile names (docker/standin-images.sh);
#  4. builds the repository's Dockerfile, unchanged;
#  5. runs the image with --network host on free loopback ports (set through the environment),
#     with a control token, a file-backed export and the fault log on a host directory;
#  6. checks the export with nbdinfo and qemu-io, the token, arms a fault through the control API
#     and sees qemu-io get EIO, the fault log record it and the failed write not reach the disk,
#     the HEALTHCHECK report healthy, and `docker stop` end the server with status 0 within
#     SMOKE_STOP_LIMIT_MS (default 2000 ms);
#  7. runs compose.host.yaml (compose.yaml on the host's network), as docs/docker.md tells users on an
#     engine without a bridge: the export on the volume, `exec -T`, a fault, and the fault log
#     copied out of the volume to the host;
#  8. removes everything it started, also on failure: the container, the images (they live in the
#     private engine's data root), the engine and its containerd, their mounts, the temp directory.
#
# `--download-packages` only downloads the packages of step 1 (apt-get --download-only), so that a
# later run installs them without waiting for the network (scripts/test.sh does it early).
#
# Env: SMOKE_STOP_LIMIT_MS, SMOKE_KEEP=1 (keep the temp directory for a post-mortem; the engine is
# stopped anyway), DEBIAN_MIRROR (for debootstrap), TMPDIR.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Debian's client, matching Debian's engine; a newer client elsewhere in PATH may lack features.
DOCKER=/usr/bin/docker
DOCKERD=/usr/sbin/dockerd
PACKAGES=(docker.io docker-compose debootstrap libnbd-bin qemu-utils curl iproute2 ca-certificates)
STOP_LIMIT_MS=${SMOKE_STOP_LIMIT_MS:-2000}
POLICY="$REPO/docker/example/policies/fail-writes-when-armed.yaml"
RULE=fail-armed-range   # the policy's rule, named in the fault log
TRIGGER=fail-writes     # the policy's trigger
IMAGE=nbdfault-smoke:$$
CONTAINER=nbdfault-smoke-$$
SCRATCH=""
DOCKERD_PID=""
STARTED=$SECONDS
TIMINGS=()

# ---- output ------------------------------------------------------------------------------------

STEP_NAME=""
STEP_STARTED=$SECONDS
step() {
    end_step
    STEP_NAME=$1
    STEP_STARTED=$SECONDS
    printf '\n==> [%4ds] %s\n' "$((SECONDS - STARTED))" "$STEP_NAME" >&2
}
end_step() {
    [[ -n $STEP_NAME ]] && TIMINGS+=("$(printf '%5ds  %s' "$((SECONDS - STEP_STARTED))" "$STEP_NAME")")
    STEP_NAME=""
}
ok() { printf '    ok: %s\n' "$*" >&2; }
info() { printf '    %s\n' "$*" >&2; }
fail() {
    printf '\nFAILED: %s\n' "$*" >&2
    exit 1
}

# ---- host setup --------------------------------------------------------------------------------

install_packages() {
    local missing=() package
    for package in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep '^install ok installed$' >/dev/null || missing+=("$package")
    done
    if ((${#missing[@]} == 0)); then
        ok "already installed: ${PACKAGES[*]}"
        return
    fi
    info "installing ${missing[*]}"
    # docker.io would start the system's engine, which creates a bridge network: a policy-rc.d
    # that refuses every service start keeps the host's network as it is.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        SERVICE_GUARD=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' >"$SERVICE_GUARD"
        chmod 755 "$SERVICE_GUARD"
    fi
    local log="$SCRATCH/apt.log" status=0
    {
        apt-get update -qq &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    } >"$log" 2>&1 || status=$?
    remove_service_guard
    if ((status != 0)); then
        tail -20 "$log" >&2
        fail "installing ${missing[*]} failed (log above)"
    fi
    ok "installed ${missing[*]}"
}

# The policy-rc.d this script created, if any (removed after the install, or by the clean-up).
SERVICE_GUARD=""
remove_service_guard() {
    [[ -z $SERVICE_GUARD ]] || rm -f "$SERVICE_GUARD"
    SERVICE_GUARD=""
}

check_host() {
    ((EUID == 0)) || fail "run as root (the engine, debootstrap)"
    command -v cargo >/dev/null || fail "cargo not found: the builder stand-in vendors crates with it (rustup)"
    command -v rustc >/dev/null ||
        fail "rustc not found: the builder stand-in copies this host's Rust toolchain (rustup)"
    [[ -f $REPO/Dockerfile ]] || fail "no Dockerfile in $REPO"
}

# ---- the private engine ------------------------------------------------------------------------

start_engine() {
    local dir="$SCRATCH/engine"
    mkdir -p "$dir/data" "$dir/exec"
    # No bridge, no NAT, no iptables rules, no forwarding: containers use --network host. setsid
    # keeps the engine out of this script's process group (a Ctrl-C reaches only the script, whose
    # trap then stops the engine in order).
    setsid "$DOCKERD" \
        --bridge=none --iptables=false --ip6tables=false --ip-forward=false --ip-masq=false \
        --data-root "$dir/data" --exec-root "$dir/exec" --pidfile "$dir/dockerd.pid" \
        --host "unix://$dir/docker.sock" >"$dir/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    export DOCKER_HOST="unix://$dir/docker.sock"
    # The client keeps its configuration here, not in ~/.docker.
    export DOCKER_CONFIG="$SCRATCH/client"
    local tries
    for ((tries = 0; tries < 300; tries++)); do
        "$DOCKER" version >/dev/null 2>&1 && break
        kill -0 "$DOCKERD_PID" 2>/dev/null || {
            tail -20 "$dir/dockerd.log" >&2
            fail "dockerd exited at start (log above)"
        }
        sleep 0.1
    done
    "$DOCKER" version >/dev/null 2>&1 || fail "dockerd did not answer within 30 s"
    ok "engine $("$DOCKER" version -f '{{.Server.Version}}') (pid $DOCKERD_PID) on $DOCKER_HOST"
}

# Processes this script started that could outlive it: anything whose command line names the
# scratch directory (the engine, its containerd and shims) or whose root is inside it (a container,
# a debootstrap chroot).
own_processes() {
    local proc pid root
    for proc in /proc/[0-9]*; do
        pid=${proc#/proc/}
        [[ $pid == "$$" || $pid == "$BASHPID" ]] && continue
        root=$(readlink "$proc/root" 2>/dev/null) || continue
        if [[ $root == "$SCRATCH"/* ]] || tr '\0' ' ' <"$proc/cmdline" 2>/dev/null | grep -F -- "$SCRATCH/" >/dev/null; then
            printf '%s\n' "$pid"
        fi
    done
}

stop_engine() {
    [[ -n $DOCKERD_PID ]] || return 0
    kill -TERM "$DOCKERD_PID" 2>/dev/null || true
    local tries
    for ((tries = 0; tries < 150; tries++)); do
        kill -0 "$DOCKERD_PID" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$DOCKERD_PID" 2>/dev/null && kill -KILL "$DOCKERD_PID" 2>/dev/null
    wait "$DOCKERD_PID" 2>/dev/null || true
    DOCKERD_PID=""
    local pid
    for pid in $(own_processes); do
        info "stopping leftover process $pid ($(tr '\0' ' ' </proc/"$pid"/cmdline 2>/dev/null | cut -c1-80))"
        kill -KILL "$pid" 2>/dev/null || true
    done
}

# Mounts the engine left under the scratch directory (the network namespace file, overlays),
# deepest first.
unmount_scratch() {
    local target
    { findmnt -rn -o TARGET | grep "^$SCRATCH/" || true; } | sort -r | while read -r target; do
        umount "$target" 2>/dev/null || umount -l "$target" || true
    done
}

# Unmounts and removes the scratch directory; a process still writing into it (a debootstrap
# interrupted mid-install) is stopped first, and the removal retried.
remove_scratch() {
    if [[ ${SMOKE_KEEP:-0} == 1 ]]; then
        unmount_scratch
        info "kept $SCRATCH (SMOKE_KEEP=1)"
        return
    fi
    local tries pid
    for ((tries = 0; tries < 5; tries++)); do
        for pid in $(own_processes); do
            kill -KILL "$pid" 2>/dev/null
        done
        unmount_scratch
        if findmnt -rn -o TARGET | grep "^$SCRATCH/" >/dev/null; then
            sleep 1
            continue
        fi
        # --one-file-system: never follow a mount out of the scratch directory.
        rm -rf --one-file-system "$SCRATCH" 2>/dev/null && break
        sleep 1
    done
    if [[ -e $SCRATCH ]]; then
        info "could not remove $SCRATCH; mounts under it: $(findmnt -rn -o TARGET | grep -c "^$SCRATCH/")"
    else
        info "engine stopped, scratch directory removed"
    fi
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    # Clean up as much as possible: one failing step must not stop the others.
    set +e
    end_step
    if ((status != 0)) && [[ -n $DOCKERD_PID ]]; then
        if "$DOCKER" container inspect "$CONTAINER" >/dev/null 2>&1; then
            printf '\n---- container log (last 30 lines)\n' >&2
            "$DOCKER" logs "$CONTAINER" 2>&1 | tail -30 >&2
        fi
        printf -- '---- engine log (last 15 lines)\n' >&2
        tail -15 "$SCRATCH/engine/dockerd.log" >&2 || true
    fi
    printf '\n==> [%4ds] cleaning up\n' "$((SECONDS - STARTED))" >&2
    local cleanup_started=$SECONDS
    remove_service_guard
    if [[ -n $DOCKERD_PID ]]; then
        "$DOCKER" rm -f "$CONTAINER" >/dev/null 2>&1 || true
    fi
    stop_engine
    if [[ -n $SCRATCH && -d $SCRATCH ]]; then
        remove_scratch
    fi
    info "clean-up took $((SECONDS - cleanup_started)) s"
    TIMINGS+=("$(printf '%5ds  %s' "$((SECONDS - cleanup_started))" "clean up")")
    if ((status == 0)); then
        printf '\nTimings:\n' >&2
        printf '%s\n' "${TIMINGS[@]}" >&2
        printf '\nDocker smoke test passed in %d s\n' "$((SECONDS - STARTED))" >&2
    else
        printf '\nDocker smoke test FAILED after %d s (status %d)\n' "$((SECONDS - STARTED))" "$status" >&2
    fi
    exit "$status"
}

# ---- the image ---------------------------------------------------------------------------------

make_standins() {
    local tags
    # debian:bookworm-slim too: compose.yaml's disk-image service runs it.
    tags=$(bash "$REPO/docker/standin-images.sh" --dockerfile "$REPO/Dockerfile" --image debian:bookworm-slim \
        --workdir "$SCRATCH") ||
        fail "making the stand-in images failed (messages above)"
    ok "stand-ins: $(echo "$tags" | paste -sd' ')"
}

build_image() {
    # The classic builder: what Debian's engine runs without buildx, and it uses the local
    # stand-ins as they are. The build has no network: crates come from the builder stand-in.
    # Progress: the Dockerfile's steps and cargo's summary lines; the whole log on failure.
    local status
    set +e
    DOCKER_BUILDKIT=0 "$DOCKER" build --tag "$IMAGE" "$REPO" 2>&1 | tee "$SCRATCH/build.log" |
        grep --line-buffered -E '^Step [0-9]+/|Finished|^Successfully built' | sed -u 's/^/    | /' >&2
    status=${PIPESTATUS[0]}
    set -e
    if ((status != 0)); then
        tail -40 "$SCRATCH/build.log" >&2
        fail "docker build failed (log above)"
    fi
    ok "built $IMAGE"
}

inspect_image() {
    local size user healthcheck entrypoint ports
    size=$("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE")
    user=$("$DOCKER" image inspect -f '{{.Config.User}}' "$IMAGE")
    healthcheck=$("$DOCKER" image inspect -f '{{json .Config.Healthcheck.Test}}' "$IMAGE")
    entrypoint=$("$DOCKER" image inspect -f '{{json .Config.Entrypoint}}' "$IMAGE")
    # shellcheck disable=SC2016 # a Go template, not shell
    ports=$("$DOCKER" image inspect -f '{{range $p, $_ := .Config.ExposedPorts}}{{$p}} {{end}}' "$IMAGE")
    info "size $((size / 1000000)) MB ($size bytes; the base is a stand-in for distroless cc)"
    info "user $user, entrypoint $entrypoint, exposed $ports"
    info "healthcheck $healthcheck"
    [[ $user == 65532* || $user == nonroot* ]] || fail "the image runs as '$user', not the nonroot user"
    [[ $healthcheck == *'"ctl","health"'* ]] || fail "no HEALTHCHECK with nbdfault ctl health"
    [[ $ports == *10809/tcp* && $ports == *10810/tcp* ]] || fail "ports 10809 and 10810 are not exposed"
    ok "non-root, health check, exposed ports"
}

# ---- the running server ------------------------------------------------------------------------

# A TCP port nothing on this host listens on, other than the ports given.
free_port() {
    local port tries
    for ((tries = 0; tries < 200; tries++)); do
        port=$((20000 + RANDOM % 30000))
        [[ " $* " == *" $port "* ]] && continue
        if [[ -z $(ss -Hltn "sport = :$port") ]]; then
            printf '%s\n' "$port"
            return
        fi
    done
    fail "no free TCP port found"
}

run_container() {
    NBD_PORT=$(free_port)
    CONTROL_PORT=$(free_port "$NBD_PORT")
    CONTROL="http://127.0.0.1:$CONTROL_PORT"
    NBD="nbd://127.0.0.1:$NBD_PORT"
    TOKEN=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
    # The state directory, as a named volume would be: owned by the image's user, holding a disk
    # image for a file-backed export and the fault log.
    DATA="$SCRATCH/data"
    mkdir -p "$DATA"
    truncate -s 64M "$DATA/disk.img"
    chown -R 65532:65532 "$DATA"
    # Loopback addresses only (the host network is shared), a health check every second rather
    # than the image's 10 s so the test does not wait; its command is the image's, and it finds
    # the moved control API through NBDFAULT_CONTROL alone.
    "$DOCKER" run --detach --name "$CONTAINER" --network host \
        --env "NBDFAULT_LISTEN=127.0.0.1:$NBD_PORT" \
        --env "NBDFAULT_CONTROL=127.0.0.1:$CONTROL_PORT" \
        --env "NBDFAULT_CONTROL_TOKEN=$TOKEN" \
        --env NBDFAULT_FAULT_LOG=/var/lib/nbdfault/faults.jsonl \
        --volume "$DATA:/var/lib/nbdfault" \
        --health-interval 1s \
        "$IMAGE" --export disk=file:/var/lib/nbdfault/disk.img >/dev/null
    info "NBD on $NBD, control API on $CONTROL (token set)"
    local tries ready=""
    for ((tries = 0; tries < 200; tries++)); do
        ready=$("$DOCKER" logs "$CONTAINER" 2>/dev/null | grep -m1 '"event":"ready"' || true)
        [[ -n $ready ]] && break
        [[ $("$DOCKER" inspect -f '{{.State.Running}}' "$CONTAINER") == true ]] || fail "the container exited at start"
        sleep 0.1
    done
    [[ -n $ready ]] || fail "no ready line within 20 s"
    [[ $ready == *"127.0.0.1:$NBD_PORT"* && $ready == *"127.0.0.1:$CONTROL_PORT"* ]] || fail "ready line names other addresses: $ready"
    ok "ready: $ready"
    local pid uid
    pid=$("$DOCKER" inspect -f '{{.State.Pid}}' "$CONTAINER")
    uid=$(awk '/^Uid:/ {print $2}' "/proc/$pid/status")
    [[ $uid == 65532 ]] || fail "the server runs as uid $uid, not 65532"
    ok "the server is PID 1 of the container, host pid $pid, uid $uid"
}

# The control API with the token.
api() { curl -fsS --max-time 10 -H "Authorization: Bearer $TOKEN" "$@"; }

check_token() {
    local code
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 "$CONTROL/v1/health")
    [[ $code == 401 ]] || fail "the control API answered $code without the token, not 401"
    api "$CONTROL/v1/health" | grep '"status":"ok"' >/dev/null || fail "health with the token"
    ok "the control API refuses requests without the token (401) and answers with it"
}

check_exports() {
    local size
    size=$(nbdinfo --size "$NBD")
    [[ $size == 1073741824 ]] || fail "the default export is $size bytes, not 1 GiB"
    ok "nbdinfo: default export \"\" is 1 GiB (the image's configuration)"
    size=$(nbdinfo --size "$NBD/disk")
    [[ $size == 67108864 ]] || fail "export disk is $size bytes, not 64 MiB"
    ok "nbdinfo: export disk is 64 MiB (file-backed, from the host directory)"
    qemu-io -f raw "$NBD" -c 'write -P 0xa5 0 1M' -c 'read -P 0xa5 0 1M' >"$SCRATCH/qemu-io.log" 2>&1 ||
        fail "qemu-io write and read back on the default export: $(cat "$SCRATCH/qemu-io.log")"
    ok "qemu-io: 1 MiB written and read back on the default export"
    qemu-io -f raw "$NBD/disk" -c 'write -P 0x5a 0 1M' -c 'write -P 0x11 1M 4k' -c flush >"$SCRATCH/qemu-io.log" 2>&1 ||
        fail "qemu-io writes to export disk: $(cat "$SCRATCH/qemu-io.log")"
    cmp -s -n 1048576 "$DATA/disk.img" <(head -c 1048576 /dev/zero | tr '\0' '\132') ||
        fail "the bytes written to export disk are not in the host's disk image"
    ok "qemu-io: writes to export disk reached the disk image on the host"
}

check_fault() {
    api -X PUT --data-binary "@$POLICY" "$CONTROL/v1/exports/disk/policy" >/dev/null
    ok "PUT policy $(basename "$POLICY") on export disk"
    # Not armed yet: the write passes.
    qemu-io -f raw "$NBD/disk" -c 'write -P 0x22 1M 4k' >"$SCRATCH/qemu-io.log" 2>&1 ||
        fail "a write before arming failed: $(cat "$SCRATCH/qemu-io.log")"
    ok "before arming, a write to 1 MiB passes"
    api -X POST "$CONTROL/v1/exports/disk/triggers/$TRIGGER" | grep '"armed":true' >/dev/null || fail "arming $TRIGGER"
    ok "POST trigger $TRIGGER"
    if qemu-io -f raw "$NBD/disk" -c 'write -P 0x33 1M 4k' >"$SCRATCH/qemu-io.log" 2>&1; then
        fail "the write to the armed range succeeded: $(cat "$SCRATCH/qemu-io.log")"
    fi
    grep -q 'write failed: Input/output error' "$SCRATCH/qemu-io.log" ||
        fail "qemu-io failed otherwise than with EIO: $(cat "$SCRATCH/qemu-io.log")"
    ok "qemu-io: write failed: Input/output error"
    # The policy fails the write without storing it: the disk keeps the earlier bytes.
    [[ $(od -An -tx1 -j 1048576 -N 1 "$DATA/disk.img" | tr -d ' ') == 22 ]] ||
        fail "the failed write changed the disk image"
    ok "the disk still holds the bytes from before the failed write"
    local faults
    faults=$(api "$CONTROL/v1/exports/disk/faults?since=0")
    info "fault log: $faults"
    [[ $(grep -c . <<<"$faults") == 1 ]] || fail "expected one fault record"
    [[ $faults == *'"op":"write"'* && $faults == *'"offset":1048576'* && $faults == *'"errno":"EIO"'* &&
        $faults == *"\"rule\":\"$RULE\""* ]] || fail "the fault record does not describe the failed write"
    ok "GET /v1/exports/disk/faults records the failed write (rule $RULE, EIO)"
    # nbdfault ctl in the container: no shell needed, URL and token from the image's environment.
    "$DOCKER" exec "$CONTAINER" nbdfault ctl faults disk | grep "\"rule\":\"$RULE\"" >/dev/null ||
        fail "docker exec ... nbdfault ctl faults disk"
    ok "docker exec CONTAINER nbdfault ctl faults disk shows it too"
}

check_health() {
    local tries status=""
    for ((tries = 0; tries < 300; tries++)); do
        status=$("$DOCKER" inspect -f '{{.State.Health.Status}}' "$CONTAINER")
        [[ $status == healthy || $status == unhealthy ]] && break
        sleep 0.1
    done
    [[ $status == healthy ]] || fail "health status is '$status': $("$DOCKER" inspect -f '{{json .State.Health.Log}}' "$CONTAINER")"
    ok "HEALTHCHECK: healthy"
}

# Matches below read their whole input (grep PATTERN >/dev/null, not grep -q): grep -q stops at the
# first match, and under pipefail the writer's SIGPIPE then fails the pipeline at random.
check_stop() {
    local started_ns elapsed_ms code
    started_ns=$(date +%s%N)
    # -t 10: Docker's default grace before SIGKILL; a server that ignored SIGTERM would take 10 s.
    "$DOCKER" stop -t 10 "$CONTAINER" >/dev/null
    elapsed_ms=$((($(date +%s%N) - started_ns) / 1000000))
    code=$("$DOCKER" inspect -f '{{.State.ExitCode}}' "$CONTAINER")
    info "docker stop took $elapsed_ms ms, exit status $code"
    [[ $code == 0 ]] || fail "the server exited with status $code after SIGTERM"
    ((elapsed_ms <= STOP_LIMIT_MS)) || fail "docker stop took $elapsed_ms ms (limit $STOP_LIMIT_MS ms)"
    "$DOCKER" logs "$CONTAINER" 2>&1 | grep 'SIGTERM received' >/dev/null || fail "the server did not log SIGTERM"
    ok "SIGTERM: exit 0 in $elapsed_ms ms"
    grep -q "\"rule\":\"$RULE\"" "$DATA/faults.jsonl" || fail "the fault log file has no record"
    ok "the fault log file (NBDFAULT_FAULT_LOG) on the host directory holds the record"
}

# compose.yaml with the override for engines without a bridge, driven as docs/docker.md says.
check_compose() {
    local nbd_port control_port nbd container faults tries size=""
    "$DOCKER" tag "$IMAGE" nbdfault:latest # compose.yaml's image: no build here, the image is made
    nbd_port=$(free_port)
    control_port=$(free_port "$nbd_port")
    nbd="nbd://127.0.0.1:$nbd_port/disk"
    local compose=(env "NBDFAULT_LISTEN=127.0.0.1:$nbd_port" "NBDFAULT_CONTROL=127.0.0.1:$control_port"
        docker-compose --project-name "nbdfault-smoke-$$" --project-directory "$REPO"
        -f "$REPO/compose.host.yaml")
    "${compose[@]}" up -d --no-build >"$SCRATCH/compose.log" 2>&1 ||
        fail "docker-compose -f compose.host.yaml up: $(cat "$SCRATCH/compose.log")"
    for ((tries = 0; tries < 200; tries++)); do
        size=$(nbdinfo --size "$nbd" 2>/dev/null) && break
        sleep 0.1
    done
    [[ $size == 1073741824 ]] || fail "compose: export disk on $nbd is '$size' bytes, not the volume's 1 GiB image"
    ok "compose up with compose.host.yaml: export disk (1 GiB on the volume) on $nbd"
    "${compose[@]}" exec -T nbdfault nbdfault ctl exports disk </dev/null | grep -E '"name": ?"disk"' >/dev/null ||
        fail "docker-compose exec -T nbdfault nbdfault ctl exports disk"
    ok "docker-compose exec -T nbdfault nbdfault ctl exports disk"
    curl -fsS --max-time 10 -X POST "http://127.0.0.1:$control_port/v1/exports/disk/triggers/$TRIGGER" >/dev/null ||
        fail "compose: arming $TRIGGER"
    if qemu-io -f raw "$nbd" -c 'write -P 0x44 1M 4k' >"$SCRATCH/qemu-io.log" 2>&1; then
        fail "compose: the write to the armed range succeeded"
    fi
    ok "compose: armed $TRIGGER, qemu-io's write to 1 MiB failed"
    # The fault log on the volume, from the host: stop (the file is then complete), copy it out.
    "${compose[@]}" stop nbdfault >>"$SCRATCH/compose.log" 2>&1
    container=$("${compose[@]}" ps -q nbdfault)
    "$DOCKER" cp "$container:/var/lib/nbdfault/faults.jsonl" "$SCRATCH/compose-faults.jsonl"
    faults=$(cat "$SCRATCH/compose-faults.jsonl")
    [[ $faults == *"\"rule\":\"$RULE\""* && $faults == *'"offset":1048576'* ]] ||
        fail "the fault log copied from the volume has no record of the failed write: $faults"
    ok "docker cp \$(docker-compose ps -q nbdfault):/var/lib/nbdfault/faults.jsonl: the record is there"
    "${compose[@]}" down -v >>"$SCRATCH/compose.log" 2>&1 || fail "docker-compose down -v: $(cat "$SCRATCH/compose.log")"
    ok "compose down -v"
}

main() {
    if [[ ${1:-} == --download-packages ]]; then
        ((EUID == 0)) || fail "run as root (apt-get)"
        DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --download-only \
            --no-install-recommends "${PACKAGES[@]}" >/dev/null
        return
    fi
    check_host
    SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/nbdfault-smoke.XXXXXX")
    chmod 755 "$SCRATCH" # the container's user reaches its data directory through it
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    info "repository $REPO, scratch $SCRATCH"

    step "packages"
    install_packages
    step "private Docker engine (no bridge, no iptables)"
    start_engine
    step "stand-in base images"
    make_standins
    step "docker build (the project's Dockerfile, unchanged)"
    build_image
    inspect_image
    step "run the container (host network, loopback ports)"
    run_container
    step "control API token"
    check_token
    step "exports (nbdinfo, qemu-io)"
    check_exports
    step "fault through the control API"
    check_fault
    step "health check"
    check_health
    step "docker stop"
    check_stop
    step "compose with compose.host.yaml"
    check_compose
    end_step
}

main "$@"
