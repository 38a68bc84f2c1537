#!/usr/bin/env bash
# The project's test command (README, CI): set up .venv, then run the whole suite offline.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bootstrap.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"
exec python -m pytest -q -p no:cacheprovider "$@"
