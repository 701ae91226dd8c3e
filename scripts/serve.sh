#!/usr/bin/env bash
# Start, in the background, a local Prefect server (127.0.0.1:4242), a process work pool with
# one worker, the train-all deployments, and an MLflow server (UI on 127.0.0.1:5000). All state
# stays inside the checkout: PREFECT_HOME=.prefect/, mlflow.db, mlartifacts/, logs/serve/.
# Each process runs in its own process group (setsid); scripts/stop.sh stops exactly those.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VENV:-$ROOT/.venv}
PREFECT_PORT=${PREFECT_PORT:-4242}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
POOL=${POOL:-local-process}
export PATH="$VENV/bin:$PATH"
export PREFECT_HOME="$ROOT/.prefect"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=90
export PREFECT_API_URL="http://127.0.0.1:$PREFECT_PORT/api"
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///$ROOT/mlflow.db}"
export MC_CHECKOUT="$ROOT"
PIDS="$PREFECT_HOME/pids"
LOGS="$ROOT/logs/serve"
mkdir -p "$PIDS" "$LOGS"

alive() { [[ -f "$PIDS/$1.pid" ]] && kill -0 "$(cat "$PIDS/$1.pid")" 2>/dev/null; }

start() {  # start NAME CMD...: a new session (pid = process group id), output to logs/serve/
  local name=$1; shift
  if alive "$name"; then echo "$name already running (pid $(cat "$PIDS/$name.pid"))"; return; fi
  setsid "$@" >"$LOGS/$name.log" 2>&1 </dev/null &
  echo $! >"$PIDS/$name.pid"
  echo "started $name (pgid $!), log: logs/serve/$name.log"
}

wait_http() {  # wait_http NAME URL SECONDS
  python - "$@" <<'PY'
import sys, time, urllib.request
name, url, limit = sys.argv[1], sys.argv[2], float(sys.argv[3])
t0 = time.time()
while time.time() - t0 < limit:
    try:
        urllib.request.urlopen(url, timeout=3)
        print(f"{name} healthy after {time.time() - t0:.0f} s: {url}")
        sys.exit(0)
    except Exception:
        time.sleep(1)
sys.exit(f"{name} not healthy after {limit:.0f} s (see logs/serve/{name}.log)")
PY
}

start prefect-server prefect server start --host 127.0.0.1 --port "$PREFECT_PORT"
# Migrate the MLflow schema once, before the UI server and any stage open the database.
python -c "import mc_registry; mc_registry.migrate()"
# The job runner (GenAI evaluation jobs, 8 huey processes) is not needed here: off.
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false start mlflow mlflow server --backend-store-uri "$MLFLOW_TRACKING_URI" \
  --default-artifact-root "$ROOT/mlartifacts" --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1
wait_http prefect-server "$PREFECT_API_URL/health" 120

# Record the API URL in the checkout's Prefect profile: with PREFECT_HOME=<checkout>/.prefect
# (scripts/env.sh), plain `prefect ...` commands find this server.
prefect config set PREFECT_API_URL="$PREFECT_API_URL" >/dev/null
prefect --no-prompt work-pool create "$POOL" --type process >/dev/null 2>&1 \
  || echo "work pool $POOL exists"
prefect --no-prompt deploy --all >"$LOGS/deploy.log" 2>&1 \
  || { cat "$LOGS/deploy.log"; exit 1; }
echo "deployed: train-all/train-all, train-all/train-all-dask"
start worker prefect worker start --pool "$POOL"
wait_http mlflow "http://127.0.0.1:$MLFLOW_PORT/health" 120

cat <<MSG

Prefect UI   http://127.0.0.1:$PREFECT_PORT   (export PREFECT_API_URL=$PREFECT_API_URL)
MLflow UI    http://127.0.0.1:$MLFLOW_PORT
Run:         . scripts/env.sh   # PREFECT_HOME, PREFECT_API_URL, PATH (venv), MLFLOW_TRACKING_URI
             prefect deployment run train-all/train-all -p profile=smoke --watch
Stop:        make stop
MSG
