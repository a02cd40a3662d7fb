#!/usr/bin/env bash
# Screenshot of the MLflow UI comparing the per-field contributions of two runs.
#
#   bash docs/ui_screenshot.sh [out.png]      (default docs/mlflow-ui-compare.png)
#
# Trains two short runs (all three fields; cell_type and sex only) into a temporary sqlite store,
# serves it with `mlflow ui` on 127.0.0.1, and photographs the run-comparison page with headless
# Chromium (Debian: apt-get install chromium). The server is stopped by its pid on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/mlflow-ui-compare.png}
bin=.venv/bin
work=$(mktemp -d)
server=""
cleanup() { [ -n "$server" ] && kill "$server" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

export MLFLOW_TRACKING_URI="sqlite:///$work/mlflow.db"
common=(--data data/demo --epochs 6 --no-progress --out)
$bin/cae -q train "${common[@]}" "$work/all" --run-name all-fields
$bin/cae -q train "${common[@]}" "$work/two" --run-name cell_type+sex --fields cell_type,sex

port=$($bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
$bin/mlflow ui --backend-store-uri "$MLFLOW_TRACKING_URI" --host 127.0.0.1 --port "$port" \
  >"$work/ui.log" 2>&1 &
server=$!
for _ in $(seq 60); do
  curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
  sleep 1
done

ids=$($bin/python - <<'PY'
import json, mlflow
experiment = mlflow.get_experiment_by_name("cae")
runs = mlflow.search_runs([experiment.experiment_id])
print(json.dumps({"runs": list(runs.run_id), "experiments": [experiment.experiment_id]}))
PY
)
# The experiment's chart view: one chart per metric, both runs in each; the contrib_l2/* and
# contrib_share/* charts sort first.
experiment=$($bin/python -c 'import json, sys; print(json.loads(sys.argv[1])["experiments"][0])' "$ids")
url="http://127.0.0.1:$port/#/experiments/$experiment/runs?compareRunsMode=CHART"
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$work/chrome" --hide-scrollbars --window-size=1600,1100 \
  --virtual-time-budget=90000 --screenshot="$out" \
  "$url" 2>"$work/chrome.log"
echo "wrote $out"
