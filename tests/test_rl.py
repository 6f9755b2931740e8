"""RL: PPO/GAE arithmetic by hand, rewards and malformed-call policies, masking checked on gradients,
GRPO rollouts in TRL's format, and resumed runs that end where uninterrupted ones do."""

import json
import math
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from rl_agents import tracking
from rl_agents.ppo import (
    PPO,
    Batch,
    build_batch,
    kl_k3,
    kl_penalty,
    logprobs_from_logits,
    masked_gae,
    ppo_losses,
    token_logprobs,
    whiten,
)
from rl_agents.rl import reward_terms, sample_episodes, turn_rewards
from rl_agents.runtime import Runtime, RuntimeConfig
from rl_agents.train import run
from rl_agents.trajectory import Trajectory, Turn, encode_trajectory, prompt_ids

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def _cfg(policy_dir, run_dir, *overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(
            config_name="train",
            overrides=[
                "budget=smoke", "logger=none", "stages=[rl]", f"rl.init_from={policy_dir}",
                "runtime.max_new_tokens=48", *overrides,
            ],
        )  # fmt: skip


# --- arithmetic -----------------------------------------------------------------------------------
def test_masked_gae_matches_hand_computation_and_skips_observations():
    mask = torch.tensor([[1, 1, 0, 0, 1], [0, 1, 1, 0, 0]], dtype=torch.float)
    rewards = torch.tensor([[0.0, 0.5, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0, 0.0]])
    values = torch.tensor([[0.5, 0.6, 9.0, 9.0, 0.8], [7.0, 0.5, 0.5, 7.0, 7.0]])  # 9s and 7s are never read
    advantages, returns = masked_gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # row 0: A4 = 1 - .8 = .2; A1 = (.5 + .8 - .6) + .5 * .2 = .8 (bootstraps across the gap); A0 = (.6 - .5) + .5 * .8
    assert torch.allclose(advantages[0], torch.tensor([0.5, 0.8, 0.0, 0.0, 0.2]))
    assert torch.allclose(returns[0], torch.tensor([1.0, 1.4, 0.0, 0.0, 1.0]))
    assert torch.allclose(advantages[1], torch.tensor([0.0, 0.25, 0.5, 0.0, 0.0]))
    # lam = 1: the advantage is the discounted return minus the value; G0 = .9 * .5 + .81 * 1 = 1.26
    advantages, _ = masked_gae(rewards, values, mask, gamma=0.9, lam=1.0)
    assert torch.allclose(advantages[0, [0, 1, 4]], torch.tensor([1.26 - 0.5, 0.5 + 0.9 - 0.6, 0.2]))


def test_masked_gae_per_turn_discounts_between_turns_only():
    mask = torch.tensor([[1, 1, 0, 0, 1]], dtype=torch.float)  # two turns: steps 0-1 and step 4
    rewards = torch.tensor([[0.0, 0.5, 0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 9.0, 9.0, 0.8]])
    advantages, returns = masked_gae(rewards, values, mask, gamma=0.9, lam=0.5, per_turn=True)
    # A4 = 1 - .8 = .2; A1 (a turn's end) = .5 + .9 * .8 - .6 + .9 * .5 * .2 = .71; A0 (inside the turn,
    # no discount) = .6 - .5 + .71 = .81. Per token, A0 would be .9 * .6 - .5 + .45 * .71 = .3595.
    assert torch.allclose(advantages, torch.tensor([[0.81, 0.71, 0.0, 0.0, 0.2]]))
    assert torch.allclose(returns, torch.tensor([[1.31, 1.31, 0.0, 0.0, 1.0]]))
    per_token, _ = masked_gae(rewards, values, mask, gamma=0.9, lam=0.5)
    assert per_token[0, 0].item() == pytest.approx(0.3595)


def test_ppo_losses_clip_as_in_the_paper():
    old = torch.zeros(1, 4)
    logp = torch.tensor([[math.log(1.5), math.log(0.5), math.log(1.5), 5.0]])  # the last token is masked out
    advantages = torch.tensor([[1.0, 1.0, -1.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    values, old_values, returns = torch.tensor([[1.0] * 4]), torch.tensor([[0.5] * 4]), torch.zeros(1, 4)
    out = ppo_losses(logp, old, advantages, values, old_values, returns, mask, clip=0.2, value_clip=0.2)
    # per token: max(-A r, -A clip(r)) = -1.2 (r=1.5, A=1), -0.5 (r=0.5, A=1), 1.5 (r=1.5, A=-1)
    assert out["policy_loss"].item() == pytest.approx((-1.2 - 0.5 + 1.5) / 3, abs=1e-6)
    assert out["clip_fraction"].item() == pytest.approx(1.0)
    # value: max((1 - 0)^2, (0.5 + 0.2 - 0)^2) / 2
    assert out["value_loss"].item() == pytest.approx(0.5)
    assert out["value_clip_fraction"].item() == pytest.approx(1.0)
    # clip-higher: the upper bound 1.6 no longer clips r=1.5 with A=1 (-1.5); the lower bound 0.8 still clips 0.5
    out = ppo_losses(logp, old, advantages, values, old_values, returns, mask, 0.2, 0.2, clip_high=0.6)
    assert out["policy_loss"].item() == pytest.approx((-1.5 - 0.5 + 1.5) / 3, abs=1e-6)
    assert out["clip_fraction"].item() == pytest.approx(1 / 3)


def test_whiten_normalises_only_the_masked_entries():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, -50.0, 4.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    w = whiten(x, mask)
    kept = w[mask.bool()]
    assert kept.mean().abs() < 1e-6 and (kept.pow(2).mean() - 1).abs() < 1e-4
    assert torch.all(w[~mask.bool()] == 0)


# --- rewards and malformed calls ------------------------------------------------------------------
def _episode():
    turns = [
        Turn(agent="x", error="malformed_json"),
        Turn(agent="y", error="tool_error"),
        Turn(agent="<answer>1</answer>", reward=1.0),
    ]
    return Trajectory(task="t", turns=turns, reward=1.0, success=True, metadata={"truncation": None})


def test_reward_terms_and_their_placement_on_turns(tmp_path, tiny_policy):
    cfg = _cfg(tiny_policy[0], tmp_path, "rl.on_malformed=penalize", "rl.malformed_penalty=0.3",
               "rl.shaping.per_turn=-0.01", "rl.shaping.tool_error=-0.1")  # fmt: skip
    terms = reward_terms(_episode(), cfg.rl)
    assert terms == pytest.approx({"env": 1.0, "malformed": -0.3, "per_turn": -0.03, "tool_error": -0.1})
    per_turn = turn_rewards(_episode(), cfg.rl)
    assert per_turn == pytest.approx([-0.31, -0.11, 0.99])
    assert sum(per_turn) == pytest.approx(sum(terms.values()))
    assert reward_terms(_episode(), _cfg(tiny_policy[0], tmp_path).rl) == {"env": 1.0}  # feedback: no penalty
    discounted = reward_terms(_episode(), cfg.rl, gamma=0.5)  # turn t counts 0.5**t
    assert discounted == pytest.approx({"env": 0.25, "malformed": -0.3, "per_turn": -0.0175, "tool_error": -0.05})


def test_end_on_malformed_stops_the_episode_and_feedback_does_not(tiny_policy):
    _, model, tokenizer = tiny_policy
    kwargs = {"max_action_chars": 5}  # every turn is too long: a malformed turn
    config = RuntimeConfig(batch_size=4, max_new_tokens=48, max_turns=3)
    fed_back = Runtime(model, tokenizer, config).run("Calculator-v0", list(range(4)), kwargs)
    assert all(len(t.turns) == 3 and t.turns[0].error == "action_too_long" for t in fed_back)
    config.end_on_malformed = True
    ended = Runtime(model, tokenizer, config).run("Calculator-v0", list(range(4)), kwargs)
    assert all(len(t.turns) == 1 and t.metadata["truncation"] == "malformed" for t in ended)


# --- masking, checked on gradients ----------------------------------------------------------------
def test_ppo_loss_has_no_gradient_at_observation_or_prompt_tokens(tmp_path, tiny_policy):
    policy_dir, model, tokenizer = tiny_policy
    cfg = _cfg(policy_dir, tmp_path, "runtime.max_turns=4")
    episodes = sample_episodes(cfg, model, tokenizer, {"Calculator-v0": list(range(6))}, step=0)
    multi = [e for e in episodes if len(e.turns) >= 2]
    assert multi, "the fixture policy calls a tool, then answers"
    batch = build_batch(multi, tokenizer, cfg.rl)
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    logp, _ = logprobs_from_logits(out.logits, batch.input_ids, 1.0)
    noise = torch.randn_like(logp)
    losses = ppo_losses(logp, logp.detach() + 0.1 * noise, noise, noise, noise, noise, batch.action_mask, 0.2, 0.2)
    (grad,) = torch.autograd.grad(losses["policy_loss"], out.logits)
    per_position = grad[:, :-1].abs().sum(-1)  # position t predicts token t + 1
    actions = batch.action_mask.bool()
    assert torch.all(per_position[~actions] == 0)
    assert torch.all(per_position[actions] > 0)
    # the action mask is exactly the agent's tokens of each episode
    for row, episode in enumerate(multi):
        encoded = encode_trajectory(episode, tokenizer)
        assert batch.action_mask[row, : len(encoded.input_ids) - 1].tolist() == encoded.agent_mask[1:]


def test_ppo_turn_rewards_sit_on_the_last_token_of_each_turn(tmp_path, tiny_policy):
    policy_dir, model, tokenizer = tiny_policy
    cfg = _cfg(policy_dir, tmp_path, "rl.shaping.per_turn=-0.5")
    episodes = sample_episodes(cfg, model, tokenizer, {"Calculator-v0": list(range(4))}, step=0)
    batch = build_batch(episodes, tokenizer, cfg.rl)
    for row, episode in enumerate(episodes):
        placed = batch.rewards[row][batch.rewards[row] != 0].tolist()
        assert placed == pytest.approx(turn_rewards(episode, cfg.rl))
        ends = [i for i, m in enumerate(batch.action_mask[row].tolist()) if m and (i + 1 >= batch.rewards.shape[1]
                or batch.action_mask[row, i + 1] == 0)]  # fmt: skip
        assert torch.all(batch.rewards[row, ends] != 0)
    assert isinstance(batch[torch.tensor([0, 1])], Batch)


def test_ppo_policy_step_does_not_depend_on_the_value_loss(tmp_path, tiny_policy):
    """Policy and critic gradients are clipped apart: a huge value loss must not shrink the policy's step."""
    from rl_agents.ppo import PPO

    policy_dir = tiny_policy[0]
    after = []
    for vf_coef in (1.0, 1000.0):
        cfg = _cfg(policy_dir, tmp_path, "algo=ppo", "rl.steps=1", "algo.learning_rate=1e-3", "algo.warmup_steps=0",
                   "rl.shaping.per_turn=-0.1", "rl.temperature=1.5", f"algo.vf_coef={vf_coef}")  # fmt: skip
        ppo = PPO(cfg, policy_dir, policy_dir, tmp_path / f"vf{vf_coef}", tracking.Tracker())
        metrics = ppo.iteration()
        after.append({k: v.detach().clone() for k, v in ppo.policy.state_dict().items()})
        assert metrics["value_grad_norm"] > 0
    start = _weights(policy_dir)
    assert any(not torch.equal(after[0][k], start[k]) for k in start), "the step changed the policy"
    for key in start:
        assert torch.allclose(after[0][key], after[1][key], atol=1e-6), key


def test_ppo_critic_warmup_trains_the_critic_only_then_the_policy(tmp_path, tiny_policy):
    """Value pretraining: iterations before algo.critic_warmup_steps leave the policy exactly as it was."""
    from rl_agents.ppo import PPO

    policy_dir = tiny_policy[0]
    cfg = _cfg(policy_dir, tmp_path, "algo=ppo", "rl.steps=2", "algo.learning_rate=1e-3", "algo.warmup_steps=0",
               "rl.shaping.per_turn=-0.1", "rl.temperature=1.5", "algo.critic_warmup_steps=1",
               "algo.critic_lam=1.0")  # fmt: skip
    ppo = PPO(cfg, policy_dir, policy_dir, tmp_path / "rl", tracking.Tracker())
    start = _weights(policy_dir)
    critic_start = {k: v.detach().clone() for k, v in ppo.critic.state_dict().items()}
    warm = ppo.iteration()
    assert warm["learning_rate"] == 0.0 < warm["critic_learning_rate"]  # the policy's schedule has not started
    policy = ppo.policy.state_dict()
    assert all(torch.equal(policy[k], start[k]) for k in start), "the warm-up step changed the policy"
    assert any(not torch.equal(v, critic_start[k]) for k, v in ppo.critic.state_dict().items())
    ppo.iteration()
    policy = ppo.policy.state_dict()
    assert any(not torch.equal(policy[k], start[k]) for k in start), "the step after the warm-up left the policy"


def test_ppo_target_kl_stops_the_updates_once_the_policy_has_moved(tmp_path, tiny_policy):
    """algo.target_kl: the first update always runs; once the approximate KL to the rollout policy exceeds
    1.5 x target_kl the iteration's remaining minibatches are skipped. Without it every minibatch runs."""
    from rl_agents.ppo import PPO

    policy_dir = tiny_policy[0]
    common = ("algo=ppo", "rl.steps=1", "algo.learning_rate=1e-3", "algo.warmup_steps=0", "rl.episodes_per_step=4",
              "rl.minibatch_size=2", "algo.epochs=2", "algo.updates_per_batch=null", "rl.shaping.per_turn=-0.1",
              "rl.temperature=1.5")  # fmt: skip
    cfg = _cfg(policy_dir, tmp_path, *common, "algo.target_kl=null")
    full = PPO(cfg, policy_dir, policy_dir, tmp_path / "full", tracking.Tracker())
    assert full.iteration()["updates"] == 4  # 2 epochs x 2 minibatches
    cfg = _cfg(policy_dir, tmp_path, *common, "algo.target_kl=1e-9")
    stopped = PPO(cfg, policy_dir, policy_dir, tmp_path / "stopped", tracking.Tracker())
    start = _weights(policy_dir)
    metrics = stopped.iteration()
    assert metrics["updates"] == 1
    assert abs(metrics["approx_kl"]) < 1e-5  # measured before the one update, on the unchanged policy
    policy = stopped.policy.state_dict()
    assert any(not torch.equal(policy[k], start[k]) for k in start), "the first update must run"


def test_ppo_updates_per_batch_accumulates_minibatches_into_the_update_one_big_minibatch_makes(tmp_path, tiny_policy):
    """algo.updates_per_batch=k: k updates per epoch, each on an equal slice of the step's episodes, its gradient
    accumulated over forward passes of rl.minibatch_size episodes weighted by their action tokens: the gradient of
    one forward pass over the slice."""
    from rl_agents.ppo import PPO

    policy_dir = tiny_policy[0]
    common = ("algo=ppo", "rl.steps=1", "algo.learning_rate=1e-3", "algo.warmup_steps=0", "rl.episodes_per_step=4",
              "algo.epochs=1", "algo.target_kl=null", "rl.shaping.per_turn=-0.1", "rl.temperature=1.5")  # fmt: skip
    grads, counts = [], []
    for name, extra in (("one_pass", ["rl.minibatch_size=4"]),
                        ("accumulated", ["rl.minibatch_size=1", "algo.updates_per_batch=1"])):  # fmt: skip
        cfg = _cfg(policy_dir, tmp_path, *common, *extra)
        ppo = PPO(cfg, policy_dir, policy_dir, tmp_path / name, tracking.Tracker())
        seen, step, params = [], ppo.optimizer.step, list(ppo.policy.parameters())
        ppo.optimizer.step = lambda *a, seen=seen, step=step, params=params, **k: (
            seen.append([p.grad.clone() for p in params if p.grad is not None]),
            step(*a, **k),
        )[1]
        counts.append(ppo.iteration()["updates"])
        grads.append(seen)
    assert counts == [1, 1] and len(grads[0]) == len(grads[1]) == 1
    one, accumulated = grads[0][0], grads[1][0]
    assert len(one) == len(accumulated) and any(g.abs().max() > 0 for g in one)
    for a, b in zip(one, accumulated, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-8)
    # two updates of two episodes each, per epoch
    cfg = _cfg(policy_dir, tmp_path, *common, "rl.minibatch_size=1", "algo.updates_per_batch=2", "algo.epochs=2")
    assert PPO(cfg, policy_dir, policy_dir, tmp_path / "two", tracking.Tracker()).iteration()["updates"] == 4


def test_ppo_positive_lm_loss_imitates_the_successful_episodes_only(tmp_path, tiny_policy, monkeypatch):
    """algo.positive_lm_coef adds the mean NLL of the successful episodes' action tokens (VAPO): the logged term
    is that NLL under the rollout policy, and one update with it lowers it further than the PPO loss alone."""
    import rl_agents.ppo as ppo_module
    from rl_agents.ppo import PPO, masked_mean, token_logprobs

    sample = ppo_module.sample_episodes

    def half_successful(*args, **kwargs):  # the tiny policy rarely succeeds: mark every other episode
        episodes = sample(*args, **kwargs)
        for i, episode in enumerate(episodes):
            episode.success = i % 2 == 0
        return episodes

    monkeypatch.setattr(ppo_module, "sample_episodes", half_successful)
    policy_dir = tiny_policy[0]
    nll = {}
    for coef in (0.0, 10.0):
        cfg = _cfg(policy_dir, tmp_path, "algo=ppo", "rl.steps=1", "algo.learning_rate=1e-4", "algo.warmup_steps=0",
                   "algo.epochs=1", "rl.minibatch_size=8", "rl.temperature=1.5",
                   f"algo.positive_lm_coef={coef}")  # fmt: skip
        ppo = PPO(cfg, policy_dir, policy_dir, tmp_path / f"coef{coef}", tracking.Tracker())
        metrics = ppo.iteration()
        batch = build_batch(ppo.last_episodes, ppo.tokenizer, cfg.rl)
        positive = torch.tensor([float(e.success) for e in ppo.last_episodes])[:, None] * batch.action_mask
        assert 0 < positive.sum() < batch.action_mask.sum()
        with torch.no_grad():
            before = masked_mean(-token_logprobs(tiny_policy[1].eval(), batch, 1.5)[0], positive)
            nll[coef] = masked_mean(-token_logprobs(ppo.policy, batch, 1.5)[0], positive)
        assert metrics["positive_nll"] == pytest.approx(float(before), rel=1e-4)
    assert nll[10.0] < nll[0.0]


def test_ppo_decoupled_lambda_gives_the_critic_monte_carlo_returns():
    """critic_lam=1: the value targets are the returns-to-go whatever the values; the advantages keep lam."""
    from omegaconf import OmegaConf

    from rl_agents.config import PPOAlgoConfig
    from rl_agents.ppo import advantages_and_returns

    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0]])
    rewards = torch.tensor([[0.0, 0.5, 0.0, 1.0]])
    values = torch.tensor([[0.3, 0.9, 5.0, 0.1]])  # 5.0 sits on an observation token and is never read
    algo = OmegaConf.structured(PPOAlgoConfig(lam=0.0, critic_lam=1.0, gae_level="token", normalize_advantages=False))
    advantages, returns = advantages_and_returns(rewards, values, mask, algo)
    assert torch.allclose(returns, torch.tensor([[1.5, 1.5, 0.0, 1.0]]))
    # lam=0: one-step advantages r + V(next) - V: 0 + .9 - .3, .5 + .1 - .9, 1 - .1
    assert torch.allclose(advantages, torch.tensor([[0.6, -0.3, 0.0, 0.9]]))
    algo.critic_lam = None  # coupled: the targets are the one-step ones, which carry the critic's own values
    _, coupled = advantages_and_returns(rewards, values, mask, algo)
    assert torch.allclose(coupled, torch.tensor([[0.9, 0.6, 0.0, 1.0]]))


def test_grpo_rollouts_return_trl_fields_with_env_mask_and_sampling_logprobs(tmp_path, tiny_policy):
    from rl_agents.grpo import make_trainer

    policy_dir, _, tokenizer = tiny_policy
    cfg = _cfg(policy_dir, tmp_path, "algo=grpo", "algo.group_size=2", "rl.episodes_per_step=4", "rl.minibatch_size=2",
               "algo.gamma=0.5", "rl.shaping.per_turn=-0.1")  # fmt: skip
    trainer = make_trainer(cfg, policy_dir, policy_dir, tmp_path / "rl", tracking.Tracker())
    prompts = ["Calculator-v0#11", "Calculator-v0#11", "Calculator-v0#12", "Calculator-v0#12"]
    out = trainer.rollout_func(prompts, trainer)
    assert len(out["completion_ids"]) == 4
    discounted = 0
    for i, episode in enumerate(out["episode"]):
        assert episode.metadata["seed"] == int(prompts[i].split("#")[1])
        assert out["prompt_ids"][i] == prompt_ids(tokenizer, episode.task)
        encoded = encode_trajectory(episode, tokenizer)
        assert out["prompt_ids"][i] + out["completion_ids"][i] == encoded.input_ids
        assert out["env_mask"][i] == encoded.agent_mask[len(out["prompt_ids"][i]) :]
        # the sampling log-probabilities TRL gets are the model's own, scored again over the whole sequence
        agent_lps = torch.tensor([lp for lp, m in zip(out["logprobs"][i], out["env_mask"][i]) if m])
        ids = torch.tensor([encoded.input_ids])
        with torch.no_grad():
            logits = trainer.model(input_ids=ids).logits
        scored, _ = logprobs_from_logits(logits, ids, cfg.rl.temperature)
        agent = torch.tensor(encoded.agent_mask[1:], dtype=torch.bool)
        assert torch.allclose(scored[0][agent], agent_lps, atol=1e-4)
        # and the reward is what the environment pays for those turns, replayed on a fresh one, turn t at 0.5**t
        replay = gym.make("Calculator-v0", split="train")
        replay.reset(seed=episode.metadata["seed"])
        paid = [replay.step(turn.agent)[1] for turn in episode.turns]
        assert out["r_env"][i] == sum(0.5**t * r for t, r in enumerate(paid))
        assert out["r_per_turn"][i] == pytest.approx(-0.1 * sum(0.5**t for t in range(len(paid))))
        discounted += len(paid) > 1
    assert discounted  # episodes of several turns, whose later turns count less

    # TRL's loss on these episodes: no gradient at positions that predict an observation token
    inputs = trainer._generate_and_score_completions([{"prompt": p} for p in prompts])
    hidden = {}

    def keep(module, args, output):
        output.retain_grad()
        hidden["h"] = output

    handle = trainer.model.model.norm.register_forward_hook(keep)
    inputs["advantages"] = torch.tensor([1.0, -1.0, 0.5, -0.5])
    trainer._compute_loss(trainer.model, inputs).backward()
    handle.remove()
    grad = hidden["h"].grad.abs().sum(-1)  # (B, P + C): position t predicts token t + 1
    P = inputs["prompt_ids"].shape[1]
    predicts = grad[:, P - 1 : -1]  # the positions predicting completion tokens
    env = inputs["tool_mask"].bool() & inputs["completion_mask"].bool()
    assert torch.all(predicts[~env] == 0)
    assert torch.all(predicts[env] > 0)


def test_grpo_splits_a_generation_batch_into_updates_per_batch_updates(tmp_path, tiny_policy):
    """Four optimizer updates at two per batch: two generation batches, sampled at updates 0 and 2, each split
    into two updates of half its episodes (its advantages computed once, over the whole batch)."""
    policy_dir = tiny_policy[0]
    run_dir = tmp_path / "run"
    run(_cfg(policy_dir, run_dir, "algo=grpo", "algo.group_size=2", "algo.updates_per_batch=2", "rl.steps=4",
             "rl.save_steps=2", "rl.episodes_per_step=4", "rl.minibatch_size=2", "rl.shaping.per_turn=-0.1",
             "rl.temperature=1.5", "algo.learning_rate=1e-3"), run_dir)  # fmt: skip
    rollouts = [json.loads(line) for line in (run_dir / "rl" / "rollouts" / "rank0.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rollouts] == [0] * 4 + [2] * 4
    history = [json.loads(line) for line in (run_dir / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4]
    a, start = _weights(run_dir / "rl" / "policy"), _weights(policy_dir)
    assert any(not torch.equal(a[k], start[k]) for k in a), "training changed the policy"


# --- the KL to the reference ---------------------------------------------------------------------
def _expected_gradient(loss_of, theta: torch.Tensor) -> torch.Tensor:
    """The exact expected gradient of a per-sample loss over samples of softmax(theta), the sampling
    distribution held fixed (it is the rollout policy, pi_old = pi_theta at the point of evaluation)."""
    logp = torch.log_softmax(theta, -1)
    old = logp.detach()
    expected = (old.exp() * loss_of(logp, old)).sum()
    (grad,) = torch.autograd.grad(expected, theta)
    return grad


def test_the_loss_kl_term_has_the_gradient_of_kl_policy_to_reference():
    torch.manual_seed(0)
    theta = torch.randn(6, dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(torch.randn(6, dtype=torch.float64), -1)

    def kl(p_logits, q_logp):
        p_logp = torch.log_softmax(p_logits, -1)
        return (p_logp.exp() * (p_logp - q_logp)).sum()

    (forward_kl,) = torch.autograd.grad(kl(theta, ref), theta)  # KL(policy || reference), exactly
    reverse = torch.autograd.grad((ref.exp() * (ref - torch.log_softmax(theta, -1))).sum(), theta)[
        0
    ]  # KL(reference || policy)
    ours = _expected_gradient(lambda logp, old: kl_penalty(logp, old, ref), theta)
    assert torch.allclose(ours, forward_kl, atol=1e-12)
    # k3 alone, as the loss used it before: the other KL's gradient (what this test exists to catch)
    plain = _expected_gradient(lambda logp, old: kl_k3(logp, ref), theta)
    assert torch.allclose(plain, reverse, atol=1e-12) and not torch.allclose(plain, forward_kl, atol=1e-3)
    # the value is unchanged: at pi = pi_old the expected penalty is the KL itself
    logp = torch.log_softmax(theta, -1).detach()
    assert torch.isclose((logp.exp() * kl_penalty(logp, logp, ref)).sum(), kl(theta, ref).detach())


def test_ppo_reference_runs_in_the_policys_mixed_precision_so_identical_weights_give_zero_kl(
    tmp_path, tiny_policy, fresh_accelerate_state
):
    policy_dir, model, tokenizer = tiny_policy
    cfg = _cfg(policy_dir, tmp_path, "algo=ppo", "rl.mixed_precision=bf16", "runtime.max_turns=3")
    ppo = PPO(cfg, policy_dir, policy_dir, tmp_path / "rl", tracking.Tracker())
    assert ppo.accelerator.mixed_precision == "bf16"
    episodes = sample_episodes(cfg, model, tokenizer, {"Calculator-v0": list(range(4))}, step=0)
    batch = build_batch(episodes, tokenizer, cfg.rl)
    old = ppo.score(batch)
    mask = batch.action_mask.bool()
    assert torch.all(old["logp"][mask] == old["ref_logp"][mask])  # exactly: the KL is 0
    # the reference outside autocast (as before) is another computation: the check above can fail
    with torch.no_grad():
        full = token_logprobs(ppo.reference, batch, cfg.rl.temperature)[0]
    assert (full[mask] - old["logp"][mask]).abs().max() > 1e-4


def test_grpo_processes_sample_distinct_episodes_for_the_same_prompts(tmp_path, tiny_policy, monkeypatch):
    """A group split over two processes: each process's episodes come from its own streams (before, both ranks
    drew the same tokens for the same prompt)."""
    from accelerate import Accelerator

    from rl_agents.grpo import make_trainer

    policy_dir, _, _ = tiny_policy
    cfg = _cfg(policy_dir, tmp_path, "algo=grpo", "algo.group_size=4", "rl.episodes_per_step=8",
               "rl.minibatch_size=2", "rl.temperature=1.5")  # fmt: skip
    trainer = make_trainer(cfg, policy_dir, policy_dir, tmp_path / "rl", tracking.Tracker())
    prompts = ["Calculator-v0#11", "Calculator-v0#11", "Calculator-v0#12", "Calculator-v0#12"]
    ranks = []
    for rank in (0, 1):
        monkeypatch.setattr(Accelerator, "process_index", property(lambda self, r=rank: r))
        out = trainer.rollout_func(prompts, trainer)
        ranks.append([tuple(ids) for ids in out["completion_ids"]])
    assert len(set(ranks[0]) | set(ranks[1])) == 2 * len(prompts)  # eight distinct episodes
    monkeypatch.setattr(Accelerator, "process_index", property(lambda self: 0))
    assert [tuple(ids) for ids in trainer.rollout_func(prompts, trainer)["completion_ids"]] == ranks[0]


# --- resume ---------------------------------------------------------------------------------------
def _weights(policy):
    return load_file(str(Path(policy) / "model.safetensors"))


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path, tiny_policy, monkeypatch, algo):
    policy_dir = tiny_policy[0]
    extra = [f"algo={algo}", "rl.steps=3", "rl.save_steps=1", "rl.episodes_per_step=4", "rl.minibatch_size=2",
             "algo.learning_rate=1e-3", "rl.shaping.per_turn=-0.1", "rl.temperature=1.5",
             "rl.logging_steps=1"]  # fmt: skip
    extra += ["algo.group_size=2"] if algo == "grpo" else []  # per_turn: rewards differ within a group
    whole = tmp_path / "whole"
    run(_cfg(policy_dir, whole, *extra), whole)

    killed = tmp_path / "killed"
    if algo == "ppo":
        from rl_agents.ppo import PPO

        original = PPO.save_checkpoint

        def save_then_die(self):
            original(self)
            if self.step == 2:
                raise KeyboardInterrupt("killed after the step-2 checkpoint")

        monkeypatch.setattr(PPO, "save_checkpoint", save_then_die)
    else:
        from rl_agents.grpo import EnvRollouts

        original = EnvRollouts.__call__

        def die_at_step_2(self, prompts, trainer):
            if trainer.state.global_step == 2:
                raise KeyboardInterrupt("killed after the step-2 checkpoint")
            return original(self, prompts, trainer)

        monkeypatch.setattr(EnvRollouts, "__call__", die_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        run(_cfg(policy_dir, killed, *extra), killed)
    monkeypatch.undo()
    assert not (killed / "rl" / "policy").exists()
    # the step-2 checkpoint as a kill during its save leaves it: the resume starts from step 1 and redoes step 2
    last = "step-000002/ppo_state.json" if algo == "ppo" else "checkpoint-2/trainer_state.json"
    (killed / "rl" / "checkpoints" / last).unlink()
    run(_cfg(policy_dir, killed, *extra, "resume=true"), killed)

    a, b = _weights(whole / "rl" / "policy"), _weights(killed / "rl" / "policy")
    start = _weights(policy_dir)
    assert any(not torch.equal(a[k], start[k]) for k in a), "training changed the policy"
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    # the reward curve and the rollout log: every step once, as in the uninterrupted run
    history = [json.loads(line) for line in (killed / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if "loss" in h or algo == "ppo"] == [1, 2, 3]
    rollouts = [
        json.loads(line)["step"] for line in (killed / "rl" / "rollouts" / "rank0.jsonl").read_text().splitlines()
    ]
    assert rollouts == sorted(rollouts) and len(rollouts) == 3 * 4


def test_split_by_weight_sums_to_n_and_follows_the_weights():
    from collections import Counter

    from rl_agents.rl import split_by_weight

    weights = {"a": 1.0, "b": 1.0, "c": 2.0}
    for seed in range(20):
        assert split_by_weight(8, weights, np.random.default_rng(seed)) == {"a": 2, "b": 2, "c": 4}
        counts = split_by_weight(7, weights, np.random.default_rng(seed))
        assert sum(counts.values()) == 7 and counts["c"] in (3, 4) and {counts["a"], counts["b"]} <= {1, 2}
    totals = Counter()
    for step in range(300):  # fewer items than environments: which ones get an item is drawn per step
        counts = split_by_weight(2, {**weights, "d": 2.0}, np.random.default_rng(step))
        assert sum(counts.values()) == 2 and max(counts.values()) <= 1
        totals.update(counts)
    assert totals["c"] > 1.5 * totals["a"] and min(totals.values()) > 0
