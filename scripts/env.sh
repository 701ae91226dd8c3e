# Source me (`. scripts/env.sh`) to talk to what `make serve` started from this shell:
#   prefect deployment run train-all/train-all -p profile=smoke --watch
_mc_root="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")/.." && pwd)"
export PATH="$_mc_root/.venv/bin:$PATH"
export PREFECT_HOME="$_mc_root/.prefect"
export PREFECT_API_URL="http://127.0.0.1:${PREFECT_PORT:-4242}/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///$_mc_root/mlflow.db}"
unset _mc_root
