"""The happy-tweet experiment: human-rated tweets, prompts, a display filter and the default small GPT-2."""

from .build_model import (
    TweetModelConfig,
    build_tweet_model,
    check_model_dir,
    default_cache_dir,
    get_default_model,
    get_default_reward_model_init,
    load_tweet_model,
)
from .data import TWEETS_PATH, filter_text, is_clean, is_eval_id, load_prompt_dataset, load_tweets, split_prompt

__all__ = [
    "TWEETS_PATH",
    "TweetModelConfig",
    "build_tweet_model",
    "check_model_dir",
    "default_cache_dir",
    "filter_text",
    "get_default_model",
    "get_default_reward_model_init",
    "is_clean",
    "is_eval_id",
    "load_prompt_dataset",
    "load_tweet_model",
    "load_tweets",
    "split_prompt",
]
