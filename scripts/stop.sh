#!/usr/bin/env bash
# Stop exactly what scripts/serve.sh started: each recorded process group, the worker first
# (a worker whose server is gone ignores SIGTERM), then MLflow and the Prefect server.
set -uo pipefail
cd "$(dirname "$0")/.."
PIDS="$PWD/.prefect/pids"

stop() {  # stop NAME: SIGINT the group, then SIGTERM, then SIGKILL after grace periods
  local name=$1 f="$PIDS/$1.pid" pgid
  [[ -f $f ]] || return 0
  pgid=$(cat "$f")
  if kill -0 -- "-$pgid" 2>/dev/null; then
    for sig in INT TERM KILL; do
      kill -s "$sig" -- "-$pgid" 2>/dev/null || break
      for _ in $(seq 1 30); do
        kill -0 -- "-$pgid" 2>/dev/null || break 2
        sleep 0.5
      done
    done
    echo "stopped $name (pgid $pgid)"
  fi
  rm -f "$f"
}

stop worker
stop mlflow
stop prefect-server
