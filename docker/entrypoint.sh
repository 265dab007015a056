#!/bin/sh
# The image's entrypoint: every argument goes to `dtrain launch` (torchrun options, CONFIG, overrides).
# With no arguments it trains the built-in task on every visible GPU (2 CPU processes without one).
#
# On Kubernetes, DTRAIN_WAIT_FOR_HOST names the rendezvous node (`<job>-0.<svc>`). Its DNS record
# appears a moment after the pod starts; torchrun decides whether it hosts the c10d store by
# resolving that name once, so wait: on node 0 until the name resolves to this pod, elsewhere until
# it resolves at all.
set -eu

wait_for_rendezvous_host() {
    host="$1"
    deadline=$(( $(date +%s) + ${DTRAIN_WAIT_TIMEOUT_S:-600} ))
    own_address=""
    if [ "${host%%.*}" = "$(hostname)" ]; then
        own_address=$(getent hosts "$(hostname)" | awk '{print $1; exit}')
    fi
    while :; do
        address=$(getent hosts "$host" | awk '{print $1; exit}') || address=""
        if [ -n "$address" ] && { [ -z "$own_address" ] || [ "$address" = "$own_address" ]; }; then
            return 0
        fi
        if [ "$(date +%s)" -ge "$deadline" ]; then
            echo "dtrain-entrypoint: $host did not resolve${own_address:+ to $own_address} within" \
                 "${DTRAIN_WAIT_TIMEOUT_S:-600}s; is the headless Service applied?" >&2
            exit 1
        fi
        sleep 1
    done
}

# Docker's default /dev/shm is 64 MiB: NCCL between GPUs and DataLoader workers need more.
shm_kib=$(df -Pk /dev/shm 2>/dev/null | awk 'NR == 2 {print $2}') || shm_kib=""
if [ -n "$shm_kib" ] && [ "$shm_kib" -lt 1048576 ]; then
    echo "dtrain-entrypoint: warning: /dev/shm has only $((shm_kib / 1024)) MiB; start the container" \
         "with --ipc=host or --shm-size=16g (Kubernetes: an emptyDir with medium: Memory on /dev/shm)" >&2
fi

if [ -n "${DTRAIN_WAIT_FOR_HOST:-}" ]; then
    wait_for_rendezvous_host "$DTRAIN_WAIT_FOR_HOST"
fi
exec dtrain launch "$@"
