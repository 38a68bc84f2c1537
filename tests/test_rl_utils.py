import math

import pytest
import torch

from bilevel_rlhf.rl_utils import (
    bradley_terry_loss,
    compute_gae,
    masked_mean,
    masked_var,
    masked_whiten,
    token_kl_penalty,
)


def _gae_reverse_scan(rewards, values, mask, gamma, lam):
    """Textbook reverse-scan GAE (the loop the vectorized version replaces), a second reference."""
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype)
    for t in reversed(range(T)):
        next_v = values[:, t + 1] * mask[:, t + 1] if t + 1 < T else torch.zeros(B, dtype=rewards.dtype)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv, (adv + values) * mask


def test_gae_hand_computed():
    # gamma = lam = 0.5, so gamma*lam = 0.25. Row 1 has one padded position holding garbage.
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 9.0]])
    values = torch.tensor([[0.5, 0.25, 0.5], [1.0, 0.5, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = compute_gae(rewards, values, mask, gamma=0.5, lam=0.5)
    # row 0: delta = [0 + .5*.25 - .5, 0 + .5*.5 - .25, 1 - .5] = [-.375, 0, .5]
    #        A_2 = .5, A_1 = 0 + .25*.5 = .125, A_0 = -.375 + .25*.125 = -.34375
    # row 1: delta = [0 + .5*.5 - 1, 2 + 0 - .5] = [-.75, 1.5]; A_1 = 1.5, A_0 = -.75 + .25*1.5 = -.375
    expected_adv = torch.tensor([[-0.34375, 0.125, 0.5], [-0.375, 1.5, 0.0]])
    expected_ret = torch.tensor([[0.15625, 0.375, 1.0], [0.625, 2.0, 0.0]])
    torch.testing.assert_close(adv, expected_adv, rtol=0, atol=1e-7)
    torch.testing.assert_close(ret, expected_ret, rtol=0, atol=1e-7)


def test_gae_matches_reverse_scan_random():
    g = torch.Generator().manual_seed(0)
    B, T = 6, 17
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.tensor([17, 1, 5, 16, 9, 2])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(torch.float64)
    for gamma, lam in [(1.0, 1.0), (1.0, 0.95), (0.9, 0.0), (0.0, 0.5)]:
        adv, ret = compute_gae(rewards, values, mask, gamma, lam)
        adv_ref, ret_ref = _gae_reverse_scan(rewards, values, mask, gamma, lam)
        torch.testing.assert_close(adv, adv_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ret, ret_ref, rtol=1e-12, atol=1e-12)


def test_gae_gamma_lam_one_is_return_minus_value():
    # gamma = lam = 1: A_t = sum_{s >= t} r_s - V_t (Monte-Carlo return minus baseline)
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    values = torch.tensor([[0.5, -1.0, 2.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = compute_gae(rewards, values, mask, 1.0, 1.0)
    torch.testing.assert_close(adv, torch.tensor([[6.0 - 0.5, 5.0 + 1.0, 3.0 - 2.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[6.0, 5.0, 3.0, 0.0]]))


def test_gae_bad_input():
    r = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="right-padded"):
        compute_gae(r, r, torch.tensor([[1, 0, 1], [1, 1, 1]]), 1.0, 1.0)
    with pytest.raises(ValueError, match="gamma must be in"):
        compute_gae(r, r, torch.ones(2, 3), 1.5, 1.0)
    with pytest.raises(ValueError, match="lam must be in"):
        compute_gae(r, r, torch.ones(2, 3), 1.0, -0.1)
    with pytest.raises(ValueError, match="values must have the shape"):
        compute_gae(r, torch.zeros(2, 4), torch.ones(2, 3), 1.0, 1.0)
    with pytest.raises(ValueError, match="mask must have the shape"):
        compute_gae(r, r, torch.ones(2, 4), 1.0, 1.0)


def test_masked_stats_and_whiten_hand_computed():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, -50.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    # selected entries 1, 2, 3, 4: mean 2.5, unbiased var (2.25 + .25 + .25 + 2.25) / 3 = 5/3
    assert masked_mean(x, mask).item() == pytest.approx(2.5)
    assert masked_var(x, mask).item() == pytest.approx(5 / 3)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(5 / 4)
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([2.0, 4.0]))
    s = math.sqrt(5 / 3 + 1e-8)
    expected = torch.tensor([[-1.5 / s, -0.5 / s, 0.5 / s], [1.5 / s, 0.0, 0.0]])
    torch.testing.assert_close(masked_whiten(x, mask), expected)
    expected_keep_mean = torch.tensor([[-1.5 / s + 2.5, -0.5 / s + 2.5, 0.5 / s + 2.5], [1.5 / s + 2.5, 0.0, 0.0]])
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=False), expected_keep_mean)


def test_masked_stats_errors():
    x = torch.ones(2, 2)
    with pytest.raises(ValueError, match="selects no entry"):
        masked_mean(x, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(x, torch.tensor([[1, 0], [0, 0]]))
    with pytest.raises(ValueError, match="mask must have the shape"):
        masked_whiten(x, torch.ones(3))


def test_bradley_terry_loss_closed_form_and_gradient():
    r_a = torch.tensor([1.0, 1.0, -2.0, 0.3], dtype=torch.float64, requires_grad=True)
    r_b = torch.tensor([0.0, 0.0, 1.0, 0.3], dtype=torch.float64)
    labels = torch.tensor([1.0, 0.5, 0.0, 0.25], dtype=torch.float64)
    loss = bradley_terry_loss(r_a, r_b, labels)
    expected = torch.tensor(
        [
            math.log(1 + math.exp(-1.0)),  # -log sigmoid(1)
            0.5 * math.log(1 + math.exp(-1.0)) + 0.5 * math.log(1 + math.exp(1.0)),
            math.log(1 + math.exp(-3.0)),  # b wins by 3: -log sigmoid(3)
            math.log(2.0),  # equal rewards: log 2 whatever the label
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(loss.detach(), expected)
    # d loss / d r_a = sigmoid(r_a - r_b) - label
    loss.sum().backward()
    torch.testing.assert_close(r_a.grad, torch.sigmoid(r_a.detach() - r_b) - labels)
    # extreme margins stay finite
    big = bradley_terry_loss(torch.tensor([200.0]), torch.tensor([-200.0]), torch.tensor([0.0]))
    assert torch.isfinite(big).all() and big.item() == pytest.approx(400.0)
    with pytest.raises(ValueError, match="one shape"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2))


def test_token_kl_penalty():
    lp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    torch.testing.assert_close(token_kl_penalty(lp, ref, "kl"), torch.tensor([[0.5, -1.0]]))
    torch.testing.assert_close(token_kl_penalty(lp, None, "entropy"), lp)
    # the k1 estimator is unbiased: E_pi[log pi - log ref] = KL(pi || ref) (exact expectation over a vocabulary)
    logits, ref_logits = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    logp, logr = logits.log_softmax(0), ref_logits.log_softmax(0)
    expected_penalty = (logp.exp() * token_kl_penalty(logp, logr, "kl")).sum()
    torch.testing.assert_close(expected_penalty, torch.nn.functional.kl_div(logr, logp, log_target=True, reduction="sum"))
    with pytest.raises(ValueError, match="kind must be"):
        token_kl_penalty(lp, ref, "reverse")
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        token_kl_penalty(lp, None, "kl")
