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

descendants() {  # every descendant pid of $1
  local c
  for c in $(ps -eo pid=,ppid= | awk -v p="$1" '$2 == p {print $1}'); do
    echo "$c"
    descendants "$c"
  done
}

# Flow runs may start in their own session (Prefect isolates them): note the worker's
# descendants first, and stop whatever of them outlives the worker.
runs=""
if [[ -f $PIDS/worker.pid ]]; then
  runs=$(descendants "$(cat "$PIDS/worker.pid")")
fi
stop worker
for pid in $runs; do
  pgid=$(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ') || continue
  [[ -n $pgid ]] || continue
  echo "$pgid" >"$PIDS/run-$pgid.pid"
  stop "run-$pgid"
done
stop mlflow
stop prefect-server
# The checkout's Prefect profile points at the server only while it runs (see serve.sh).
if [[ -f $PWD/.prefect/profiles.toml ]]; then
  PREFECT_HOME="$PWD/.prefect" "${VENV:-$PWD/.venv}/bin/prefect" config unset PREFECT_API_URL \
    >/dev/null 2>&1 || true
fi
