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

if [ -n "${DTRAIN_WAIT_FOR_HOST:-}" ]; then
    wait_for_rendezvous_host "$DTRAIN_WAIT_FOR_HOST"
fi
exec dtrain launch "$@"
