"""The deliberate bugs ("mutations") that `scripts/mutation_check.py` applies to the product code, one at a time.

Each record replaces one exact snippet of one product file. `old` must occur exactly once in `path` (checked by
`mutation_check.py --check` and by tests/test_mutation_list.py), `new` differs from it, and `tests` are the pytest
files or node ids expected to catch the bug: the check runs only those, so keep each set small (about two minutes).

To add a mutation: append a `Mutation(...)` below, then run
    .venv/bin/python scripts/mutation_check.py --check
    .venv/bin/python scripts/mutation_check.py --only NEW_ID
"""

from __future__ import annotations

from typing import NamedTuple


class Mutation(NamedTuple):
    id: str  # short slug, unique
    path: str  # product file, relative to the repository root
    old: str  # exact snippet, occurring exactly once in `path`
    new: str  # its replacement
    tests: list[str]  # pytest files or node ids expected to catch it
    what: str  # one line: the behaviour broken


# ---------------------------------------------------------------------------------------------------- test selections
MATH = "tests/test_trainer_math.py"
LM = "tests/test_trainer_lm.py"
LM_SINGLE = LM + "::test_single_loop_raises_the_preferred_token_frequency"
LM_RESUME = LM + "::test_resume_equals_uninterrupted"
LM_EVAL = LM + "::test_evaluate_reports_theta_reward_and_oracle_score_without_queries"
LM_EPOCHS = LM + "::test_each_epoch_rolls_out_every_prompt_once_in_a_new_order"
LM_PSGD = LM + "::test_partial_sgd_has_one_actor_and_no_penalty"
LM_NESTED = LM + "::test_nested_loop_updates_x_every_inner_steps_iterations"
LM_FIXED_TAU = LM + "::test_fixed_tau_keeps_tau_and_schedules_decay"
FUSED = "tests/test_trainer_fused.py"
BANDIT_TRAINER = "tests/test_trainer_bandit.py"
ERRORS = "tests/test_trainer_errors.py"
ERRORS_MASKS = ERRORS + "::test_value_head_shapes_and_completion_masks"
ERRORS_EMPTY = ERRORS + "::test_empty_completions_are_scored"
RL_UTILS = "tests/test_rl_utils.py"
PREFERENCE = "tests/test_preference.py"
SCRIPTS = "tests/test_scripts_and_oracles.py"
CONFIG = "tests/test_config_validation.py"
GW_CONFIG = "tests/test_gridworld_config_validation.py"
GW_CONTRACTS = "tests/test_gridworld_contracts.py"
GW_ALGORITHMS = "tests/test_gridworld_algorithms.py"
GW_TAU = GW_ALGORITHMS + "::test_tau_schedules_decay_to_the_floor_and_fixed_tau_stays"
GW_SAMPLED = "tests/test_gridworld_problem.py::test_sampled_single_loop_estimate_matches_exact_within_sampling_error"
GW_RECIPE = "tests/test_gridworld_recipe.py"
STACKED = "tests/test_stacked_adapters.py"
TABULAR = "tests/test_tabular.py"
GW_SOLVERS = "tests/test_gridworld_solvers.py"
REWARD_ADAPTER = "tests/test_reward_adapter.py"
HT = "tests/test_happy_tweet_recipe.py"
HT_KL = HT + "::test_sequence_kl_expectation_is_the_exact_kl"
HT_DISTINCT = HT + "::test_distinct_n"
HT_EVAL_SCRIPT = HT + "::test_evaluation_script"

TRAINER = "bilevel_rlhf/trainer.py"
ROLLOUT = "bilevel_rlhf/rollout.py"
MODELING = "bilevel_rlhf/modeling.py"
RL = "bilevel_rlhf/rl_utils.py"
SCHEDULES = "bilevel_rlhf/schedules.py"
PREF = "bilevel_rlhf/preference.py"
OBJECTIVES = "bilevel_rlhf/objectives.py"
SAMPLING = "bilevel_rlhf/sampling.py"
ADAPTERS = "bilevel_rlhf/adapters.py"
CFG = "bilevel_rlhf/config.py"
GW_ALG = "bilevel_rlhf/gridworld/algorithms.py"
GW_CFG = "bilevel_rlhf/gridworld/config.py"
GW_REC = "bilevel_rlhf/gridworld/recipe.py"
GW_MDP = "bilevel_rlhf/gridworld/mdp.py"
GW_WALKERS = "bilevel_rlhf/gridworld/walkers.py"
GW_SOLVERS_PY = "bilevel_rlhf/gridworld/solvers.py"
GW_TABULAR = "bilevel_rlhf/gridworld/tabular.py"
GW_FOUR_ROOMS = "bilevel_rlhf/gridworld/four_rooms.py"
EVAL = "bilevel_rlhf/happy_tweet/evaluate.py"
EVALUATION = "bilevel_rlhf/evaluation.py"
EVAL_SCRIPT = "scripts/evaluate_happy_tweet.py"

