"""Token-level PPO for multi-turn tool episodes, on the project's runtime (TRL no longer ships a PPO trainer).

One iteration (``rl.steps`` of them):

1. sample ``rl.episodes_per_step`` episodes with the runtime (``rl.sample_episodes``);
2. flatten each into its token sequence (``trajectory.encode_trajectory``): the agent's tokens are the
   actions; the prompt and the observations are context only;
3. score the actions with the policy (old log-probabilities), the frozen reference and the critic (values);
4. rewards: each turn's reward (``rl.turn_rewards``) on the turn's last token and, with ``algo.kl_in=reward``,
   ``-beta * (logp - ref_logp)`` on every action token;
5. GAE over the action tokens only: observation tokens are skipped, so the value of the first token of turn
   k+1 bootstraps the last token of turn k and credit flows across turns. The critic's targets may use their
   own lambda (``algo.critic_lam``; 1.0 regresses on the returns, VC-PPO's decoupled GAE), and with
   ``algo.gae_level=turn`` gamma and lambda apply once per turn instead of once per token;
6. ``algo.epochs`` passes of minibatch updates: clipped policy loss, clipped value loss, an optional entropy
   bonus and, with ``algo.kl_in=loss``, ``beta * KL`` in the loss (``kl_penalty``: k3 times the importance
   ratio to the rollout policy, so that its gradient is KL(policy || reference)'s); the policy's and the
   critic's gradients are clipped to ``algo.max_grad_norm`` apart. The first ``algo.critic_warmup_steps``
   iterations update the critic only (value pretraining), so the policy's first advantages come from a
   critic that has seen its returns. With ``algo.target_kl``, an iteration's updates stop at the first
   minibatch whose approximate KL to the rollout policy exceeds 1.5 x target_kl. Two options of VAPO
   (Yue et al. 2025), PPO's recipe for long reasoning: ``algo.clip_high`` (DAPO's clip-higher) and
   ``algo.positive_lm_coef`` (an LM loss on the successful episodes' actions).

Tensors over a sequence are *action-aligned*: index t concerns token t+1 (the logits at t predict it, and the
critic's value at t is the value of the state before it). The critic is a copy of the policy's transformer
with a scalar head (zero-initialised). Accelerate places the models and saves checkpoints (models, optimizer,
scheduler, RNG); each iteration's episodes and minibatch order derive from ``(seed, step)``, so a resumed run
continues exactly as an uninterrupted one.

Departures from PPO as published (Schulman et al. 2017) and from CleanRL's ``ppo.py``:

1. Actions are tokens of multi-turn episodes; observation tokens are context, and GAE skips them.
2. A KL penalty to a frozen reference (the BC policy), in the loss by default, as k3 x the importance ratio.
3. The critic's targets use their own lambda (1.0: VC-PPO's decoupled GAE), and gamma and lambda may apply
   per turn (``algo.gae_level=turn``, the default).
4. The critic is a copy of the policy's transformer with a zero-initialised scalar head, and the policy's and
   the critic's gradients are clipped apart.
5. Early stopping at ``algo.target_kl`` (Stable-Baselines3's rule), and VAPO's optional clip-higher and
   positive-example LM loss.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from omegaconf import DictConfig
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from transformers import AutoModel, PreTrainedTokenizerBase, get_scheduler
from trl.trainer.utils import disable_dropout_in_model, entropy_from_logits, selective_log_softmax

from rl_agents import rundir
from rl_agents.model import load_policy
from rl_agents.rl import (
    append_rollouts,
    episode_metrics,
    mixed_precision,
    rl_lora,
    sample_episodes,
    save_rl_policy,
    step_seeds,
    turn_rewards,
)
from rl_agents.trajectory import Trajectory, encode_trajectory

log = logging.getLogger(__name__)


class Critic(nn.Module):
    """A value model: a transformer body (initialised from the policy) and a scalar head."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body
        self.head = nn.Linear(body.config.hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_policy(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> Critic:
        return cls(AutoModel.from_pretrained(path, dtype=dtype, local_files_only=True))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(hidden).squeeze(-1).float()


@dataclass
class Batch:
    """Episodes as right-padded token tensors; the last three are action-aligned (length T-1)."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    action_mask: torch.Tensor  # (B, T-1) 1.0 where token t+1 is the agent's
    rewards: torch.Tensor  # (B, T-1) each turn's reward on the turn's last token

    def select(self, rows, trim: bool = True) -> Batch:
        """The episodes ``rows``; ``trim`` drops the columns that are padding in every one of them."""
        ids, attn = self.input_ids[rows], self.attention_mask[rows]
        width = int(attn.sum(-1).max()) if trim else ids.shape[1]
        return Batch(
            ids[:, :width], attn[:, :width], self.action_mask[rows, : width - 1], self.rewards[rows, : width - 1]
        )

    __getitem__ = select

    def to(self, device) -> Batch:
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.action_mask, self.rewards)))


def build_batch(episodes: list[Trajectory], tokenizer: PreTrainedTokenizerBase, rl: DictConfig) -> Batch:
    """Flatten episodes into a batch; each turn's reward sits on the last token of the turn."""
    rows = []
    for episode in episodes:
        encoded = encode_trajectory(episode, tokenizer)
        ids, mask = encoded.input_ids, encoded.agent_mask
        ends = [i for i in range(len(ids)) if mask[i] and (i + 1 == len(ids) or not mask[i + 1])]
        rewards = turn_rewards(episode, rl)
        if len(ends) != len(rewards):
            raise RuntimeError(
                f"episode seed {episode.metadata.get('seed')}: {len(ends)} agent spans, {len(rewards)} turns"
            )
        token_rewards = [0.0] * len(ids)
        for i, r in zip(ends, rewards):
            token_rewards[i] = r
        rows.append((ids, mask, token_rewards))
    width = max(len(ids) for ids, _, _ in rows)
    B = len(rows)
    input_ids = torch.full((B, width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros((B, width), dtype=torch.long)
    agent = torch.zeros((B, width))
    rewards = torch.zeros((B, width))
    for b, (ids, mask, token_rewards) in enumerate(rows):
        n = len(ids)
        input_ids[b, :n] = torch.tensor(ids)
        attention[b, :n] = 1
        agent[b, :n] = torch.tensor(mask, dtype=torch.float)
        rewards[b, :n] = torch.tensor(token_rewards)
    return Batch(input_ids, attention, agent[:, 1:], rewards[:, 1:])


# --- the arithmetic -----------------------------------------------------------------------------
def logprobs_from_logits(
    logits: torch.Tensor, input_ids: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Action-aligned log-probabilities of the sequence's own tokens, and the entropies, at ``temperature``."""
    logits = logits[:, :-1].float() / temperature
    return selective_log_softmax(logits, input_ids[:, 1:]), entropy_from_logits(logits)


def token_logprobs(model, batch: Batch, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return logprobs_from_logits(logits, batch.input_ids, temperature)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Normalise the masked entries to mean 0, std 1 (the masked-out entries become 0)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def masked_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float, per_turn: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the masked steps of each row; unmasked steps are skipped.

    A row's masked steps form one episode: the step after a masked step is the next masked step (across any
    unmasked gap: an observation between two turns), and the episode ends after the last one (value 0).
    Rewards must sit on masked steps. ``per_turn``: ``gamma`` and ``lam`` apply once per turn (a turn is a run
    of masked steps), between its last step and the next turn's first, and not between the tokens of a turn,
    so credit decays with the turns an action is from its reward, not with the tokens. Returns (advantages,
    returns), both 0 where the mask is 0.
    """
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    running = torch.zeros_like(values[:, 0])
    ends = mask.bool() & ~torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], 1).bool()  # a turn's last step
    for t in reversed(range(values.shape[1])):
        step = mask[:, t].bool()
        g, gl = gamma, gamma * lam
        if per_turn:
            g = torch.where(ends[:, t], gamma, 1.0)
            gl = torch.where(ends[:, t], gamma * lam, 1.0)
        delta = rewards[:, t] + g * next_value - values[:, t]
        gae = delta + gl * running
        advantages[:, t] = torch.where(step, gae, 0.0)
        running = torch.where(step, gae, running)
        next_value = torch.where(step, values[:, t], next_value)
    return advantages, (advantages + values) * mask


def advantages_and_returns(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, algo: DictConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy's advantages (GAE at ``algo.lam``, whitened if asked) and the critic's targets (GAE returns at
    ``algo.critic_lam``, default ``algo.lam``)."""
    per_turn = algo.gae_level == "turn"
    advantages, returns = masked_gae(rewards, values, mask, algo.gamma, algo.lam, per_turn)
    if algo.critic_lam is not None and algo.critic_lam != algo.lam:  # decoupled GAE: the critic's own targets
        returns = masked_gae(rewards, values, mask, algo.gamma, algo.critic_lam, per_turn)[1]
    if algo.normalize_advantages:
        advantages = whiten(advantages, mask)
    return advantages, returns


def explained_variance(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    var = masked_mean((target - masked_mean(target, mask)) ** 2, mask)
    residual = target - predicted
    return float(1.0 - masked_mean((residual - masked_mean(residual, mask)) ** 2, mask) / var.clamp(min=1e-8))


def ppo_losses(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
    value_clip: float,
    clip_high: float | None = None,
) -> dict[str, torch.Tensor]:
    """The clipped policy loss, the clipped value loss and their diagnostics, averaged over the masked tokens.

    The ratio is clipped to [1 - clip, 1 + clip_high] (``clip_high`` None: ``clip``; a larger one is DAPO's
    clip-higher, which leaves rare tokens with a positive advantage room to grow)."""
    high = clip if clip_high is None else clip_high
    ratio = torch.exp(logp - old_logp)
    pg = torch.max(-advantages * ratio, -advantages * ratio.clamp(1.0 - clip, 1.0 + high))
    clipped_values = old_values + (values - old_values).clamp(-value_clip, value_clip)
    vf = 0.5 * torch.max((values - returns) ** 2, (clipped_values - returns) ** 2)
    return {
        "policy_loss": masked_mean(pg, mask),
        "value_loss": masked_mean(vf, mask),
        "clip_fraction": masked_mean(((ratio < 1.0 - clip) | (ratio > 1.0 + high)).float(), mask),
        "value_clip_fraction": masked_mean(((values - old_values).abs() > value_clip).float(), mask),
        "approx_kl": masked_mean((ratio - 1.0) - (logp - old_logp), mask),  # k3 estimate of KL(old || new)
    }


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(policy || reference), the non-negative k3 estimator on samples of the policy (its value;
    differentiated as it stands, its expected gradient is KL(reference || policy)'s: use ``kl_penalty``)."""
    return torch.exp(ref_logp - logp) - (ref_logp - logp) - 1.0


def kl_penalty(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """The per-token KL term of the loss: k3 weighted by the importance ratio pi / pi_old.

    On tokens sampled from pi_old, the expected gradient of k3 alone is ``(1 - ref / pi) grad log pi``, whose
    expectation is the gradient of KL(reference || policy). With the ratio (which is 1 at pi = pi_old, with a
    gradient) it becomes ``(log pi - log ref) grad log pi``: the gradient of KL(policy || reference), the KL
    the penalty documents (TRL's GRPO does the same: ``use_bias_correction_kl``)."""
    return torch.exp(logp - old_logp) * kl_k3(logp, ref_logp)


# --- the loop -----------------------------------------------------------------------------------
class PPO:
    def __init__(self, cfg: DictConfig, init: Path, ref: Path, out_dir: Path, tracker):
        self.cfg, self.algo, self.rl = cfg, cfg.algo, cfg.rl
        self.out_dir, self.tracker = Path(out_dir), tracker
        cuda = torch.cuda.is_available()
        self.accelerator = Accelerator(cpu=not cuda, mixed_precision=mixed_precision(self.rl.mixed_precision))
        dtype = getattr(torch, cfg.model.dtype)
        policy, self.tokenizer = load_policy(init, cfg.model.dtype, local_files_only=True)
        critic = Critic.from_policy(init, dtype)
        lora = rl_lora(cfg)
        if lora is None:
            reference, _ = load_policy(ref, cfg.model.dtype, local_files_only=True)
            self.reference = reference.eval().requires_grad_(False).to(self.accelerator.device)
        else:  # the reference is the policy with its adapter disabled: no second copy of its weights
            from peft import get_peft_model

            policy = get_peft_model(policy, lora)
            critic.body = get_peft_model(critic.body, replace(rl_lora(cfg), task_type=None))  # peft edits its config
            self.reference = None
        for model in (policy, critic, self.reference):
            if model is not None:
                disable_dropout_in_model(model)
        algo = self.algo
        optimizer = torch.optim.AdamW(
            [
                {"params": [p for p in policy.parameters() if p.requires_grad], "lr": algo.learning_rate},
                {"params": [p for p in critic.parameters() if p.requires_grad], "lr": algo.critic_learning_rate},
            ],
            weight_decay=algo.weight_decay,
        )
        # one schedule per group: the critic's from the first iteration, the policy's from its first update (after
        # the critic's warm-up), so the policy too warms its learning rate up from 0
        warm = algo.critic_warmup_steps
        policy_factor, critic_factor = (
            get_scheduler(
                algo.lr_scheduler_type, optimizer, num_warmup_steps=algo.warmup_steps, num_training_steps=steps
            ).lr_lambdas[0]
            for steps in (self.rl.steps - warm, self.rl.steps)
        )
        scheduler = LambdaLR(optimizer, [lambda s: 0.0 if s < warm else policy_factor(s - warm), critic_factor])
        self.policy, self.critic, self.optimizer, self.scheduler = self.accelerator.prepare(
            policy, critic, optimizer, scheduler
        )
        self.step = 0

    # --- checkpoints ------------------------------------------------------------------------
    @property
    def checkpoints(self) -> Path:
        return self.out_dir / "checkpoints"

    def save_checkpoint(self) -> None:
        """Models, optimizer, scheduler, RNG and step; ``ppo_state.json``, written last, makes it complete."""
        path = self.checkpoints / f"step-{self.step:06d}"
        models = self.accelerator.unwrap_model(self.policy), self.accelerator.unwrap_model(self.critic)
        rundir.check_free_space(self.checkpoints, sum(rundir.checkpoint_bytes(m) for m in models))
        with rundir.disk_full_reported(path):
            self.accelerator.save_state(str(path), safe_serialization=False)  # tied embeddings: torch format
            rundir.write_text(path / "ppo_state.json", json.dumps({"step": self.step}))
        for old in rundir.complete_checkpoints(self.checkpoints)[: -self.rl.save_total_limit]:
            shutil.rmtree(old)
        log.info("rl: checkpoint %s", path)
        rundir.kill_point(f"rl.checkpoint-{self.step}")

    def resume(self) -> bool:
        """Load the last complete checkpoint (models, optimizer, scheduler, RNG, step); False if there is none."""
        last = rundir.last_checkpoint(self.checkpoints)
        if last is None:
            return False
        self.accelerator.load_state(last)
        self.step = json.loads((Path(last) / "ppo_state.json").read_text())["step"]
        log.info("rl: resumed from %s (step %d)", last, self.step)
        return True

    # --- one iteration: phases 1-5 below, in run order ---------------------------------------
    # 2. score: old and reference log-probabilities and values of the actions, in minibatches
    @torch.no_grad()
    def score(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Old log-probabilities, reference log-probabilities and values of a batch, in minibatches."""
        parts = {"logp": [], "ref_logp": [], "values": []}
        n, size = batch.input_ids.shape[0], self.rl.minibatch_size
        for i in range(0, n, size):
            rows = slice(i, i + size)
            mb = batch.select(rows, trim=False)  # the parts are concatenated: every one keeps the batch's width
            parts["logp"].append(token_logprobs(self.policy, mb, self.rl.temperature)[0])
            with self.accelerator.autocast(), self.reference_model() as reference:  # the policy's precision (bf16)
                parts["ref_logp"].append(token_logprobs(reference, mb, self.rl.temperature)[0])
            parts["values"].append(self.critic(mb.input_ids, mb.attention_mask)[:, :-1])
        return {k: torch.cat(v) for k, v in parts.items()}

    @contextlib.contextmanager
    def reference_model(self):
        """The frozen reference: its own model, or (LoRA) the policy with the adapter disabled."""
        if self.reference is not None:
            yield self.reference
            return
        with self.accelerator.unwrap_model(self.policy).disable_adapter():
            yield self.policy

    def iteration(self) -> dict[str, float]:
        """One PPO iteration, in the order it runs: rollout, score, advantages, update, metrics."""
        start = time.perf_counter()
        episodes, batch = self.rollout()
        rollout_s = time.perf_counter() - start
        old = self.score(batch)
        kl, advantages, returns = self.advantages(batch, old)
        stats, updates, learning_rates = self.update(batch, old, advantages, returns, episodes)
        metrics = self.metrics(episodes, batch, old, kl, returns, stats, updates, learning_rates)
        metrics.update(rollout_s=rollout_s, step_s=time.perf_counter() - start)
        self.last_episodes = episodes
        return metrics

    # 1. rollout: this step's episodes, sampled by the runtime, flattened into action-aligned tensors
    def rollout(self) -> tuple[list[Trajectory], Batch]:
        acc = self.accelerator
        seeds = step_seeds(self.cfg, self.step, self.rl.episodes_per_step)
        episodes = sample_episodes(self.cfg, acc.unwrap_model(self.policy), self.tokenizer, seeds, self.step)
        append_rollouts(self.out_dir / "rollouts" / "rank0.jsonl", self.step, 0, episodes)
        return episodes, build_batch(episodes, self.tokenizer, self.rl).to(acc.device)

    # 3. advantages: per-turn rewards (minus beta * KL per token with kl_in=reward), GAE over action tokens
    def advantages(self, batch: Batch, old: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        algo, mask = self.algo, batch.action_mask
        kl = (old["logp"] - old["ref_logp"]) * mask  # sampled log-ratio: its expectation is KL(policy || reference)
        rewards = batch.rewards - algo.beta * kl if algo.kl_in == "reward" else batch.rewards
        advantages, returns = advantages_and_returns(rewards, old["values"], mask, algo)
        return kl, advantages, returns

    # 4. update: epochs of minibatches, clipped policy and value losses, KL in the loss, early stop at target_kl
    def losses(
        self, batch, old, advantages, returns, positive, rows, warmup
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The losses of the episodes ``rows`` (each a mean over their action tokens) and the loss to minimise."""
        algo, rl = self.algo, self.rl
        mb = batch[rows]
        width = mb.input_ids.shape[1] - 1
        m = mb.action_mask
        with torch.set_grad_enabled(not warmup):
            logp, entropy = token_logprobs(self.policy, mb, rl.temperature)
        values = self.critic(mb.input_ids, mb.attention_mask)[:, :-1]
        losses = ppo_losses(
            logp, old["logp"][rows, :width], advantages[rows, :width], values, old["values"][rows, :width],
            returns[rows, :width], m, algo.clip, algo.value_clip, algo.clip_high,
        )  # fmt: skip
        losses["entropy"] = masked_mean(entropy, m)
        ref_logp = old["ref_logp"][rows, :width]
        losses["kl_loss"] = masked_mean(kl_k3(logp, ref_logp), m)  # the logged value
        loss = losses["policy_loss"] + algo.vf_coef * losses["value_loss"] - algo.entropy_coef * losses["entropy"]
        if algo.kl_in == "loss":
            loss = loss + algo.beta * masked_mean(kl_penalty(logp, old["logp"][rows, :width], ref_logp), m)
        losses["positive_nll"] = masked_mean(-logp, m * positive[rows, None])  # 0 without a success
        if algo.positive_lm_coef:
            loss = loss + algo.positive_lm_coef * losses["positive_nll"]
        if warmup:
            loss = algo.vf_coef * losses["value_loss"]
        return losses, loss

    def update(self, batch, old, advantages, returns, episodes) -> tuple[dict[str, list[float]], int, list[float]]:
        algo, rl, acc = self.algo, self.rl, self.accelerator
        positive = torch.tensor([float(e.success) for e in episodes], device=acc.device)
        self.policy.train()
        self.critic.train()
        generator = torch.Generator().manual_seed(
            int(np.random.default_rng([self.cfg.seed, self.step, 3]).integers(2**31))
        )
        warmup = self.step < algo.critic_warmup_steps  # value pretraining: the policy is not updated
        stats: dict[str, list[float]] = {}
        n = len(episodes)
        per_update = n // algo.updates_per_batch if algo.updates_per_batch else rl.minibatch_size
        slices = [rows for _ in range(algo.epochs) for rows in torch.randperm(n, generator=generator).split(per_update)]
        updates = 0
        for rows in slices:
            rows = rows.to(acc.device)
            chunks = rows.split(rl.minibatch_size)  # forward passes, accumulated into the update
            computed = (self.losses(batch, old, advantages, returns, positive, chunk, warmup) for chunk in chunks)
            first = next(computed)
            approx_kl = first[0]["approx_kl"]
            if updates and not warmup and algo.target_kl is not None and approx_kl > 1.5 * algo.target_kl:
                # early stopping, measured before the update (the critic's updates stop with the policy's)
                log.info("rl step %d: approx KL %.4f > 1.5 x target_kl after %d updates: stopping the updates",
                         self.step, float(approx_kl), updates)  # fmt: skip
                break
            tokens = batch.action_mask[rows].sum().clamp(min=1)  # an update's loss: a mean over its slice's actions
            self.optimizer.zero_grad()
            for chunk, (losses, loss) in zip(chunks, itertools.chain([first], computed), strict=True):
                acc.backward(loss * (batch.action_mask[chunk].sum() / tokens))
                for k, v in losses.items():
                    stats.setdefault(k, []).append(float(v.detach()) if torch.is_tensor(v) else float(v))
            # clipped apart: a young critic's large value gradients must not shrink the policy's step
            grad_norms = {
                "grad_norm": acc.clip_grad_norm_(self.policy.parameters(), algo.max_grad_norm),
                "value_grad_norm": acc.clip_grad_norm_(self.critic.parameters(), algo.max_grad_norm),
            }
            for k, v in grad_norms.items():
                stats.setdefault(k, []).append(float(v))
            self.optimizer.step()
            updates += 1
        learning_rates = self.scheduler.get_last_lr()  # the rates this iteration's updates used
        self.scheduler.step()
        self.step += 1
        return stats, updates, learning_rates

    # 5. metrics: the episodes' outcomes, the losses' means, KL, the critic's fit
    def metrics(self, episodes, batch, old, kl, returns, stats, updates, learning_rates) -> dict[str, float]:
        mask = batch.action_mask
        metrics = episode_metrics(episodes, self.rl)
        metrics.update({k: sum(v) / len(v) for k, v in stats.items()})
        metrics["kl"] = metrics.pop("kl_loss")  # per token, k3, as TRL's GRPO logs it
        metrics.update(
            kl_episode=float(kl.sum() / len(episodes)),  # the sampled log-ratio, summed over an episode's actions
            explained_variance=explained_variance(old["values"], returns, mask),
            value_mean=float(masked_mean(old["values"], mask)),
            learning_rate=learning_rates[0],
            critic_learning_rate=learning_rates[1],
            updates=updates,  # optimizer steps taken (fewer than epochs x minibatches after an early stop)
        )
        return metrics

    def train(self, resume: bool) -> Path:
        if resume and not self.resume():
            log.warning("rl: resume=true but no checkpoint in %s; training from the start", self.checkpoints)
        history = self.out_dir / "metrics.jsonl"  # the reward curve: one line per step
        history.parent.mkdir(parents=True, exist_ok=True)
        rundir.trim_history(history, self.step)  # steps after the checkpoint are redone
        rundir.trim_history(self.out_dir / "rollouts" / "rank0.jsonl", self.step - 1)
        with history.open("a") as f:
            while self.step < self.rl.steps:
                metrics = self.iteration()
                f.write(json.dumps({"step": self.step, **metrics}) + "\n")
                f.flush()
                if self.step % self.rl.logging_steps == 0 or self.step == self.rl.steps:
                    shown = ("success", "reward", "kl", "entropy", "clip_fraction", "value_loss", "explained_variance")
                    summary = " ".join(f"{k} {metrics[k]:.4g}" for k in shown)
                    log.info("rl step %d: %s (%.1f s)", self.step, summary, metrics["step_s"])
                    self.tracker.log(metrics, "rl")
                if self.step % self.rl.save_steps == 0 or self.step == self.rl.steps:
                    self.save_checkpoint()
                    self.tracker.log_episodes("rl", self.last_episodes)
        policy_dir = save_rl_policy(self.accelerator.unwrap_model(self.policy), self.tokenizer, self.out_dir)
        log.info("rl: policy saved to %s", policy_dir)
        return policy_dir


def train_ppo(cfg: DictConfig, init: Path, ref: Path, out_dir: Path, tracker) -> Path:
    """PPO from the policy in ``init``, KL-anchored to ``ref``; returns the saved policy's directory."""
    return PPO(cfg, init, ref, out_dir, tracker).train(resume=cfg.resume)
