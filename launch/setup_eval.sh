#!/usr/bin/env bash
# The eval extra: lm-evaluation-harness for recipes/evaluate.py --harness_tasks (requirements-eval.txt).
#
#   bash launch/setup_eval.sh                      # after bash launch/setup_env.sh (uses the same .venv)
#   PYTHON=/path/to/python bash launch/setup_eval.sh
#   DRY_RUN=1 bash launch/setup_eval.sh            # print the pip command only
#
# Skipped when the pinned lm-eval is already installed. torch, transformers, peft, trl, datasets and accelerate
# must not move: they are compared before and after, and a change is an error (reinstall with setup_env.sh).
source "$(dirname "$0")/lib.sh"

STACK="torch transformers peft trl datasets accelerate"
versions() {
  "$PY" - "$STACK" <<'PYEOF'
import importlib.metadata as m, sys
def version(p):
    try:
        return m.version(p)
    except m.PackageNotFoundError:
        return "none"
print(" ".join(f"{p}=={version(p)}" for p in sys.argv[1].split()))
PYEOF
}
WANT=$(sed -n 's/^lm-eval\[hf\]==\([0-9.]*\).*/\1/p' requirements-eval.txt)
[[ -n "$WANT" ]] || { echo "setup_eval.sh: no lm-eval[hf]==X pin in requirements-eval.txt" >&2; exit 1; }

if "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('lm_eval') != '$WANT')" 2>/dev/null; then
  echo "setup_eval.sh: lm-eval $WANT already installed in $PY"
  exit 0
fi
BEFORE=$(versions)
announce "$PY" -m pip install -r requirements-eval.txt
"$PY" -m pip install -r requirements-eval.txt
AFTER=$(versions)
if [[ "$BEFORE" != "$AFTER" ]]; then
  echo "setup_eval.sh: the training stack moved: $BEFORE -> $AFTER; reinstall it with bash launch/setup_env.sh" >&2
  exit 1
fi
"$PY" -c "import lm_eval; print('setup_eval.sh: lm-eval', lm_eval.__version__, 'imports; try: bash launch/evaluate.sh --harness_tasks persona_keywords')"