M = Mutation
MUTATIONS: list[Mutation] = [
    # ------------------------------------------------------------------------------------------ tabular bilevel API
    M("terminal_states_continue", GW_MDP,
      "live = np.ones(S) if self.terminal is None else (~self.terminal).astype(np.float64)",
      "live = np.ones(S)",
      [TABULAR], "a terminal state keeps its successors: values accrue after the episode ends"),
    M("sparse_solve_not_transposed", GW_SOLVERS_PY,
      "lhs = scipy.sparse.identity(mdp.n_states, format=\"csc\") - mdp.gamma * (P_pi.T if transpose else P_pi)",
      "lhs = scipy.sparse.identity(mdp.n_states, format=\"csc\") - mdp.gamma * P_pi",
      [TABULAR], "a sparse MDP's visits solve (I - gamma P_pi) instead of its transpose"),
    M("walkers_visits_not_renormalized", GW_WALKERS,
      "return list(counts / ends)", "return list(counts / counts.sum())",
      [TABULAR], "the walkers' visits taken as d_c itself, not d_c / Z (Z: the mean discounted episode length)"),
    M("walkers_ignore_termination", GW_WALKERS,
      "self.end = np.stack([1.0 - m.gamma * (1.0 - (m.terminal if m.terminal is not None else np.zeros(S)))",
      "self.end = np.stack([1.0 - m.gamma * (1.0 - (np.zeros(S)))",
      [TABULAR], "walkers play on after acting in a terminal state"),
    M("penalty_direction_sign", GW_WALKERS,
      "h += penalty_lambda * problem.incentive.vjp(x, c, w_theta[c] - w_phi[c])",
      "h += penalty_lambda * problem.incentive.vjp(x, c, w_phi[c] - w_theta[c])",
      [TABULAR], "the penalty difference with phi and theta swapped"),
    M("penalized_follower_bonus", GW_WALKERS,
      '("theta", 1.0 / penalty_lambda)', '("theta", 1.0)',
      [TABULAR], "theta's reward adds u_x instead of u_x / lambda"),
    M("sampled_critic_bootstraps_past_terminal", GW_WALKERS,
      "self.bootstrap = (gamma[:, None] * live)[..., None]", "self.bootstrap = (gamma[:, None] + 0 * live)[..., None]",
      [TABULAR], "the sampled critics bootstrap past a terminal state"),
    M("sampled_theta_reward", GW_WALKERS,
      "actors.update(model, np.stack([r, r + u / penalty_lambda])",
      "actors.update(model, np.stack([r, r - u / penalty_lambda])",
      [TABULAR], "the sampled theta minimizes the leader's value instead of leaning towards it"),
    M("empirical_model_wrong_successor", GW_WALKERS,
      "slot = (self.succ[c, s, a] == nxt[:, None]).argmax(-1)", "slot = np.zeros_like(c)",
      [TABULAR], "every observed move is counted as the most likely successor"),
    M("empirical_model_unseen_pairs_worth_zero", GW_WALKERS,
      "return np.where(n > 0, seen, V[..., None])", "return seen",
      [TABULAR], "an (s, a) never seen leads nowhere (value 0) instead of staying in s"),
    M("natural_actor_step_without_tau", GW_WALKERS,
      "actor_step * self.Q / tau", "actor_step * self.Q",
      [TABULAR], "the actors' natural step targets exp(Q), not the soft best response exp(Q / tau)"),
    M("exploring_starts_not_counted", GW_WALKERS,
      "for transitions in visits + ([walkers[0].explore(explore, rng_explore)] if explore else []):",
      "for transitions in visits:",
      [TABULAR], "the exploring starts are drawn and billed but never enter the model"),
    M("penalty_ascent_theta_is_phi", GW_WALKERS,
      "theta = [soft_value_iteration(c.mdp, r + u / penalty_lambda, tau)[2]",
      "theta = [soft_value_iteration(c.mdp, r, tau)[2]",
      [TABULAR], "HPGD-protocol ascent with theta = phi: the direction loses the follower's response"),
    M("gw_penalty_crn_ignored", GW_WALKERS,
      "stream = np.random.default_rng(seed) if common_random_numbers else rng", "stream = rng",
      [TABULAR + "::test_the_sampled_penalty_direction_of_equal_actors_is_zero_only_when_coupled"],
      "the HPGD-protocol direction's common_random_numbers=True is ignored"),
    M("gw_walkers_crn_ignored", GW_WALKERS,
      "np.random.default_rng(seed if common_random_numbers else seed + 1_000_003)",
      "np.random.default_rng(seed + 1_000_003)",
      [TABULAR + "::test_identical_actors_cancel_exactly_only_with_common_random_numbers_in_the_sampled_single_loop"],
      "the sampled single loop's common_random_numbers=True is ignored"),
    M("gamma_one_reachability_unchecked", GW_MDP,
      "        if not reach.all():", "        if False:",
      [TABULAR, GW_SOLVERS], "gamma = 1 is accepted although some state never terminates (infinite values)"),
    M("leader_cost_gradient_dropped", GW_TABULAR,
      "g = g + self.leader_cost.vjp(x, i, d[:, None] * pi)", "g = g",
      [TABULAR], "the hypergradient misses the explicit term E_d[grad_x u_x]"),
    M("incentive_vjp_pays_in_the_goal", GW_TABULAR,
      "            g_s = np.where(zero_in[c], 0.0, g_s)\n", "",
      [TABULAR], "the bounded incentive's VJP counts cells where the context pays nothing"),
    M("four_rooms_cost_softmax_jacobian", GW_FOUR_ROOMS,
      "* c_ul * budget * p[-1] * (spare - p)", "* c_ul * budget * (spare - p)",
      [TABULAR], "the leader's budget cost differentiated without the softmax's p_spare factor"),
    # ------------------------------------------------------------------------------------------ trainer: PPO loss
    M("ppo_policy_clip_min", TRAINER,
      "pg_losses = torch.max(-adv * ratio,", "pg_losses = torch.min(-adv * ratio,",
      [MATH, LM_SINGLE], "PPO policy loss takes the min of the clipped and unclipped terms (optimistic, unclipped)"),
    M("ppo_value_clip_min", TRAINER,
      "vf_losses = torch.max(", "vf_losses = torch.min(",
      [MATH, LM_SINGLE], "clipped value loss takes the min instead of the max"),
    M("ppo_ratio_inverted", TRAINER,
      'log_ratio = new["logprobs"] - old.logprobs', 'log_ratio = old.logprobs - new["logprobs"]',
      [MATH, LM_SINGLE], "importance ratio is pi_old / pi_new"),
    M("ppo_clip_lower_bound", TRAINER,
      "torch.clamp(ratio, 1 - a.cliprange, 1 + a.cliprange)", "torch.clamp(ratio, a.cliprange, 1 + a.cliprange)",
      [MATH], "ratio clipped below at epsilon instead of 1 - epsilon"),
    M("ppo_value_clip_around_new", TRAINER,
      'v_clipped = old.values + torch.clamp(', 'v_clipped = new["values"] + torch.clamp(',
      [MATH], "clipped value centred on the new value instead of the rollout's"),
    M("ppo_policy_loss_unmasked", TRAINER,
      "pg_loss = masked_mean(pg_losses, mask)", "pg_loss = pg_losses.mean()",
      [MATH], "padding after eos enters the policy loss"),
    M("ppo_vf_coef_dropped", TRAINER,
      "return pg_loss + a.vf_coef * vf_loss, stats", "return pg_loss + vf_loss, stats",
      [MATH], "value loss not weighted by vf_coef"),
    M("ppo_approxkl_no_half", TRAINER,
      '"approxkl": 0.5 * masked_mean(', '"approxkl": masked_mean(',
      [MATH], "policy/approxkl metric is twice the k2 estimate"),
    M("ppo_clipfrac_one_sided", TRAINER,
      "(torch.abs(ratio.detach() - 1) > a.cliprange)", "(ratio.detach() - 1 > a.cliprange)",
      [MATH], "policy/clipfrac counts only ratios above 1 + epsilon"),
    # ------------------------------------------------------------------------------------------ trainer: rewards, GAE
    M("gae_gamma_lam_swapped", TRAINER,
      "compute_gae(rewards, values, maskf, a.gamma, a.lam)", "compute_gae(rewards, values, maskf, a.lam, a.gamma)",
      [MATH, LM_SINGLE], "GAE called with the discount and the GAE lambda swapped"),
    M("advantages_not_whitened", TRAINER,
      "advantages = masked_whiten(advantages, maskf)", "advantages = advantages",
      [MATH, LM_SINGLE], "advantages are not whitened"),
    M("token_reward_sign", TRAINER,
      "rewards = -tau * penalty", "rewards = tau * penalty",
      [MATH, LM_SINGLE, BANDIT_TRAINER], "per-token reward +tau * penalty: the regularization rewards divergence"),
    M("terminal_score_before_last", TRAINER,
      "last = mask.sum(1) - 1", "last = mask.sum(1) - 2",
      [MATH, ERRORS_EMPTY], "terminal score added at the token before the last one"),
    M("whiten_rewards_inverted", TRAINER,
      "if a.whiten_rewards:", "if not a.whiten_rewards:",
      [MATH, LM_SINGLE], "rewards whitened exactly when whiten_rewards is off"),
    M("penalty_always_entropy", TRAINER,
      "token_kl_penalty(logprobs, ref_logprobs, a.regularization)", 'token_kl_penalty(logprobs, ref_logprobs, "entropy")',
      [MATH, LM_SINGLE], "regularization='kl' ignores the reference (entropy penalty used)"),
    M("theta_terminal_sign", TRAINER,
      'terminal = theta.score - g / rollout.penalty_lambda if',
      'terminal = theta.score + g / rollout.penalty_lambda if',
      [MATH, BANDIT_TRAINER], "theta's terminal reward r_x + g / lambda (sign of the upper objective)"),
    M("theta_terminal_no_lambda", TRAINER,
      'theta.score - g / rollout.penalty_lambda if', 'theta.score - g if',
      [MATH, BANDIT_TRAINER], "theta's terminal reward r_x - g without the division by lambda"),
    M("theta_g_pairs_misaligned", OBJECTIVES,
      "return 2.0 * pair_loss.detach().repeat_interleave(2)", "return 2.0 * pair_loss.detach().repeat(2)",
      [MATH, BANDIT_TRAINER], "each completion gets another pair's loss (repeat instead of repeat_interleave)"),
    M("theta_g_halved", OBJECTIVES,
      "return 2.0 * pair_loss.detach().repeat_interleave(2)", "return pair_loss.detach().repeat_interleave(2)",
      [MATH, BANDIT_TRAINER], "preference_nll's df/dpi is the pair loss, not twice it"),
    M("win_rate_g_sign", OBJECTIVES,
      "return (self.weight * pair_loss - labels).detach()", "return (self.weight * pair_loss + labels).detach()",
      [MATH, BANDIT_TRAINER], "win_rate's df/dpi adds the win label instead of subtracting it"),
    M("win_rate_x_loss_unweighted", OBJECTIVES,
      "return self.weight * pair_loss.mean()", "return pair_loss.mean()",
      [MATH, BANDIT_TRAINER], "win_rate's x-loss ignores the weight w"),
    M("partial_sgd_terminal_penalized", TRAINER,
      'g / rollout.penalty_lambda if penalized else theta.score',
      'g / rollout.penalty_lambda',
      [MATH, LM_PSGD], "partial_sgd's theta also gets the -g / lambda term"),
    M("pair_loss_swapped", TRAINER,
      'return bradley_terry_loss(scores["theta"][0::2], scores["theta"][1::2], labels)',
      'return bradley_terry_loss(scores["theta"][1::2], scores["theta"][0::2], labels)',
      [MATH, BANDIT_TRAINER], "theta's pair loss with the labels' completions swapped"),
    M("pair_loss_against_reference_swapped", TRAINER,
      'return bradley_terry_loss(scores["theta"], scores["ref"], labels)',
      'return bradley_terry_loss(scores["ref"], scores["theta"], labels)',
      [MATH, BANDIT_TRAINER], "win_rate's pair loss with theta's and the reference's completions swapped"),
    M("oracle_pairs_against_reference_swapped", TRAINER,
      'pair_prompts, side_a, side_b = rep_prompts, texts["theta"], texts["ref"]',
      'pair_prompts, side_a, side_b = rep_prompts, texts["ref"], texts["theta"]',
      [MATH, BANDIT_TRAINER], "the oracle is asked whether the reference beats theta"),
    M("crn_shared_with_reference", TRAINER,
      'noise_seed=seed if r != "ref" else None', "noise_seed=seed",
      [MATH, BANDIT_TRAINER, "tests/test_coupled_sampling.py"],
      "the reference's completions share theta's noise (pairs no longer independent)"),
    M("crn_not_shared", TRAINER,
      'noise_seed=seed if r != "ref" else None', 'noise_seed=seed + (r == "phi") if seed is not None else None',
      ["tests/test_coupled_sampling.py", BANDIT_TRAINER], "theta and phi draw different noise"),
    M("stacked_crn_not_shared", TRAINER,
      'crn_seed if crn_seed is not None and r != "ref"', 'crn_seed + (r == "phi") if crn_seed is not None and r != "ref"',
      [STACKED], "LoRA actors generating in one batch: theta and phi draw different noise"),
    M("stacked_block_seeds_shared", SAMPLING,
      "for seed in self.seeds:", "for seed in self.seeds[:1] * len(self.seeds):",
      [STACKED], "every block of a stacked batch draws the first block's noise (the reference shares theta's)"),
    M("stacked_scaling_dropped", ADAPTERS,
      "delta = (low_rank * scaling.to(low_rank.dtype))", "delta = (low_rank * 1.0)",
      [STACKED], "the stacked LoRA product without the adapters' scaling alpha / r"),
    M("stacked_base_rows_adapted", ADAPTERS,
      "return torch.cat([result[: k * rows] + delta, result[k * rows :]])",
      "return torch.cat([result[: k * rows] + delta, result[k * rows :] + delta[: result.shape[0] - k * rows]])",
      [STACKED], "the reference's rows of a stacked batch go through an adapter"),
    M("stacked_forward_blocks_misaligned", MODELING,
      "block = slice(j * rows, (j + 1) * rows)", "block = slice(0, rows)",
      [STACKED], "every actor's old log-probs and values are read from theta's block"),
    M("stacked_ref_logprobs_swapped", TRAINER,
      "ref_logprobs.update(zip(group, logprobs.split(len(rep_prompts))))",
      "ref_logprobs.update(zip(group, logprobs.split(len(rep_prompts))[::-1]))",
      [STACKED], "theta's KL term reads the reference's log-probs of phi's completions"),
    M("reward_adapter_in_actor_group", MODELING,
      "if p.requires_grad and id(p) not in shared]", "if p.requires_grad]",
      [REWARD_ADAPTER], "r_x's adapter is also stepped as an actor parameter, at the actors' learning rate"),
    M("reward_adapter_not_activated", MODELING,
      "        self.peft_model.set_adapter(self.adapter_name)\n", "",
      [REWARD_ADAPTER], "r_x reads the base through whichever actor's adapter was active last"),
    M("reward_adapter_freezes_actors", MODELING,
      "        self.peft_model.set_requires_grad(list(self.peft_model.peft_config), requires_grad=True)\n", "",
      [REWARD_ADAPTER], "scoring with r_x freezes the actors' adapters (PEFT's set_adapter)"),
    M("reward_adapter_score_at_padding", MODELING,
      "last = (attention_mask.long() * positions).argmax(-1)", "last = attention_mask.long().sum(-1) - 1",
      [REWARD_ADAPTER], "r_x's score is read at the wrong position of left-padded rows"),
    M("reward_adapter_head_not_loaded", MODELING,
      "        set_peft_model_state_dict(self.peft_model, state, adapter_name=self.adapter_name)\n        self._load_head(directory)",
      "        set_peft_model_state_dict(self.peft_model, state, adapter_name=self.adapter_name)",
      [REWARD_ADAPTER], "a checkpoint's r_x head is not restored"),
    M("gumbel_position_ignored", SAMPLING,
      "manual_seed((seed * _MIX + t) % 2**63)", "manual_seed((seed * _MIX) % 2**63)",
      ["tests/test_coupled_sampling.py"], "every position sees the same noise"),
    M("gumbel_noise_sign", SAMPLING,
      "return torch.log_softmax(scores.double(), dim=-1) + gumbel", "return torch.log_softmax(scores.double(), dim=-1) - gumbel",
      ["tests/test_coupled_sampling.py"], "minus Gumbel noise: the wrong distribution"),
    M("crn_temperature_dropped", SAMPLING,
      "    if temperature != 1.0:\n        processors.append(TemperatureLogitsWarper(temperature))\n", "",
      ["tests/test_coupled_sampling.py"], "coupled sampling ignores the temperature"),
    # ------------------------------------------------------------------------------------------ trainer: reward model
    M("reward_loss_x_part_dropped", TRAINER,
      "loss = answered_x_loss(objective, pair_loss, labels, answered)",
      "loss = 0.0 * answered_x_loss(objective, pair_loss, labels, answered)",
      [MATH, BANDIT_TRAINER], "reward model's loss without grad_x f"),
    M("reward_loss_theta_sign", TRAINER,
      "loss = loss - lambda_k * r_theta.mean()", "loss = loss + lambda_k * r_theta.mean()",
      [MATH, BANDIT_TRAINER], "hypergradient's theta term with the wrong sign"),
    M("reward_loss_phi_sign", TRAINER,
      "loss = loss + lambda_k * r_phi.mean()", "loss = loss - lambda_k * r_phi.mean()",
      [MATH, BANDIT_TRAINER], "hypergradient's phi term with the wrong sign"),
    M("reward_loss_penalty_in_partial_sgd", TRAINER,
      "        if method in PENALTY_METHODS:  # the lower-level gap: every completion, answered or not\n"
      "            loss = loss - lambda_k", "        if True:\n            loss = loss - lambda_k",
      [MATH, LM_PSGD], "partial_sgd's reward loss gets the -lambda * mean r_x(theta) term"),
    M("covariance_not_centered", TRAINER,
      "loss = loss + ((g_a - g_a.mean()) * r_a).sum()", "loss = loss + (g_a * r_a).sum()",
      [MATH, BANDIT_TRAINER], "covariance term without centering g (a biased estimate)"),
    M("covariance_sign", TRAINER,
      "loss = loss + ((g_a - g_a.mean()) * r_a).sum()", "loss = loss - ((g_a - g_a.mean()) * r_a).sum()",
      [MATH, BANDIT_TRAINER, "tests/test_testbed.py"], "covariance term with the wrong sign"),
    M("reward_positions_ignored", MODELING,
      'extra = {"position_ids": position_ids_from_mask(attention_mask)} if self._reward_positions else {}',
      "extra = {}", [MATH], "r_x reads left-padded prompts at shifted positions"),
    M("covariance_tau_multiplies", TRAINER,
      "/ (max(len(g_a) - 1, 1) * tau_k)", "* tau_k / max(len(g_a) - 1, 1)",
      [MATH, BANDIT_TRAINER], "covariance term multiplied by tau instead of divided"),
    M("reward_step_every_epoch", TRAINER,
      'reward_step=epoch == 0 and buf.reward_step', 'reward_step=buf.reward_step',
      [MATH, LM_NESTED], "reward model updated in every PPO epoch instead of the first"),
    M("reward_rows_misaligned", ROLLOUT,
      'getattr(self, f.name)[idx] for f in',
      'getattr(self, f.name)[idx.flip(0) if f.name.startswith("reward_") else idx] for f in',
      [MATH, FUSED], "mini-batch takes r_x inputs from the wrong rows"),
    M("minibatch_labels_misaligned", ROLLOUT,
      "labels=None if self.labels is None else self.labels[pairs],",
      "labels=None if self.labels is None else self.labels[pairs.flip(0)],",
      [MATH], "a mini-batch's pair labels travel with other pairs' completions"),
    M("fused_scores_from_the_rollout_only", TRAINER,
      """        if outputs["scores"]:
            batch = self.with_scores(""", """        if False:
            batch = self.with_scores(""",
      [FUSED, MATH], "the fused update does not score with its own forward pass (terminal rewards missing)"),
    M("lr_logged_for_one_group", TRAINER,
      """logs.update({f"learning_rate/{g['name']}": g["lr"] for g in""",
      """logs.update({f"learning_rate/{g['name']}": self.optimizer.param_groups[0]["lr"] for g in""",
      [MATH + "::test_learning_rates_follow_their_schedules_and_clipping_is_per_role"],
      "every role's logged learning rate is the actors'"),
    M("reward_iteration_off_by_one", TRAINER,
      "return (k + 1) % self.args.nested_inner_steps == 0", "return k % self.args.nested_inner_steps == 0",
      [MATH, LM_NESTED], "nested_loop updates x at the first inner iteration instead of the last"),
    # ------------------------------------------------------------------------------------------ trainer: iteration index, schedules
    M("rollout_iteration_is_global_step", TRAINER,
      "k = self.state.global_step // a.steps_per_iteration", "k = self.state.global_step",
      [MATH, LM_FIXED_TAU], "rollout's iteration k counts optimizer steps, so tau/lambda advance too fast"),
    M("checkpoint_iteration_is_global_step", TRAINER,
      "k = self.state.global_step // self.args.steps_per_iteration", "k = self.state.global_step",
      [MATH, LM_RESUME], "checkpoint state records the optimizer step as the iteration"),
    M("fixed_tau_decays_in_trainer", TRAINER,
      'if a.method == "fixed_tau":', 'if a.method == "fixed":',
      [MATH, LM_FIXED_TAU], "fixed_tau follows the decaying tau schedule"),
    M("lr_scheduler_uses_step", TRAINER,
      "lr_factor(step // steps, schedule, decay, a.lr_horizon)", "lr_factor(step, schedule, decay, a.lr_horizon)",
      [MATH], "learning-rate factor indexed by optimizer step instead of iteration"),
    M("lr_scheduler_groups_swapped", TRAINER,
      '[factor("actor"), factor("critic"), factor("reward")]', '[factor("actor"), factor("reward"), factor("critic")]',
      [MATH], "critic and reward parameter groups get each other's learning-rate schedule"),
    M("optimizer_critic_gets_actor_lr", TRAINER,
      '{"params": groups["critic"], "lr": a.critic_learning_rate,', '{"params": groups["critic"], "lr": a.actor_learning_rate,',
      [MATH], "critic parameter group uses the actor's learning rate"),
    M("grad_clip_joint", TRAINER,
      "        for group in self.optimizer.param_groups:\n"
      '            params = [p for p in group["params"] if p.grad is not None]\n'
      "            if params:\n"
      '                norms[group["name"]] = torch.nn.utils.clip_grad_norm_(params, self.args.max_grad_norm)\n',
      '        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]\n'
      '        norms["all"] = torch.nn.utils.clip_grad_norm_(params, self.args.max_grad_norm)\n',
      [MATH], "gradient clipped jointly over all roles instead of per role"),
    M("sampler_drops_last_batch", TRAINER,
      "range(0, self.num_samples - self.batch_size + 1, self.batch_size)",
      "range(0, self.num_samples - self.batch_size, self.batch_size)",
      [MATH, LM_EPOCHS], "IterationSampler drops the last complete batch of an epoch"),
    M("completion_mask_excludes_eos", RL,
      "return (positions[None, :] <= first[:, None]).long()", "return (positions[None, :] < first[:, None]).long()",
      [MATH, ERRORS_MASKS, ERRORS_EMPTY, SCRIPTS], "completion mask stops before the eos token"),
    # ------------------------------------------------------------------------------------------ trainer: metrics
    M("pref_accuracy_inverted", TRAINER,
      "(y * s[a] + (1 - y) * (1 - s[a])).mean()", "(y * (1 - s[a]) + (1 - y) * s[a]).mean()",
      [MATH], "objective/pref_accuracy is one minus the accuracy"),
    M("penalty_gap_sign", TRAINER,
      'm["objective/penalty_gap"] = j_phi.mean() - j_theta.mean()', 'm["objective/penalty_gap"] = j_theta.mean() - j_phi.mean()',
      [MATH], "objective/penalty_gap with the wrong sign"),
    M("kl_metric_per_token", TRAINER,
      '* c.mask).sum(1).mean()', '* c.mask).mean()',
      [MATH], "policy_*/kl is a per-token mean instead of the per-sequence KL"),
    M("oracle_queries_counts_completions", "bilevel_rlhf/oracle_calls.py",
      "return OracleCounts(asked=n, answered=answered,", "return OracleCounts(asked=2 * n, answered=answered,",
      [MATH, LM_EVAL], "oracle/queries counts completions instead of labelled pairs"),
    # ------------------------------------------------------------------------------------------ modeling
    M("value_read_one_late", MODELING,
      "hidden = out.hidden_states[-1][:, prompt_length - 1 : -1]", "hidden = out.hidden_states[-1][:, prompt_length:]",
      [MATH, ERRORS_MASKS], "V(s_t) read at the hidden state after token t (one position late)"),
    M("temperature_multiplies", MODELING,
      "logits = logits / temperature", "logits = logits * temperature",
      [MATH, FUSED], "log-probs computed with the logits multiplied by the temperature"),
    # ------------------------------------------------------------------------------------------ rl_utils
    M("whiten_shift_mean_inverted", RL,
      "    if not shift_mean:\n        whitened = whitened + mean", "    if shift_mean:\n        whitened = whitened + mean",
      [RL_UTILS, MATH], "masked_whiten adds the mean back exactly when it should remove it"),
    M("masked_var_bessel_inverted", RL,
      "var = var * count / (count - 1)", "var = var * (count - 1) / count",
      [RL_UTILS, MATH], "masked_var's Bessel correction inverted"),
    M("gae_next_value_shift", RL,
      "next_values = F.pad(values[:, 1:], (0, 1))", "next_values = F.pad(values[:, :-1], (1, 0))",
      [RL_UTILS, MATH], "GAE bootstraps from V_{t-1} instead of V_{t+1}"),
    M("gae_gamma_dropped", RL,
      "delta = (rewards + gamma * next_values - values) * m", "delta = (rewards + next_values - values) * m",
      [RL_UTILS, MATH], "TD error without the discount"),
    M("gae_discount_transposed", RL,
      "advantages = delta @ discount.T", "advantages = delta @ discount",
      [RL_UTILS, MATH], "GAE sums past TD errors instead of future ones"),
    M("bt_loss_labels_swapped", RL,
      "-(labels * F.logsigmoid(d) + (1.0 - labels) * F.logsigmoid(-d))",
      "-(labels * F.logsigmoid(-d) + (1.0 - labels) * F.logsigmoid(d))",
      [RL_UTILS, MATH], "Bradley-Terry loss with the label applied to the wrong completion"),
    M("kl_penalty_sign", RL,
      "return logprobs - ref_logprobs", "return ref_logprobs - logprobs",
      [RL_UTILS, MATH], "token_kl_penalty('kl') is log(pi_ref / pi)"),
    M("entropy_penalty_sign", RL,
      '    if kind == "entropy":\n        return logprobs\n', '    if kind == "entropy":\n        return -logprobs\n',
      [RL_UTILS, MATH], "token_kl_penalty('entropy') is -log pi: the reward penalizes entropy"),
    # ------------------------------------------------------------------------------------------ schedules
    M("tau_exponent_sign", SCHEDULES,
      "tau = tau_init * (1.0 + k / horizon) ** (-decay_rate)", "tau = tau_init * (1.0 + k / horizon) ** decay_rate",
      [MATH, GW_TAU, LM_FIXED_TAU], "polynomial tau schedule increases"),
    M("tau_exponential_horizon", SCHEDULES,
      "math.exp(-decay_rate * k / horizon)", "math.exp(-decay_rate * k * horizon)",
      [MATH], "exponential tau schedule multiplies by the horizon instead of dividing"),
    M("tau_floor_dropped", SCHEDULES,
      "return max(tau, tau_min)", "return tau",
      [MATH, GW_TAU], "tau is not floored at tau_min"),
    M("lambda_growth_sign", SCHEDULES,
      "lam = lambda_init * (1.0 + k / horizon) ** growth", "lam = lambda_init * (1.0 + k / horizon) ** (-growth)",
      [MATH], "polynomial lambda schedule decreases"),
    M("lambda_cap_max", SCHEDULES,
      "min(lam, lambda_max)", "max(lam, lambda_max)",
      [MATH], "lambda_max acts as a floor instead of a cap"),
    M("lr_factor_horizon_ignored", SCHEDULES,
      "return (1.0 + k / horizon) ** (-decay)", "return (1.0 + k) ** (-decay)",
      [MATH, GW_CONTRACTS], "polynomial learning-rate factor ignores the horizon k_0"),
    # ------------------------------------------------------------------------------------------ preference oracles
    M("oracle_deterministic_inverted", PREF,
      "labels = (diff > 0).astype(np.float64)", "labels = (diff < 0).astype(np.float64)",
      [PREFERENCE, SCRIPTS], "deterministic oracle prefers the lower score"),
    M("oracle_bt_temperature_halved", PREF,
      "np.tanh(diff / (2.0 * self.temperature))", "np.tanh(diff / self.temperature)",
      [PREFERENCE, SCRIPTS], "Bradley-Terry probability is sigmoid(2 diff / T)"),
    M("oracle_bt_sampling_inverted", PREF,
      "return (self.rng.random(n) < prob)", "return (self.rng.random(n) > prob)",
      [PREFERENCE, SCRIPTS], "sampled Bradley-Terry label is 1 with probability 1 - p"),
    M("check_labels_lower_bound_dropped", PREF,
      "out = (arr < 0.0) | (arr > 1.0)", "out = arr > 1.0",
      [PREFERENCE, SCRIPTS], "check_labels accepts negative labels"),
    # ------------------------------------------------------------------------------------------ gridworld algorithms
    M("gw_fixed_tau_decays", GW_ALG,
      'tau = gridworld_tau(cfg, t, decay=method != "fixed_tau")', "tau = gridworld_tau(cfg, t)",
      [GW_CONTRACTS, GW_ALGORITHMS], "GridWorld fixed_tau quietly decays tau"),
    M("gw_nested_hypergrad_sign", GW_ALG,
      "h = problem.placement_grad(x) + lam * problem.reward_vjp(x, w_sum / n_w)",
      "h = (-1.0 if nested else 1.0) * (problem.placement_grad(x) + lam * problem.reward_vjp(x, w_sum / n_w))",
      [GW_CONTRACTS, GW_ALGORITHMS], "nested_loop's hypergradient with the wrong sign"),
    M("gw_penalty_hypergrad_sign", GW_ALG,
      "+ lam * problem.reward_vjp(x, w_sum / n_w)", "- lam * problem.reward_vjp(x, w_sum / n_w)",
      [GW_CONTRACTS, GW_ALGORITHMS], "penalty hypergradient's lambda term with the wrong sign"),
    M("gw_penalty_term_dropped", GW_ALG,
      "h = problem.placement_grad(x) + lam * problem.reward_vjp(x, w_sum / n_w)", "h = problem.placement_grad(x)",
      [GW_CONTRACTS, GW_ALGORITHMS], "penalty methods drop the penalty term (they become partial_sgd)"),
    M("gw_theta_reward_sign", GW_ALG,
      "np.stack([r, r - u_cost / lam])", "np.stack([r, r + u_cost / lam])",
      [GW_CONTRACTS, GW_ALGORITHMS], "theta trained on r_x + u / lambda"),
    M("gw_theta_reward_no_lambda", GW_ALG,
      "np.stack([r, r - u_cost / lam])", "np.stack([r, r - u_cost])",
      [GW_CONTRACTS, GW_ALGORITHMS], "theta trained on r_x - u (no division by lambda)"),
    M("gw_lambda_schedule_decreasing", GW_ALG,
      '"polynomial", cfg.penalty_lambda_growth, cfg.lr_horizon, None)',
      '"polynomial", -cfg.penalty_lambda_growth, cfg.lr_horizon, None)',
      [GW_CONTRACTS, GW_ALGORITHMS], "GridWorld lambda_t decreases when penalty_lambda_growth > 0"),
    M("gw_tau_decay_exponent_sign", GW_ALG,
      "cfg.tau_decay_rate, cfg.tau_horizon)", "-cfg.tau_decay_rate, cfg.tau_horizon)",
      [GW_CONTRACTS, GW_TAU], "GridWorld tau_t increases"),
    M("gw_common_random_numbers_off", GW_ALG,
      "u = u_phi if cfg.common_random_numbers else np.stack([u_phi, sampler.uniforms(rng)])",
      "u = np.stack([u_phi, sampler.uniforms(rng)])",
      [GW_CONTRACTS, GW_ALGORITHMS], "common_random_numbers=True is ignored"),
    M("gw_penalty_samples_undercounted", GW_ALG,
      "tracker.samples += 2 * cfg.batch_size", "tracker.samples += cfg.batch_size",
      [GW_CONTRACTS, GW_ALGORITHMS], "penalty methods count one actor's transitions only"),
    M("gw_fd_difference_sign", GW_ALG,
      "g += (f_plus - f_minus) / (2.0 * cfg.fd_eps) * v", "g += (f_minus - f_plus) / (2.0 * cfg.fd_eps) * v",
      [GW_CONTRACTS, GW_ALGORITHMS], "finite-difference gradient with the wrong sign (ascent)"),
    M("gw_soft_value_drops_entropy", GW_ALG,
      "V[i, x] += pi[i, x, a] * (Q[i, x, a] - tau * log_pi[i, x, a])", "V[i, x] += pi[i, x, a] * Q[i, x, a]",
      [GW_CONTRACTS, GW_ALGORITHMS], "soft critic's state value omits the entropy term"),
    M("gw_actor_step_sign", GW_ALG,
      "logits[i, x, a] += alpha * pi[i, x, a]", "logits[i, x, a] -= alpha * pi[i, x, a]",
      [GW_CONTRACTS, GW_ALGORITHMS], "actor descends its objective"),
    M("gw_restart_probability", GW_ALG,
      "u[iu, 2, b] <= 1.0 - gamma", "u[iu, 2, b] <= gamma",
      [GW_CONTRACTS, GW_SAMPLED], "walkers restart with probability gamma instead of 1 - gamma"),
    M("gw_stack_reads_first_actor", GW_ALG,
      "+ gamma * V[i, y] - Q[i, x, a]", "+ gamma * V[0, y] - Q[i, x, a]",
      [GW_CONTRACTS], "stacked actors all bootstrap from the first actor's soft values"),
    M("gw_stack_reads_first_reward", GW_ALG,
      "ir, iu = min(i, len(reward) - 1), min(i, len(u) - 1)", "ir, iu = 0, 0",
      [GW_CONTRACTS], "stacked actors all read the first actor's reward and uniforms"),
    M("gw_critic_sums_td_errors", GW_ALG,
      "beta * (td_sum[i, x, a] / counts[i, x, a])", "beta * td_sum[i, x, a]",
      [GW_CONTRACTS], "the critic adds the TD errors of walkers sharing an (s, a) instead of their mean"),
    M("gw_successor_value_not_computed", GW_ALG,
      "            _policy_row(logits, Q, tau, i, y, log_pi, pi, V, ready)\n", "",
      [GW_CONTRACTS], "the compiled step bootstraps from a successor's soft value it never computed"),
    M("gw_repeat_visit_updated_twice", GW_ALG,
      "            if not seen[i, x]:  # x's first walker in this step", "            if True:",
      [GW_CONTRACTS], "a state visited by several walkers gets the critic and actor step once per walker"),
    M("gw_compiled_inverse_cdf_tie", GW_ALG,
      "while i < len(cum) - 1 and cum[i] < u:", "while i < len(cum) - 1 and cum[i] <= u:",
      [GW_CONTRACTS], "the compiled step's inverse CDF can pick a zero-mass index on a tie"),
    M("gw_step_finite_flag_ignored", GW_ALG,
      "finite = finite and np.isfinite(Q[i, x, a]) and np.isfinite(logits[i, x, a])", "finite = True",
      [GW_CONTRACTS, GW_ALGORITHMS], "a non-finite critic or actor entry is not flagged by the step"),
    M("gw_inverse_cdf_search_side", GW_ALG,
      'np.searchsorted(cum, u, side="left")', 'np.searchsorted(cum, u, side="right")',
      [GW_CONTRACTS], "the one-distribution inverse CDF can pick a zero-mass index on a tie"),
    M("gw_finite_check_skipped", GW_ALG,
      "if math.isfinite(sum(value.sum() for value in arrays.values())):", "if True:",
      [GW_ALGORITHMS], "a non-finite critic, actor or x passes the GridWorld methods' check"),
    M("gw_exact_decay_index", GW_ALG,
      "tau = gridworld_tau(cfg, round(k * cfg.iterations / cfg.exact_iterations))", "tau = gridworld_tau(cfg, k)",
      [GW_CONTRACTS, GW_ALGORITHMS], "exact_decay's tau path not stretched over the sampled budget"),
    # ------------------------------------------------------------------------------------------ gridworld recipe
    M("gw_samples_to_reach_off_by_one", GW_REC,
      'zip(run["curve_samples"], run["curve_phi"])', 'zip(run["curve_samples"][1:], run["curve_phi"])',
      [GW_CONTRACTS, GW_RECIPE], "samples_to_reach reports the next recorded sample count"),
    M("gw_summarize_threshold_sign", GW_REC,
      "threshold = best_phi + 0.01 * abs(best_phi)", "threshold = best_phi + 0.01 * best_phi",
      [GW_CONTRACTS, GW_RECIPE], "1% threshold below the best Phi when Phi is negative"),
    M("gw_summarize_gap_sign", GW_REC,
      '"gap_mean": float(phis.mean() - best_phi)', '"gap_mean": float(best_phi - phis.mean())',
      [GW_CONTRACTS, GW_RECIPE], "summary gap to the best Phi with the wrong sign"),
    M("gw_summarize_seeds_reaching", GW_REC,
      '"seeds_reaching_1pct": len(hit)', '"seeds_reaching_1pct": len(reach)',
      [GW_CONTRACTS, GW_RECIPE], "summary counts every seed as reaching 1%"),
    M("gw_instance_unsuffixed_last_seed", GW_REC,
      'if r["seed"] == seeds[0]["seed"]:', 'if r["seed"] == seeds[-1]["seed"]:',
      [GW_CONTRACTS, GW_RECIPE], "instance.npz's unsuffixed keys hold the last seed instead of seed 0"),
    # ------------------------------------------------------------------------------------------ happy-tweet evaluation
    M("eval_frac_above_minus_half", EVAL,
      "float((scores > 0.5).mean())", "float((scores > -0.5).mean())",
      [SCRIPTS], "vader_frac_gt_0.5 counts compounds above -0.5"),
    M("eval_vader_mean_is_median", EVAL,
      '"vader_mean": float(scores.mean())', '"vader_mean": float(np.median(scores))',
      [SCRIPTS], "vader_mean is the median"),
    M("eval_kl_sum", EVAL,
      '"kl_to_initial": float(kl.mean())', '"kl_to_initial": float(kl.sum())',
      [SCRIPTS], "kl_to_initial sums over samples instead of averaging"),
    M("eval_length_without_eos", EVAL,
      'lengths.append(batch["completion_mask"].sum(1).float())',
      'lengths.append(batch["completion_mask"].sum(1).float() - 1)',
      [SCRIPTS], "mean_length excludes the eos token"),
    M("eval_kl_reversed", EVALUATION,
      "kl_t = (logp.exp() * (logp - logq)).sum(-1)", "kl_t = (logq.exp() * (logq - logp)).sum(-1)",
      [SCRIPTS, HT_KL], "sequence_kl computes KL(ref || policy)"),
    M("eval_distinct_off_by_one", EVALUATION,
      "for i in range(len(words) - n + 1)]", "for i in range(len(words) - n)]",
      [SCRIPTS, HT_DISTINCT], "distinct_n misses each text's last n-gram"),
    M("eval_script_run_name", EVAL_SCRIPT,
      "name, path = Path(item).name, item", "name, path = Path(item).parent.name, item",
      [SCRIPTS, HT_EVAL_SCRIPT], "a run given as FOLDER is named after its parent folder"),
]


