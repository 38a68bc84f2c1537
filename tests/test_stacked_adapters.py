"""LoRA actors in one batch (`bilevel_rlhf.adapters`): each actor's samples, log-probs and values equal those of its
own pass, for the same noise; the trainer's rollout takes this path with LoRA."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_trainer_math import PROMPTS
from testing_utils import make_policy, make_tokenizer, make_trainer

from bilevel_rlhf.adapters import stacked_adapters, supports_stacked_adapters

LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc", "lm_head"], lora_dropout=0.0)


def _randomize_adapters(peft_model, seed: int = 0) -> None:
    """Give every LoRA weight a random value (PEFT starts B at 0: the adapters would all equal the base)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))


def _lora_trainer(tmp_path, **kw):
    tok = make_tokenizer()
    trainer = make_trainer(tmp_path, PROMPTS, tok=tok, policy=make_policy(tok, tie_word_embeddings=False),
                           peft_config=LORA, max_completion_length=6, max_prompt_length=8, **kw)
    _randomize_adapters(trainer.model.policy_theta)
    return trainer


def test_a_stacked_layer_equals_each_adapter_and_the_base(tmp_path):
    tok = make_tokenizer()
    model = get_peft_model(make_policy(tok, tie_word_embeddings=False), LORA, adapter_name="theta")
    model.add_adapter("phi", LORA)
    _randomize_adapters(model)
    model.eval()  # GPT-2's own dropout off
    ids = torch.randint(3, len(tok), (3, 5))
    mask = torch.ones_like(ids)
    expected = []
    for name in ("theta", "phi"):
        model.set_adapter(name)
        expected.append(model(input_ids=ids, attention_mask=mask).logits)
    with model.disable_adapter():
        expected.append(model(input_ids=ids, attention_mask=mask).logits)
    assert not torch.allclose(expected[0], expected[1], atol=1e-3)  # the adapters differ from each other
    with torch.no_grad(), stacked_adapters(model, ["theta", "phi"], rows=3):
        stacked = model(input_ids=ids.repeat(3, 1), attention_mask=mask.repeat(3, 1)).logits
    torch.testing.assert_close(stacked, torch.cat(expected), atol=1e-5, rtol=1e-5)
    # the patch is gone on exit: the model answers with its active adapter again
    model.set_adapter("phi")
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, expected[1])


def test_unsupported_layers_are_refused(tmp_path):
    tok = make_tokenizer()
    dora = get_peft_model(make_policy(tok), LoraConfig(r=4, target_modules=["c_attn"], use_dora=True), "theta")
    assert not supports_stacked_adapters(dora, ["theta"])
    with pytest.raises(ValueError, match="plain, unmerged LoRA Linear layers"):
        with stacked_adapters(dora, ["theta"], rows=2):
            pass
    plain = get_peft_model(make_policy(tok), LoraConfig(r=4, target_modules=["c_attn"]), "theta")
    assert supports_stacked_adapters(plain, ["theta"]) and not supports_stacked_adapters(plain, ["theta", "phi"])


@pytest.mark.parametrize("crn", [True, False])
def test_stacked_generation_equals_each_role_generating_alone(tmp_path, crn):
    """One generate call for theta, phi and the reference gives each role the completions of its own call with the
    same noise seed: theta and phi share the seed under common random numbers; every other block has its own."""
    trainer = _lora_trainer(tmp_path, objective="win_rate", num_generations=1, common_random_numbers=crn)
    ids, mask, _ = trainer._tokenize_prompts(PROMPTS)
    torch.manual_seed(7)
    stacked = trainer._generate_stacked(["theta", "phi", "ref"], ids, mask, crn_seed=123 if crn else None)
    torch.manual_seed(7)  # the seeds the stacked call drew, in its order: phi (without CRN), then ref
    seeds = {"theta": 123, "phi": 123} if crn else {"theta": int(torch.randint(0, 2**62, ())),
                                                    "phi": int(torch.randint(0, 2**62, ()))}
    seeds["ref"] = int(torch.randint(0, 2**62, ()))
    for role, seed in seeds.items():
        alone = trainer._generate(role, ids, mask, noise_seed=seed)
        width = max(alone.shape[1], stacked[role].shape[1])
        pad = trainer.processing_class.pad_token_id
        pad_to = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=pad)  # noqa: E731
        assert torch.equal(pad_to(stacked[role]), pad_to(alone)), role
    assert not torch.equal(stacked["theta"], stacked["phi"])  # the adapters differ, so do their samples
    assert not torch.equal(stacked["theta"], stacked["ref"])


@pytest.mark.parametrize("kl_estimator", ["k1", "exact"])
def test_the_rollout_of_lora_actors_equals_separate_passes(tmp_path, kl_estimator):
    """generate_and_score with LoRA actors (stacked generation, reference and old log-prob passes): its reference
    log-probs, old log-probs, values and entropies are those of one pass per role over the same completions; with
    the exact KL, so are the reference's full distributions and the advantages."""
    # not fused: the rollout computes the old log-probs
    trainer = _lora_trainer(tmp_path, num_iterations=2, kl_estimator=kl_estimator)
    model = trainer.model
    assert trainer._stacks_roles(model, ["theta", "phi"])
    rollout = trainer.generate_and_score(PROMPTS[:4])
    P = rollout.prompt_length
    with torch.no_grad():
        for role in ("theta", "phi"):
            c = rollout.completions(role)
            ref = model.policy_forward("ref", c.input_ids, c.attention_mask, P, 1.0, with_values=False)
            own = model.policy_forward(role, c.input_ids, c.attention_mask, P, 1.0)
            m = c.mask.bool()
            torch.testing.assert_close(c.ref_logprobs[m], ref["logprobs"][m], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(c.logprobs[m], own["logprobs"][m], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(c.values[m], own["values"][m], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(c.entropy[m], own["entropy"][m], atol=1e-5, rtol=1e-5)
            if kl_estimator == "exact":
                full = model.policy_forward("ref", c.input_ids, c.attention_mask, P, 1.0, with_values=False,
                                            with_full_logprobs=True)["full_logprobs"]
                torch.testing.assert_close(c.ref_full_logprobs[m], full[m], atol=1e-5, rtol=1e-5)
                kl = model.policy_forward(role, c.input_ids, c.attention_mask, P, 1.0, ref_full_logprobs=full)["kl"]
                adv, _, _, coef = trainer._advantages(c.terminal, own["logprobs"], c.ref_logprobs, own["values"],
                                                      c.mask, rollout.tau, exact_kl=kl)
                torch.testing.assert_close(c.advantages, adv, atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(c.kl_coef, coef.expand(len(c)), atol=1e-5, rtol=1e-5)
                assert bool((kl[m] > 0).all())  # the LoRA actors differ from the base at every state
            else:
                assert c.ref_full_logprobs is None and c.kl_coef is None
    assert not torch.allclose(rollout.theta.logprobs, rollout.phi.logprobs)
