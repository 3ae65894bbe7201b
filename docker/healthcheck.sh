#!/bin/sh
# Docker HEALTHCHECK probe of the tasker image: GET /health/ready on this
# container's own HTTP port (200 when the database is reachable and, in modes
# that listen, the LISTEN connection is up).
#
# The port comes from TASKER_HTTP_ADDR when it is set. Otherwise the image does
# not know whether it runs the orchestrator (default :8080) or a worker
# (default :8081), so it tries both: the wrong one is refused immediately.
set -eu

if [ -n "${TASKER_HTTP_ADDR:-}" ]; then
    ports="${TASKER_HTTP_ADDR##*:}"
else
    ports="8080 8081"
fi

for port in $ports; do
    if curl -fsS -o /dev/null --max-time 3 "http://127.0.0.1:${port}/health/ready" 2>/dev/null; then
        exit 0
    fi
done
exit 1