# ---------------------------------------------------------------------------------------------------- config validations
# One mutation per validated condition: the `need(...)` check is neutralized (its condition replaced by True).
def _unchecked(prefix: str, path: str, tests: list[str], owner: str, checks: list[tuple[str, str]]) -> list[Mutation]:
    """(field, snippet) -> Mutation: a snippet `need(COND,` becomes `need(True,`; a bare `COND,` (the condition line of
    a multi-line need call) becomes `True,`."""
    return [
        M(f"{prefix}_{name}_unchecked", path, old, "need(True," if old.startswith("need(") else "True,", tests,
          f"{owner} accepts an invalid {name} (its need(...) check always passes)")
        for name, old in checks
    ]


MUTATIONS += _unchecked("cfg", CFG, [CONFIG], "BilevelConfig", [
    ("method", "need(self.method in METHODS,"),
    ("nested_inner_steps", "need(self.nested_inner_steps >= 1,"),
    ("regularization", "need(self.regularization in REGULARIZATIONS,"),
    ("tau_init", "need(self.tau_init >= 0,"),
    ("tau_min", "need(0 <= self.tau_min <= self.tau_init,"),
    ("tau_schedule", "need(self.tau_schedule in TAU_SCHEDULES,"),
    ("tau_decay_rate", "need(self.tau_decay_rate >= 0,"),
    ("tau_horizon", "need(self.tau_horizon > 0,"),
    ("penalty_lambda", "need(self.penalty_lambda > 0,"),
    ("penalty_lambda_schedule", "need(self.penalty_lambda_schedule in LAMBDA_SCHEDULES,"),
    ("penalty_lambda_growth", "need(self.penalty_lambda_growth >= 0,"),
    ("penalty_lambda_horizon", "need(self.penalty_lambda_horizon > 0,"),
    ("penalty_lambda_max", "self.penalty_lambda_max is None or self.penalty_lambda_max >= self.penalty_lambda,"),
    ("role_learning_rate", 'need(getattr(self, f"{role}_learning_rate") > 0,'),
    ("role_lr_schedule", 'need(getattr(self, f"{role}_lr_schedule") in LR_SCHEDULES,'),
    ("role_lr_decay", 'need(getattr(self, f"{role}_lr_decay") >= 0,'),
    ("lr_horizon", "need(self.lr_horizon > 0,"),
    ("max_prompt_length", "need(self.max_prompt_length >= 1,"),
    ("max_completion_length", "need(self.max_completion_length >= 1,"),
    ("temperature", "need(self.temperature > 0,"),
    ("top_k", "need(self.top_k >= 0,"),
    ("top_p", "need(0 < self.top_p <= 1,"),
    ("num_generations", "self.num_generations >= 1 and (self.objective == \"win_rate\" or self.num_generations % 2 == 0),"),
    ("num_eval_generations", "need(self.num_eval_generations >= 1,"),
    ("num_iterations", "need(self.num_iterations >= 1,"),
    ("cliprange", "need(self.cliprange > 0,"),
    ("cliprange_value", "need(self.cliprange_value > 0,"),
    ("vf_coef", "need(self.vf_coef >= 0,"),
    ("gamma", "need(0 <= self.gamma <= 1,"),
    ("lam", "need(0 <= self.lam <= 1,"),
    ("gradient_accumulation_steps", "need(self.gradient_accumulation_steps >= 1,"),
    ("steps_per_generation",
     "self.steps_per_generation >= 1 and self.steps_per_generation % self.gradient_accumulation_steps == 0,"),
    ("per_device_train_batch_size",
     "self.per_device_train_batch_size >= 1 and self.per_device_train_batch_size % self.num_generations == 0,"),
])

