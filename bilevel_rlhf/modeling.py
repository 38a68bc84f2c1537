"""The module that holds every role of the bilevel trainer, its value heads and their (de)serialization.

Roles: the lower-level actor phi, the penalized actor theta, a frozen reference policy (KL form only), the reward
model r_x (x = its parameters) and one value head (critic) per actor.

Value-head placement: each critic is a linear head on the last hidden state of its own actor (a shared trunk, as
TRL's old ``AutoModelForCausalLMWithValueHead``): one forward pass gives log-probs and values, and the value loss
(weighted by ``vf_coef``) also shapes the trunk. The head's own parameters form the critic parameter group.

With PEFT: one frozen base carries two LoRA adapters "phi" and "theta"; the reference is the base with the adapters
disabled. No copy of the base exists.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from collections.abc import Iterator
from types import SimpleNamespace

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .adapters import stacked_adapters

VALUE_HEADS_NAME = "value_heads.safetensors"
CONFIG_NAME = "bilevel_config.json"
ADAPTER_NAMES = ("phi", "theta")
REWARD_ADAPTER = "reward"  # r_x's LoRA adapter on the actors' base (BilevelConfig.reward_adapter)
REWARD_HEAD_NAME = "score.safetensors"


class ValueHead(nn.Module):
    """V(s_t) = w . h_t + b on the actor's last hidden state h_t: ``[N, T, H] -> [N, T]``. `init="zero"` starts
    at V = 0: a random head's values are of order 1 per token on a trained trunk, and its differences would steer the
    first updates' advantages in a random direction until the critic has learned."""

    def __init__(self, hidden_size: int, init: str = "random"):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        if init == "zero":
            nn.init.zeros_(self.summary.weight)
        else:
            nn.init.normal_(self.summary.weight, std=1.0 / (hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # the head runs in fp32 whatever the trunk's dtype, as in TRL's old value head
        return self.summary(hidden_states.to(self.summary.weight.dtype)).squeeze(-1)


class AdapterRewardModel(nn.Module):
    """r_x as a LoRA adapter on the actors' base plus a scalar head: the pattern of the value heads, which sit on the
    actors' trunks. The score of a row is `score(h)` at its last real token (the rightmost 1 of the attention mask).

    One copy of the base serves every role: the adapter lives in `peft_model` (not a submodule here, so its
    parameters are counted and wrapped once, with the policy's), and only the adapter and `score` are trained.
    """

    def __init__(self, peft_model: nn.Module, adapter_name: str = REWARD_ADAPTER, head_init: str = "random"):
        super().__init__()
        self._peft = [peft_model]  # a list: no submodule registration
        self.adapter_name = adapter_name
        causal_lm = peft_model.get_base_model()
        self._backbone = [getattr(causal_lm, causal_lm.base_model_prefix)]  # the trunk, without the LM head
        config = causal_lm.config
        hidden = config.hidden_size if hasattr(config, "hidden_size") else config.n_embd
        self.score = nn.Linear(hidden, 1, bias=False)
        if head_init == "zero":
            nn.init.zeros_(self.score.weight)
        else:
            nn.init.normal_(self.score.weight, std=1.0 / (hidden + 1) ** 0.5)

    @property
    def peft_model(self) -> nn.Module:
        return self._peft[0]

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The adapter's LoRA weights (in `peft_model`)."""
        tag = f".{self.adapter_name}."
        return [p for n, p in self.peft_model.named_parameters() if tag in n]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None):
        from transformers.modeling_outputs import SequenceClassifierOutput

        self.peft_model.set_adapter(self.adapter_name)
        # set_adapter freezes the other adapters; every adapter on the base keeps training (the switch is only for
        # the forward)
        self.peft_model.set_requires_grad(list(self.peft_model.peft_config), requires_grad=True)
        if position_ids is None:  # left padding must not shift the positions
            position_ids = position_ids_from_mask(attention_mask)
        hidden = self._backbone[0](input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   use_cache=False).last_hidden_state
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (attention_mask.long() * positions).argmax(-1)
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return SequenceClassifierOutput(logits=self.score(h.to(self.score.weight.dtype)))

    def save_pretrained(self, directory: str, state_dict: dict | None = None,
                        peft_state_dict: dict | None = None) -> None:
        """The adapter (PEFT's `adapter_config.json` + `adapter_model.safetensors`, loadable onto the base with
        `PeftModel.from_pretrained`) and the head (`score.safetensors`, key `score.weight`). `state_dict` and
        `peft_state_dict`: this module's and the PEFT model's whole tensors, written instead of their own (FSDP)."""
        os.makedirs(directory, exist_ok=True)
        kwargs = {} if peft_state_dict is None else {"state_dict": peft_state_dict}
        self.peft_model.save_pretrained(directory, selected_adapters=[self.adapter_name], **kwargs)
        _lift_adapter_folder(directory, self.adapter_name)
        head = self.score.weight if state_dict is None else state_dict["score.weight"]
        save_file({"score.weight": head.detach().cpu().contiguous()},
                  os.path.join(directory, REWARD_HEAD_NAME), metadata={"format": "pt"})

    @classmethod
    def from_saved(cls, base_model: nn.Module, directory: str) -> "AdapterRewardModel":
        """The reward model a `reward_adapter` run saved in `directory` (its `reward_model/` folder), on
        `base_model`, the initial policy: a `PeftModel` with the adapter plus the scalar head."""
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(base_model, directory, adapter_name=REWARD_ADAPTER)
        model = cls(peft_model)
        model._load_head(directory)
        return model.eval()

    def _load_head(self, directory: str) -> None:
        self.score.load_state_dict({"weight": _read_safetensors(os.path.join(directory, REWARD_HEAD_NAME))["score.weight"]})

    def load_saved(self, directory: str) -> None:
        """Load what `save_pretrained` wrote into this adapter and head."""
        from peft import set_peft_model_state_dict

        state = _read_safetensors(os.path.join(directory, "adapter_model.safetensors"))
        set_peft_model_state_dict(self.peft_model, state, adapter_name=self.adapter_name)
        self._load_head(directory)


def _lift_adapter_folder(directory: str, adapter_name: str) -> None:
    """PEFT saves a non-default adapter in `directory/adapter_name/`: move its files up to `directory`."""
    sub = os.path.join(directory, adapter_name)
    for name in os.listdir(sub):
        os.replace(os.path.join(sub, name), os.path.join(directory, name))
    os.rmdir(sub)


def zero_fresh_heads(model: nn.Module, missing_keys: list[str]) -> list[str]:
    """Zero every one-output Linear whose weight `from_pretrained` reported missing (a head it created); returns
    their names. r_x = 0 then: the lower level's target starts at the reference (`reward_head_init="zero"`)."""
    missing = set(missing_keys)
    zeroed = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == 1 and f"{name}.weight" in missing:
            with torch.no_grad():
                module.weight.zero_()
                if module.bias is not None:
                    module.bias.zero_()
            zeroed.append(name)
    return zeroed


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as `generate` computes them (0 on padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class BilevelModel(nn.Module):
    """Every role in one module, so that Trainer/accelerate wrap, move and checkpoint them together.

    Args:
        theta: the penalized actor (a causal LM), or the `PeftModel` holding both adapters when `use_peft`.
        phi: the lower-level actor (a separate causal LM), or None (partial_sgd, or `use_peft`).
        ref: the frozen reference (KL form, full fine-tuning), or None.
        reward_model: a sequence classifier with one output.
        use_peft: whether `theta` is a PeftModel with adapters "phi" and "theta" (then the reference is the base).
        has_phi: whether the phi role exists (False for partial_sgd).
        value_head_init: the critics' start, "random" or "zero" (`ValueHead`).
    """

    def __init__(
        self,
        theta: nn.Module,
        phi: nn.Module | None,
        ref: nn.Module | None,
        reward_model: nn.Module,
        use_peft: bool,
        has_phi: bool,
        value_head_init: str = "random",
    ):
        super().__init__()
        self.policy_theta = theta
        self.policy_phi = phi
        self.ref_policy = ref
        self.reward_model = reward_model
        # r_x(prompt, y) must not depend on how far the batch left-pads the prompt: pass positions that skip the
        # padding to every reward model that takes them (HF causal-LM classifiers do; a custom module may not)
        self._reward_positions = "position_ids" in inspect.signature(reward_model.forward).parameters
        self.use_peft = use_peft
        self.has_phi = has_phi
        hidden = theta.config.hidden_size if hasattr(theta.config, "hidden_size") else theta.config.n_embd
        self.value_theta = ValueHead(hidden, value_head_init)
        self.value_phi = ValueHead(hidden, value_head_init) if has_phi else None
        if ref is not None:
            ref.requires_grad_(False)
            ref.eval()

    # --- role plumbing ---
    @contextlib.contextmanager
    def actor(self, role: str) -> Iterator[nn.Module]:
        """The causal LM acting as `role` ("phi", "theta" or "ref"), with the right adapter active under PEFT."""
        if role not in ("phi", "theta", "ref"):
            raise ValueError(f"role must be phi, theta or ref, got {role!r}")
        if not self.use_peft:
            model = {"phi": self.policy_phi, "theta": self.policy_theta, "ref": self.ref_policy}[role]
            if model is None:
                raise ValueError(f"this BilevelModel has no {role} policy")
            yield model
            return
        peft_model = self.policy_theta
        if role == "ref":
            with peft_model.disable_adapter():
                yield peft_model
            # leaving disable_adapter re-activates one adapter and freezes the other; a graph built before (the fused
            # rollout/update forward) needs both trainable at backward, where AccumulateGrad checks requires_grad
            peft_model.set_requires_grad(list(self.trained_adapters), requires_grad=True)
            return
        peft_model.set_adapter(role)
        # set_adapter freezes the inactive adapters; all keep training (the switch is only for the forward)
        peft_model.set_requires_grad(list(self.trained_adapters), requires_grad=True)
        yield peft_model

    @property
    def adapter_names(self) -> tuple[str, ...]:
        """The actors' adapters."""
        return ADAPTER_NAMES if self.has_phi else ("theta",)

    @property
    def trained_adapters(self) -> tuple[str, ...]:
        """Every adapter on the base (all trained): the actors', and r_x's when it is one (`AdapterRewardModel`)."""
        return tuple(self.policy_theta.peft_config)

    def activation_checkpointing_enable(self, **kwargs) -> None:
        """Called by Trainer when `activation_checkpointing=True`: enable it on every trained model."""
        for model in (self.policy_theta, self.policy_phi, self.reward_model):
            if model is not None and hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(**kwargs)

    def tie_weights(self, **kwargs) -> None:
        """Tie each model's shared weights again (a GPT-2's LM head is its input embedding). accelerate's FSDP2
        preparation calls this after moving the module to the meta device, which breaks the sharing: without it
        every LM head would train as a separate copy."""
        for model in (self.policy_theta, self.policy_phi, self.ref_policy, self.reward_model):
            if model is not None and callable(getattr(model, "tie_weights", None)):
                model.tie_weights()

    def value_head(self, role: str) -> ValueHead:
        head = self.value_phi if role == "phi" else self.value_theta
        if head is None:
            raise ValueError(f"this BilevelModel has no {role} value head")
        return head

    def role_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters per optimizer group: actor (both actors), critic (value heads), reward."""
        critic = [p for p in self.value_theta.parameters()]
        if self.value_phi is not None:
            critic += list(self.value_phi.parameters())
        reward = [p for p in self.reward_model.parameters() if p.requires_grad]
        shared = set()
        if isinstance(self.reward_model, AdapterRewardModel):  # r_x's adapter sits in the actors' PEFT model
            adapter = self.reward_model.adapter_parameters()
            reward += adapter
            shared = {id(p) for p in adapter}
        actor = [p for p in self.policy_theta.parameters() if p.requires_grad and id(p) not in shared]
        if self.policy_phi is not None:
            actor += [p for p in self.policy_phi.parameters() if p.requires_grad]
        return {"actor": actor, "critic": critic, "reward": reward}

    # --- forward passes ---
    def policy_forward(
        self,
        role: str,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prompt_length: int,
        temperature: float,
        with_values: bool = True,
        with_entropy: bool = True,
        ref_full_logprobs: torch.Tensor | None = None,
        with_full_logprobs: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Log-probs of the completion tokens, their entropies and the values V(s_t), each ``[N, T]`` (entropies and
        values only when asked: each costs a pass over the ``[N, T, vocab]`` logits or the hidden states). Given the
        reference's next-token log-probs ``ref_full_logprobs`` ``[N, T, vocab]``, also ``"kl"``, the exact
        KL(pi(.|s_t) || pi_ref(.|s_t)) of each position ``[N, T]``, with its graph; with ``with_full_logprobs``, the
        actor's own ``"full_logprobs"`` ``[N, T, vocab]`` (no graph).

        ``input_ids`` = prompt (left-padded to ``prompt_length``) + completion (right-padded to T); token t of the
        completion is predicted at position prompt_length - 1 + t, where V(s_t) is read too.
        """
        with self.actor(role) as model:
            out = _lm_forward(model, input_ids, attention_mask, with_values)
        return self._completion_outputs(role, out, input_ids, prompt_length, temperature, with_values, with_entropy,
                                        ref_full_logprobs, with_full_logprobs)

    def stacked_policy_forward(
        self, roles: tuple[str, ...], input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int,
        temperature: float, with_values: bool = True, with_entropy: bool = True,
        ref_full_logprobs: torch.Tensor | None = None,
    ) -> dict[str, dict[str, torch.Tensor]]:
        """`policy_forward` of several LoRA actors in one pass of the shared base (`bilevel_rlhf.adapters`): the rows
        are `len(roles)` equal blocks, block j `roles[j]`'s. No gradients: for the rollout's no-grad passes."""
        if not self.use_peft:
            raise ValueError("stacked_policy_forward needs the actors as LoRA adapters of one base (peft_config)")
        rows = input_ids.shape[0] // len(roles)
        with torch.no_grad(), stacked_adapters(self.policy_theta, roles, rows) as model:
            out = _lm_forward(model, input_ids, attention_mask, with_values)
        results = {}
        for j, role in enumerate(roles):
            block = slice(j * rows, (j + 1) * rows)
            part = SimpleNamespace(logits=out.logits[block],
                                   hidden_states=[out.hidden_states[-1][block]] if with_values else None)
            results[role] = self._completion_outputs(
                role, part, input_ids[block], prompt_length, temperature, with_values, with_entropy,
                None if ref_full_logprobs is None else ref_full_logprobs[block],
            )
        return results

    def _completion_outputs(self, role, out, input_ids, prompt_length, temperature, with_values, with_entropy,
                            ref_full_logprobs=None, with_full_logprobs=False):
        """Log-probs, entropies, values (and the exact KL, the full log-probs: `policy_forward`) of the completion
        tokens from the LM outputs `out` of `role`'s rows."""
        logits = out.logits[:, prompt_length - 1 : -1].float()
        if temperature != 1.0:  # no [N, T, vocab] copy when there is nothing to scale
            logits = logits / temperature
        log_z = torch.logsumexp(logits, dim=-1)  # [N, T]
        logprobs = logits.gather(-1, input_ids[:, prompt_length:, None]).squeeze(-1) - log_z
        result = {"logprobs": logprobs}
        if ref_full_logprobs is not None or with_full_logprobs:
            log_p = logits - log_z[..., None]  # [N, T, vocab]
            if ref_full_logprobs is not None:
                result["kl"] = (log_p.exp() * (log_p - ref_full_logprobs)).sum(-1)
            if with_full_logprobs:
                result["full_logprobs"] = log_p.detach()
        if with_entropy:
            with torch.no_grad():  # the entropy is only logged: H = log Z - sum_v p_v * logit_v
                result["entropy"] = log_z - (torch.softmax(logits, dim=-1) * logits).sum(-1)
        if with_values:
            hidden = out.hidden_states[-1][:, prompt_length - 1 : -1]
            result["values"] = self.value_head(role)(hidden)
        return result

    def reward_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """r_x of each sequence, ``[N]``."""
        extra = {"position_ids": position_ids_from_mask(attention_mask)} if self._reward_positions else {}
        logits = self.reward_model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits
        if logits.ndim != 2 or logits.shape[-1] != 1:
            raise ValueError(f"reward_model must output one score per sequence ([N, 1]), got shape {tuple(logits.shape)}")
        return logits[:, 0].float()

    def forward(
        self,
        phi: dict[str, torch.Tensor] | None = None,
        theta: dict[str, torch.Tensor] | None = None,
        reward: dict[str, torch.Tensor] | None = None,
        prompt_length: int = 1,
        temperature: float = 1.0,
        with_entropy: bool = False,
    ) -> dict[str, dict[str, torch.Tensor] | torch.Tensor]:
        """Each given role's outputs (the trainer calls it once per loss part, through the DDP/FSDP wrapper)."""
        out: dict[str, dict[str, torch.Tensor] | torch.Tensor] = {}
        for role, batch in (("phi", phi), ("theta", theta)):
            if batch is not None:
                out[role] = self.policy_forward(
                    role, batch["input_ids"], batch["attention_mask"], prompt_length, temperature,
                    with_entropy=with_entropy, ref_full_logprobs=batch.get("ref_full_logprobs"),
                )
        if reward is not None:
            out["reward"] = self.reward_forward(reward["input_ids"], reward["attention_mask"])
        return out


def _lm_forward(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, with_hidden: bool):
    """One causal-LM forward pass over left-padded rows (positions skip the padding), without a cache."""
    return model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        output_hidden_states=with_hidden,
        use_cache=False,
    )


def save_value_heads(model: BilevelModel, path: str, state_dict: dict | None = None) -> None:
    """Write the critics as safetensors: keys ``{role}.summary.weight`` / ``{role}.summary.bias``; from
    `state_dict` (`model`'s whole state dict) when given."""
    tensors = {}
    for role, head in (("theta", model.value_theta), ("phi", model.value_phi)):
        if head is not None:
            own = head.state_dict() if state_dict is None else _part(state_dict, f"value_{role}")
            tensors.update({f"{role}.{k}": v.detach().cpu().contiguous() for k, v in own.items()})
    save_file(tensors, path, metadata={"format": "pt"})


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """`load_file`, naming the file when it is truncated or not a safetensors file."""
    try:
        return load_file(path)
    except Exception as err:  # safetensors' SafetensorError, or OSError
        raise ValueError(f"cannot read {path} ({type(err).__name__}: {err})") from err


def load_value_heads(path: str) -> dict[str, ValueHead]:
    """Read the critics written by `save_value_heads` (safetensors only): ``{"theta": head, "phi": head}``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no value heads at {path}")
    tensors = _read_safetensors(path)
    heads = {}
    for role in ("theta", "phi"):
        state = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(role + ".")}
        if state:
            head = ValueHead(state["summary.weight"].shape[1])
            head.load_state_dict(state)
            heads[role] = head
    return heads


def load_policy(directory: str, role: str = "theta", **from_pretrained_kwargs):
    """An actor written by `BilevelTrainer.save_model(directory)`: `"theta"` (the top level) or `"phi"` (`phi/`, the
    penalty methods only), through `AutoModelForCausalLM.from_pretrained` (safetensors; a LoRA adapter is loaded
    onto the base its adapter_config.json names). A missing role raises an error that names the method."""
    from transformers import AutoModelForCausalLM

    if role not in ("theta", "phi"):
        raise ValueError(f"role must be 'theta' or 'phi', got {role!r}")
    path = directory if role == "theta" else os.path.join(directory, "phi")
    if not os.path.isdir(path):
        config = os.path.join(directory, CONFIG_NAME)
        method = json.load(open(config)).get("method") if os.path.isfile(config) else None
        if method is not None and role == "phi":
            raise FileNotFoundError(
                f"{directory} holds no phi: it was saved by method={method!r}, which trains one actor (theta, at the "
                "top level); phi/ is written by the penalty methods single_loop, fixed_tau and nested_loop"
            )
        raise FileNotFoundError(f"no saved {role} at {path} (expected a BilevelTrainer.save_model folder)")
    from_pretrained_kwargs.setdefault("use_safetensors", True)
    return AutoModelForCausalLM.from_pretrained(path, **from_pretrained_kwargs)


def _part(state_dict: dict, prefix: str) -> dict:
    """The entries of `state_dict` under the submodule `prefix`, named as in that submodule."""
    return {k[len(prefix) + 1 :]: v for k, v in state_dict.items() if k.startswith(prefix + ".")}


def save_roles(model: BilevelModel, output_dir: str, state_dict: dict | None = None) -> None:
    """Write every trained role: theta at the top level (from_pretrained-loadable), phi in phi/, r_x in
    reward_model/, the critics in value_heads.safetensors. With PEFT, the adapters instead of full weights: theta's
    at the top level, phi's in phi/ (the frozen base is not written; adapter_config.json names it). `state_dict`:
    `model`'s whole state dict, written instead of the module's own tensors (under FSDP those are shards)."""
    def part(prefix: str) -> dict:  # save_pretrained's keyword for a role's tensors from `state_dict`
        return {} if state_dict is None else {"state_dict": _part(state_dict, prefix)}

    if model.use_peft:
        model.policy_theta.save_pretrained(output_dir, selected_adapters=list(model.adapter_names),
                                           **part("policy_theta"))
        _lift_adapter_folder(output_dir, "theta")  # theta's adapter at the top level
    else:
        model.policy_theta.save_pretrained(output_dir, **part("policy_theta"))
        if model.policy_phi is not None:
            model.policy_phi.save_pretrained(os.path.join(output_dir, "phi"), **part("policy_phi"))
    reward_dir = os.path.join(output_dir, "reward_model")
    if isinstance(model.reward_model, AdapterRewardModel) and state_dict is not None:
        model.reward_model.save_pretrained(reward_dir, state_dict=_part(state_dict, "reward_model"),
                                           peft_state_dict=_part(state_dict, "policy_theta"))
    else:
        model.reward_model.save_pretrained(reward_dir, **part("reward_model"))
    save_value_heads(model, os.path.join(output_dir, VALUE_HEADS_NAME), state_dict)


def _load_safetensors_into(module: torch.nn.Module, directory: str) -> None:
    """Load a save_pretrained folder (single file or sharded, safetensors only) into an existing module."""
    single = os.path.join(directory, "model.safetensors")
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        try:
            with open(index) as fh:
                files = sorted({os.path.join(directory, f) for f in json.load(fh)["weight_map"].values()})
        except (ValueError, KeyError) as err:
            raise ValueError(f"cannot read {index} ({type(err).__name__}: {err})") from err
    else:
        raise FileNotFoundError(f"no model.safetensors in {directory}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(_read_safetensors(f))
    result = module.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"unexpected weights in {directory}: {result.unexpected_keys[:5]}")
    # keys save_pretrained leaves out are tied to a loaded parameter (e.g. lm_head.weight = wte.weight)
    loaded = {p.data_ptr() for n, p in module.state_dict().items() if n in state}
    untied = [n for n in result.missing_keys if module.state_dict()[n].data_ptr() not in loaded]
    if untied:
        raise ValueError(f"weights missing in {directory}: {untied[:5]}")


def load_roles(model: BilevelModel, directory: str) -> None:
    """Load every trained role of a `BilevelTrainer._save` folder into `model` (the reference is not saved: it is
    the initial model)."""
    if model.use_peft:
        from peft import set_peft_model_state_dict

        for role, sub in (("theta", ""), ("phi", "phi")):
            if role in model.adapter_names:
                state = _read_safetensors(os.path.join(directory, sub, "adapter_model.safetensors"))
                set_peft_model_state_dict(model.policy_theta, state, adapter_name=role)
    else:
        _load_safetensors_into(model.policy_theta, directory)
        if model.policy_phi is not None:
            _load_safetensors_into(model.policy_phi, os.path.join(directory, "phi"))
    if isinstance(model.reward_model, AdapterRewardModel):
        model.reward_model.load_saved(os.path.join(directory, "reward_model"))
    else:
        _load_safetensors_into(model.reward_model, os.path.join(directory, "reward_model"))
    heads = load_value_heads(os.path.join(directory, VALUE_HEADS_NAME))
    model.value_theta.load_state_dict(heads["theta"].state_dict())
    if model.value_phi is not None:
        model.value_phi.load_state_dict(heads["phi"].state_dict())
