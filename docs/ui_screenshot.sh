#!/usr/bin/env bash
# Screenshot of the MLflow UI comparing the per-field effects of two runs in one experiment.
#
#   bash docs/ui_screenshot.sh [out.png]      (default docs/mlflow-ui-compare.png)
#   CAE_BIN=/path/to/venv/bin bash docs/ui_screenshot.sh   (default .venv/bin)
#
# Records two short trainings into a temporary sqlite store, both without naming an experiment:
# one through the MLproject (`mlflow run . --env-manager local`), one with `cae train`; both land
# in MLflow's Default experiment. Serves the store with `mlflow ui` on 127.0.0.1 and photographs
# the experiment's chart view through the saved view cae adds ("cae: field effects first") with
# headless Chromium (Debian: apt-get install chromium). The server is stopped by its pid on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/mlflow-ui-compare.png}
bin=${CAE_BIN:-.venv/bin}
work=$(mktemp -d)
server=""
cleanup() { [ -n "$server" ] && kill "$server" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

export MLFLOW_TRACKING_URI="sqlite:///$work/mlflow.db"
export CAE_TRAIN__PROGRESS=false
[ -d data/demo ] || "$bin/cae" -q synth --out data/demo
CAE_OUTPUT__DIR="$work/project" PATH="$bin:$PATH" "$bin/mlflow" run . --env-manager local \
  --run-name "mlflow run" -P epochs=8 >"$work/project.log" 2>&1
"$bin/cae" -q train --config experiments/demo.toml --data data/demo --epochs 8 --seed 1 \
  --out "$work/train" --run-name "cae train"

port=$("$bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$bin/mlflow" ui --backend-store-uri "$MLFLOW_TRACKING_URI" --host 127.0.0.1 --port "$port" \
  >"$work/ui.log" 2>&1 &
server=$!
for _ in $(seq 60); do
  curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
  sleep 1
done

experiment=$("$bin/python" -c 'import mlflow; print(mlflow.get_experiment_by_name("Default").experiment_id)')
url="http://127.0.0.1:$port/#/experiments/$experiment/runs?compareRunsMode=CHART&viewStateShareKey=cae-field-effects"
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$work/chrome" --hide-scrollbars --window-size=1600,1100 \
  --virtual-time-budget=90000 --screenshot="$out" \
  "$url" 2>"$work/chrome.log"
echo "wrote $out"