MUTATIONS += _unchecked("gwcfg", GW_CFG, [GW_CONFIG], "GridWorldConfig", [
    ("slip", "need(0.0 <= self.slip <= 1.0,"),
    ("gamma", "need(0.0 <= self.gamma < 1.0,"),
    ("parameterization", 'need(self.parameterization in ("position", "cells"),'),
    ("positive_fields", "need(getattr(self, name) > 0,"),
    ("nonnegative_fields", "need(getattr(self, name) >= 0,"),
    ("tau_min", "need(0.0 <= self.tau_min <= self.tau_init,"),
    ("x0", "need(len(self.x0) == 2 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in self.x0),"),
    ("types_int", "need(isinstance(value, int) and not isinstance(value, bool),"),
    ("types_float", "need(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),"),
    ("integer_fields", "need(getattr(self, name) >= 1,"),
    ("methods", "need(not unknown and len(self.methods) > 0,"),
])

# the three time-scales' order warns, one rule for both configs (bilevel_rlhf/validation.py): each half of the chained
# comparison dropped
VALIDATION = "bilevel_rlhf/validation.py"
MUTATIONS += [
    M("time_scales_fast_half_unwarned", VALIDATION,
      "if not keys[0] >= keys[1] >= keys[2]:", "if not keys[1] >= keys[2]:",
      [GW_CONFIG, CONFIG], "the configs are silent when the actor is faster than the critic (or decays slower)"),
    M("time_scales_slow_half_unwarned", VALIDATION,
      "if not keys[0] >= keys[1] >= keys[2]:", "if not keys[0] >= keys[1]:",
      [GW_CONFIG, CONFIG], "the configs are silent when x is faster than the actor (or decays slower)"),
    M("time_scales_decay_order_inverted", VALIDATION,
      "keys = [-v for v in values] if decays else values", "keys = values",
      [GW_CONFIG], "decay powers are checked in the learning rates' order (critic decaying fastest)"),
]

