#!/usr/bin/env bash
# The project's main job on its embedded default (README): set up .venv, then run the happy-tweet
# recipe (the embedded tweet GPT-2 is built and cached on first use; VADER is the human; CPU).
# Extra arguments override the recipe's YAML (e.g. --output_dir DIR, --method partial_sgd).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bootstrap.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python recipes/happy_tweet/train.py --config recipes/happy_tweet/config.yaml "$@"
