"""Happy-tweet RLHF recipe (TRL script shape): `TrlParser` over (HappyTweetArguments, BilevelConfig, ModelConfig).

    accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/happy_tweet/train.py \
        --config recipes/happy_tweet/config.yaml [--method partial_sgd --output_dir outputs/psgd ...]

The implementation is `bilevel_rlhf.happy_tweet.recipe` (also the console script `bilevel-happy-tweet`).
"""

from bilevel_rlhf.happy_tweet.recipe import cli

if __name__ == "__main__":
    cli()