# the guards, the reward trust region, the adaptive tau and the unlabelled iterations (bilevel_rlhf/guards.py,
# trust_region.py, schedules.py; the trainer's label_every)
GUARDS_PY = "bilevel_rlhf/guards.py"
TRUST = "bilevel_rlhf/trust_region.py"
GUARDS = "tests/test_guards.py"
MUTATIONS += [
    M("guard_streak_never_reset", GUARDS_PY,
      "            else:\n                rec.streak = 0\n", "            else:\n                pass\n",
      [GUARDS], "a penalty gap within the tolerance does not end a run of lost-tracking rollouts"),
    M("guard_resync_never_applied", GUARDS_PY,
      "            copy_actor(model, optimizer, source=\"theta\", target=\"phi\")\n", "            pass\n",
      [GUARDS], "a due resync is counted but phi is not copied from theta"),
    M("guard_resync_copies_phi_into_theta", GUARDS_PY,
      'copy_actor(model, optimizer, source="theta", target="phi")',
      'copy_actor(model, optimizer, source="phi", target="theta")',
      [GUARDS], "the resync overwrites theta with the lost phi"),
    M("guard_collapse_fraction_ignored", GUARDS_PY,
      "if h < self.collapse_fraction * h0:", "if h < h0:",
      [GUARDS], "any entropy drop is reported as a collapse"),
    M("trust_region_never_scales", TRUST,
      "        if scale < 1.0:\n", "        if False:\n",
      [GUARDS], "the x step is measured but never scaled back"),
    M("trust_region_ignores_tau", TRUST,
      "change = ((self._scores() - scores).abs().max() / tau).reshape(1)",
      "change = (self._scores() - scores).abs().max().reshape(1)",
      [GUARDS], "the cap is on r_x, not on the tilt r_x / tau"),
    M("adaptive_tau_sign", SCHEDULES,
      "error = min(max(kl / self.target - 1.0, -0.2), 0.2)", "error = min(max(1.0 - kl / self.target, -0.2), 0.2)",
      [GUARDS], "tau shrinks while the policy is too far from the reference"),
    M("label_every_x_steps_anyway", TRAINER,
      "        return self.is_labelled_iteration(k)\n", "        return True\n",
      [GUARDS], "x steps on unlabelled iterations"),
    M("penalized_covariance_theta_unpenalized", CFG,
      'PENALIZED_THETA_METHODS = PENALTY_METHODS + ("penalized_covariance",)',
      "PENALIZED_THETA_METHODS = PENALTY_METHODS",
      [MATH], "penalized_covariance's theta gets r_x alone, without the -g / lambda term"),
]

