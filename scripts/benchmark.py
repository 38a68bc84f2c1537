"""Benchmark: TRL RLOO step vs our partial_sgd step vs our single_loop iteration, interleaved, same model and work;
plus the GridWorld backend's speed at growing grid sizes. Writes <output_dir>/results.json and table.md.

    python scripts/benchmark.py                                   # embedded tweet GPT-2, 2 threads
    python scripts/benchmark.py --use_peft --gridworld false      # LoRA on one shared base
    python scripts/benchmark.py --model /path/to/smollm2 --steps 10

The harness is `benchmarks/harness.py` at the repository root (not part of the installed package).
"""

import sys
from pathlib import Path

# the repository root, so that `benchmarks` imports however this script is started (its worker processes, spawned,
# inherit this sys.path)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import BenchmarkArguments, markdown_tables, run_benchmark  # noqa: E402


def main() -> None:
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses()
    result = run_benchmark(args)
    print(markdown_tables(result))
    print(f"written: {args.output_dir}/results.json, {args.output_dir}/table.md")


if __name__ == "__main__":
    main()
