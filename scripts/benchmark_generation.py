"""Time one `generate` call for two LoRA actors: separate PEFT calls, PEFT's mixed-adapter batch, and the trainer's
stacked adapters (`bilevel_rlhf.adapters`), beside the bare base; and check that they give the same completions.

    python scripts/benchmark_generation.py                 # embedded tweet GPT-2, LoRA r=16 on every linear layer
    python scripts/benchmark_generation.py --model outputs/smollm2-135m-instruct --rows 8

Greedy decoding of exactly --new_tokens tokens, medians of --repeats calls, 1 torch thread by default.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="a local causal-LM folder (default: the embedded tweet GPT-2)")
    p.add_argument("--rows", type=int, default=16, help="completions per actor")
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--lora_r", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bilevel_rlhf.adapters import stacked_adapters

    path = args.model
    if path is None:
        from bilevel_rlhf.happy_tweet import get_default_model

        path = str(get_default_model())
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.pad_token or tok.eos_token
    tok.padding_side = "left"
    config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules="all-linear",
                        task_type="CAUSAL_LM")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path), config, adapter_name="theta")
    model.add_adapter("phi", config)
    with torch.no_grad():  # two different, non-zero adapters
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
    model.eval()
    prompts = (["i love the", "today is a", "my dog", "we went to"] * args.rows)[: args.rows]
    enc = tok(prompts, return_tensors="pt", padding=True)
    ids, mask = enc.input_ids, enc.attention_mask
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
              pad_token_id=tok.pad_token_id)

    def timed(fn):
        times, out = [], None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times), out

    def one(adapter):
        model.set_adapter(adapter)
        return model.generate(input_ids=ids, attention_mask=mask, **kw)

    def stacked():
        with stacked_adapters(model, ["theta", "phi"], args.rows):
            return model.generate(input_ids=ids.repeat(2, 1), attention_mask=mask.repeat(2, 1), **kw)

    with torch.no_grad():
        t_one, _ = timed(lambda: one("theta"))
        t_two, two = timed(lambda: torch.cat([one("theta"), one("phi")]))
        t_mixed, mixed = timed(lambda: model.generate(input_ids=ids.repeat(2, 1), attention_mask=mask.repeat(2, 1),
                                                      adapter_names=["theta"] * args.rows + ["phi"] * args.rows, **kw))
        t_stacked, stack = timed(stacked)
        with model.disable_adapter():
            t_base, _ = timed(lambda: model.generate(input_ids=ids, attention_mask=mask, **kw))
            t_base2, _ = timed(lambda: model.generate(input_ids=ids.repeat(2, 1), attention_mask=mask.repeat(2, 1), **kw))
    print(f"model {os.path.basename(path.rstrip('/'))}, LoRA r={args.lora_r}, {args.rows} rows per actor, "
          f"{args.new_tokens} new tokens, {args.threads} thread(s), medians of {args.repeats}")
    print("| generation call | time | ratio to one actor | outputs |\n|---|---|---|---|")
    rows = [("theta alone (one PEFT adapter)", t_one, ""),
            ("theta then phi (two PEFT calls)", t_two, ""),
            (f"PEFT's mixed-adapter batch (adapter_names), {2 * args.rows} rows", t_mixed,
             "identical to the two calls" if torch.equal(mixed, two) else "DIFFERENT from the two calls"),
            (f"stacked adapters (stacked_adapters), {2 * args.rows} rows", t_stacked,
             "identical to the two calls" if torch.equal(stack, two) else "DIFFERENT from the two calls"),
            (f"the bare base, {args.rows} rows", t_base, ""),
            (f"the bare base, {2 * args.rows} rows", t_base2, "")]
    for name, t, note in rows:
        print(f"| {name} | {t:.3f} s | {t / t_one:.2f}x | {note} |")


if __name__ == "__main__":
    main()