# ---------------------------------------------------------------------------------------------------- evaluation protocol
EVAL_TESTS = "tests/test_evaluation.py"
FRONTIER_TESTS = "tests/test_frontier.py"
MUTATIONS += [
    M("protocol_win_ties_count_one", EVALUATION,
      "np.where(scores < ref_scores, 0.0, 0.5)", "np.where(scores < ref_scores, 0.0, 1.0)",
      [EVAL_TESTS + "::test_evaluator_metrics_are_those_of_its_samples"], "a tie counts as a win"),
    M("protocol_shared_rng", EVALUATION,
      "        with torch.random.fork_rng(devices=[device] if device.type == \"cuda\" else []):\n            if self._reference is None:",
      "        with contextlib.nullcontext():\n            if self._reference is None:",
      [EVAL_TESTS], "evaluation draws from the training run's random stream"),
    M("protocol_judge_not_copied", EVALUATION,
      "            self._judge = copy.deepcopy(self.oracle)", "            self._judge = self.oracle",
      [EVAL_TESTS + "::test_a_pairwise_oracle_judges_through_a_copy"], "a pairwise oracle's RNG is moved by evaluation"),
    M("protocol_resume_keeps_later_records", "bilevel_rlhf/eval_callback.py",
      "if r.step <= state.global_step]", "if r.step <= state.global_step + 10**9]",
      [EVAL_TESTS + "::test_callback_never_changes_training_and_resumes"], "a resumed run keeps records it will redo"),
    M("frontier_envelope_keeps_dominated", "bilevel_rlhf/frontier.py",
      "        if score[i] > best:", "        if score[i] > best or True:",
      [FRONTIER_TESTS], "the envelope keeps points beaten at a lower KL"),
    M("frontier_matched_kl_last_crossing", "bilevel_rlhf/frontier.py",
      "    j = int(above[0])\n    if j == 0:\n        return float(y[0])",
      "    j = int(above[-1])\n    if j == 0:\n        return float(y[0])",
      [FRONTIER_TESTS], "matched KL reads the last crossing, not the first"),
    M("completion_log_wrong_pair", "bilevel_rlhf/trainer.py",
      "else (lambda i: i // 2)", "else (lambda i: i)",
      [EVAL_TESTS + "::test_log_completions_writes_what_was_sampled_labelled_and_scored"],
      "a logged completion shows another pair's label"),
]

