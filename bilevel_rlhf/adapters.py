"""Several LoRA adapters of one PEFT model in one batch: `stacked_adapters`.

With LoRA, theta and phi are two adapters on one frozen base, and the reference is the bare base. Their rows can
then share every forward pass of the base: a batch laid out in blocks, [theta's rows; phi's rows; the reference's
rows], goes through each base layer once, and each adapter block adds its own low-rank product
`scaling * (x @ A^T) @ B^T`. The adapters' products are computed for all adapter blocks at once, with two batched
matmuls per layer over the stacked `A` and `B` weights. PEFT's own mixed-adapter batches (`adapter_names`) loop over
the adapters, gathering and scattering each one's rows, which keeps most of the per-adapter cost on small models
(docs/benchmarks.md). Written here because neither PEFT nor TRL has it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

__all__ = ["stacked_adapters", "supports_stacked_adapters"]


def _lora_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def supports_stacked_adapters(model: nn.Module, adapters: Sequence[str]) -> bool:
    """Whether every LoRA layer of `model` is a plain, unmerged `lora.Linear` whose `adapters` are vanilla LoRA
    (no DoRA or other variant) with inactive dropout: the layers `stacked_adapters` computes exactly."""
    from peft.tuners.lora import Linear

    layers = _lora_layers(model)
    if not layers:
        return False
    for layer in layers:
        if type(layer) is not Linear or layer.merged:
            return False
        for name in adapters:
            if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
                return False
            dropout = layer.lora_dropout[name]
            if not isinstance(dropout, nn.Identity) and dropout.training and dropout.p > 0:
                return False
    return True


@contextlib.contextmanager
def stacked_adapters(model: nn.Module, adapters: Sequence[str], rows: int) -> Iterator[nn.Module]:
    """`model` (a PEFT LoRA model) answering batches laid out as `len(adapters)` blocks of `rows` rows, block j
    through adapter `adapters[j]`, followed by any number of rows through the bare base (e.g. the reference).

    For no-grad passes (generation, old and reference log-probs): the stacked weights are taken once, on entry.
    Raises ValueError when a layer is not one `supports_stacked_adapters` accepts.
    """
    if rows < 1 or not adapters:
        raise ValueError(f"stacked_adapters needs at least one adapter and rows >= 1, got {list(adapters)}, {rows}")
    if not supports_stacked_adapters(model, adapters):
        raise ValueError(
            f"stacked_adapters needs plain, unmerged LoRA Linear layers with adapters {list(adapters)} and no active "
            "dropout (no DoRA or other variant)"
        )
    layers = _lora_layers(model)
    k = len(adapters)
    with torch.no_grad():
        stacked = [
            (
                torch.stack([layer.lora_A[a].weight for a in adapters]).transpose(1, 2).contiguous(),  # [k, d, r]
                torch.stack([layer.lora_B[a].weight for a in adapters]).transpose(1, 2).contiguous(),  # [k, r, out]
                torch.tensor([float(layer.scaling[a]) for a in adapters]).view(k, 1, 1),
            )
            for layer in layers
        ]

    def forward_of(layer: nn.Module, A: torch.Tensor, B: torch.Tensor, scaling: torch.Tensor):
        def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            result = layer.base_layer(x, *args, **kwargs)
            if x.shape[0] < k * rows:
                raise ValueError(f"a stacked-adapter batch needs >= {k} x {rows} rows, got {x.shape[0]}")
            head = x[: k * rows]
            low_rank = torch.bmm(torch.bmm(head.reshape(k, -1, x.shape[-1]).to(A.dtype), A), B)
            delta = (low_rank * scaling.to(low_rank.dtype)).reshape(*head.shape[:-1], -1).to(result.dtype)
            return torch.cat([result[: k * rows] + delta, result[k * rows :]])

        return forward

    for layer, (A, B, scaling) in zip(layers, stacked):
        layer.forward = forward_of(layer, A, B, scaling)  # an instance attribute shadows the class's forward
    try:
        yield model
    finally:
        for layer in layers:
            del layer.forward
