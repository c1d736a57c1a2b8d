#!/usr/bin/env bash
# Install the tracking extra (MLflow, requirements-tracking.txt) into the recipes' interpreter; safe to rerun.
#
#   bash launch/setup_tracking.sh                  # after bash launch/setup_env.sh (uses the same .venv)
#   PYTHON=/path/to/python bash launch/setup_tracking.sh
#
# Then --report_to mlflow on a training recipe, --register_model NAME on merge_export, and
#   mlflow ui --backend-store-uri sqlite:///runs/mlflow.db       (docs/tracking.md)
# It moves pyarrow 26.0.1 back to 25.0.1 (mlflow 3.17.2 caps it); torch is never touched (checked at the end).
source "$(dirname "$0")/lib.sh"
announce "$PY" -m pip install -r requirements-tracking.txt
"$PY" -m pip install --quiet --disable-pip-version-check -r requirements-tracking.txt
"$PY" - <<'PY'
import torch, datasets, mlflow, sqlalchemy
assert torch.__version__.startswith("2.13.0"), f"torch {torch.__version__} replaced the pinned 2.13.0"
print(f"ready: mlflow {mlflow.__version__} (SQLite store: SQLAlchemy {sqlalchemy.__version__}), datasets {datasets.__version__}")
PY