# ---------------------------------------------------------------------------------------------------- failing oracles
FAILURES = "tests/test_oracle_failures.py"
MASKED_LOSSES = FAILURES + "::test_losses_with_abstained_pairs_are_those_of_the_answered_pairs_alone"
MUTATIONS += [
    M("abstained_pairs_in_x_loss", OBJECTIVES,
      "    return objective.x_loss(pair_loss[answered], labels[answered])", "    return objective.x_loss(pair_loss, labels)",
      [MASKED_LOSSES], "x's loss includes the pairs the oracle did not answer"),
    M("abstained_pairs_in_covariance", TRAINER,
      "            g_a, r_a = g[rows], r_theta[rows]", "            g_a, r_a = g, r_theta",
      [MASKED_LOSSES], "the covariance x-gradient includes completions without an oracle term"),
    M("abstentions_not_counted", "bilevel_rlhf/oracle_calls.py",
      "abstained=0 if self.dropped else n - answered", "abstained=0",
      [FAILURES + "::test_fault_injection_run_finishes_and_counts_every_query"], "abstained pairs go uncounted"),
]
MUTATIONS += [
    M("eval_win_rate_counts_abstentions", "bilevel_rlhf/evaluation.py",
      "        wins = wins[~np.isnan(wins)]  # pairs the oracle abstained on\n", "",
      [EVAL_TESTS + "::test_a_judge_that_abstains_leaves_those_pairs_out_of_the_win_rate"],
      "the evaluation's win rate averages the judge's abstentions in"),
    M("fresh_reward_head_not_zeroed", "bilevel_rlhf/modeling.py",
      "                module.weight.zero_()", "                pass",
      ["tests/test_generic_recipe.py::test_a_fresh_reward_head_starts_at_zero_and_a_given_one_is_kept"],
      "reward_head_init='zero' leaves the recipe's new head random"),
]
