#!/bin/sh
# Entrypoint of the tasker image: gives the process a unique INSTANCE_ID, then
# execs the command (so the service is PID 1 and receives SIGTERM directly).
#
# Why not `INSTANCE_ID: "orch-event-${HOSTNAME}"` in the compose file: compose
# interpolates ${HOSTNAME} on the host, once, so every replica would get the
# same id. Instead the compose file sets INSTANCE_ID_PREFIX per service and we
# append, here, inside each container:
#   - the container's hostname (its short container id: unique per replica),
#   - the start time in seconds (a restarted container gets a new id, so it
#     never mistakes its previous incarnation's claims for its own).
# An explicit INSTANCE_ID wins; with neither set, the binary's own default
# (<service>-<host>-<pid>-<start>) is used, which is unique as well.
set -eu

if [ -z "${INSTANCE_ID:-}" ] && [ -n "${INSTANCE_ID_PREFIX:-}" ]; then
    INSTANCE_ID="${INSTANCE_ID_PREFIX}-$(cat /proc/sys/kernel/hostname)-$(date +%s)"
    export INSTANCE_ID
fi

exec "$@"
