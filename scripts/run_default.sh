#!/usr/bin/env bash
# The project's main job on its embedded default (README): set up .venv, then run the default recipe.
# Extra arguments are passed to the recipe (e.g. --output_dir DIR, --seeds 3).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bootstrap.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"
exec python recipes/gridworld/run.py --config recipes/gridworld/config.yaml "$@"
