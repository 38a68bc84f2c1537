"""Run every bilevel method on the tabular GridWorld goal-placement problem.

    python recipes/gridworld/run.py --config recipes/gridworld/config.yaml --output_dir outputs/gridworld
    python recipes/gridworld/run.py --config recipes/gridworld/config.yaml --seeds 3 --methods single_loop exact
"""

import os

# The solvers do many small (100 x 100) linear solves: one BLAS thread is faster than several,
# and much faster on a shared machine. Must be set before numpy is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from bilevel_rlhf.gridworld.recipe import cli  # noqa: E402

if __name__ == "__main__":
    cli()
