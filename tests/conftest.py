"""Shared test setup: everything runs offline, so an accidental hub access fails fast."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
# Small dense linear algebra (tabular solvers, tiny models): multi-threaded BLAS on 2 shared cores was
# measured 6x slower than one thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# The test models are tiny: more threads only add synchronization overhead (10-15x slower seen on
# 2 shared cores). Subprocesses spawned by tests set their own thread count.
import torch  # noqa: E402

torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """The cut-down tweet model (seconds to build), built once for the session: recipe runs read it, none writes it."""
    from bilevel_rlhf.happy_tweet.build_model import TweetModelConfig, build_tweet_model

    path = tmp_path_factory.mktemp("models") / "tiny"
    build_tweet_model(path, TweetModelConfig.cut_down())
    return str(path)
