"""GRPO through TRL's ``GRPOTrainer``, with multi-turn episodes from the project's runtime (``rollout_func``).

The training dataset holds one row per (environment, seed), its ``prompt`` the string ``"<env_id>#<seed>"``.
TRL repeats each row ``algo.group_size`` times and hands the batch to ``EnvRollouts``, which runs one sampled
episode per row and returns, per episode:

* ``prompt_ids``: the episode's prompt tokens (the task);
* ``completion_ids``: everything after it: agent turns and, between them, the observations;
* ``logprobs``: the sampling policy's log-probability of each agent token (0.0 on observation tokens);
* ``env_mask``: 1 on agent tokens, 0 on observation tokens, so observations carry no loss;
* ``r_<term>``: each reward term (``rl.reward_terms``), read back by one TRL reward function per term, so
  TRL sums them and logs each under its name.

Each process appends its episodes to ``rl/rollouts/rank<N>.jsonl`` (task, reward, a digest of the tokens).

The KL reference is TRL's: a frozen copy loaded from the path the policy's config names. When the reference
is not the starting policy (``rl.init_from`` differs from the BC policy), that path is pointed at the
reference before the trainer is built: the smallest change that keeps TRL's own reference handling. With
``peft=lora`` a fresh adapter trains on the starting policy and the reference is that policy with the
adapter disabled (no second copy of the weights).

Departures from GRPO as published (Shao et al. 2024, DeepSeekMath) and from TRL's single-turn use:

1. An episode is many turns: the "completion" interleaves the agent's turns with tool observations, and
   only the agent's tokens (``env_mask``) carry loss and KL.
2. The group is (environment, seed): ``algo.group_size`` episodes of one task, whose mean reward is the baseline.
3. Token-level aggregation (``algo.loss_type=dapo``, TRL's default) rather than the paper's per-sequence mean.
4. The KL reference is the BC policy, not the SFT'd base, with TRL's bias-corrected k3 (its gradient is
   KL(policy || reference)'s) at ``algo.beta`` 0.05.
5. The reward is a sum of named terms (the environment's, plus optional shaping, ``rl.turn_terms``), each
   discounted per turn by ``algo.gamma`` (1.0: none). With an undiscounted return a turn that changes nothing
   (a move into a wall) costs nothing while the turn budget lasts, and every token of an episode shares its
   advantage, so such turns in successful episodes are reinforced; ``gamma < 1`` makes each turn cost.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from datasets import Dataset
from omegaconf import DictConfig
from transformers import PrinterCallback, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from rl_agents import distributed, rundir
from rl_agents.config import grpo_minibatches
from rl_agents.model import load_policy
from rl_agents.rl import (
    append_rollouts,
    episode_metrics,
    mixed_precision,
    reward_terms,
    rl_lora,
    sample_episodes,
    save_rl_policy,
    step_seeds,
    term_names,
)
from rl_agents.tracking import LogToPython
from rl_agents.trajectory import encode_trajectory, prompt_ids

log = logging.getLogger(__name__)
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is "experimental"; tests pin what we use


class EnvRollouts:
    """TRL's ``rollout_func``: one runtime episode per prompt row."""

    def __init__(self, cfg: DictConfig, tokenizer, out_dir: Path | None = None):
        self.cfg, self.tokenizer, self.out_dir = cfg, tokenizer, out_dir
        self.last_episodes = []

    def __call__(self, prompts: list[str], trainer: GRPOTrainer) -> dict[str, list]:
        model = trainer.accelerator.unwrap_model(trainer.model)
        keys = [prompt.rsplit("#", 1) for prompt in prompts]
        by_env: dict[str, list[int]] = {}
        for env_id, seed in keys:
            by_env.setdefault(env_id, []).append(int(seed))
        # this process's rows are one slice of the step's batch: its offset makes every episode's stream distinct
        offset = trainer.accelerator.process_index * len(prompts)
        episodes = sample_episodes(self.cfg, model, self.tokenizer, by_env, trainer.state.global_step, offset)
        # back into the order of the prompts (sample_episodes runs env by env)
        queues: dict[str, list] = {}
        for episode in episodes:
            queues.setdefault(episode.metadata["env_id"], []).append(episode)
        episodes = [queues[env_id].pop(0) for env_id, _ in keys]
        self.last_episodes = episodes
        if self.out_dir is not None:
            rank = trainer.accelerator.process_index
            append_rollouts(self.out_dir / "rollouts" / f"rank{rank}.jsonl", trainer.state.global_step, rank, episodes)

        out = {"prompt_ids": [], "completion_ids": [], "logprobs": [], "env_mask": [], "episode": episodes}
        out.update({f"r_{name}": [] for name in term_names(self.cfg.rl)})
        for episode in episodes:
            encoded = encode_trajectory(episode, self.tokenizer)
            n = len(prompt_ids(self.tokenizer, episode.task))
            completion, mask = encoded.input_ids[n:], encoded.agent_mask[n:]
            agent_logprobs = iter(lp for turn in episode.turns for lp in turn.logprobs)
            out["prompt_ids"].append(encoded.input_ids[:n])
            out["completion_ids"].append(completion)
            out["env_mask"].append(mask)
            out["logprobs"].append([next(agent_logprobs) if m else 0.0 for m in mask])
            for name, value in reward_terms(episode, self.cfg.rl, self.cfg.algo.gamma).items():
                out[f"r_{name}"].append(value)
        return out


def reward_function(name: str, rl: DictConfig):
    """The TRL reward function of one reward term; the env term also logs the episodes' metrics."""

    def reward(prompts, completions, log_metric=None, **kwargs) -> list[float]:
        if name == "env" and log_metric is not None:
            for key, value in episode_metrics(kwargs["episode"], rl).items():
                log_metric(f"episodes/{key}", value)
        return [float(x) for x in kwargs[f"r_{name}"]]

    reward.__name__ = name
    return reward


class EpisodeTable(TrainerCallback):
    """Log the last rollout's episodes as a W&B table at every checkpoint."""

    def __init__(self, rollouts: EnvRollouts, tracker):
        self.rollouts, self.tracker = rollouts, tracker

    def on_save(self, args, state, control, **kwargs):
        self.tracker.log_episodes("rl", self.rollouts.last_episodes)


def make_trainer(cfg: DictConfig, init: Path, ref: Path, out_dir: Path, tracker) -> GRPOTrainer:
    """TRL's GRPOTrainer on the policy in ``init``, KL-anchored to ``ref``, with runtime rollouts."""
    algo, rl = cfg.algo, cfg.rl
    model, tokenizer = load_policy(init, cfg.model.dtype, local_files_only=True)
    model.config._name_or_path = str(ref)  # where TRL loads its frozen reference from (see the module docstring)

    prompts_per_step = rl.episodes_per_step // algo.group_size
    rows = [
        {"prompt": f"{env_id}#{seed}"}
        for step in range(rl.steps)
        for env_id, seeds in step_seeds(cfg, step, prompts_per_step).items()
        for seed in seeds
    ]
    cuda = torch.cuda.is_available()
    # one generation batch of rl.episodes_per_step across all processes, in this process's minibatches, split
    # into algo.updates_per_batch optimizer updates (rl.steps counts updates)
    minibatches = grpo_minibatches(rl, distributed.world_size())
    args = GRPOConfig(
        output_dir=str(out_dir / "checkpoints"),
        max_steps=rl.steps,
        per_device_train_batch_size=rl.minibatch_size,
        steps_per_generation=minibatches,
        gradient_accumulation_steps=minibatches // algo.updates_per_batch,
        num_generations=algo.group_size,
        num_iterations=algo.num_iterations,
        learning_rate=algo.learning_rate,
        lr_scheduler_type=algo.lr_scheduler_type,
        warmup_steps=algo.warmup_steps,
        weight_decay=algo.weight_decay,
        max_grad_norm=algo.max_grad_norm,
        beta=algo.beta,
        epsilon=algo.epsilon,
        loss_type=algo.loss_type,
        scale_rewards=algo.scale_rewards,
        temperature=rl.temperature,
        max_completion_length=cfg.runtime.max_turns * cfg.runtime.max_new_tokens,
        disable_dropout=True,
        activation_checkpointing=cfg.bc.gradient_checkpointing,  # the same memory trade-off as BC (off by default)
        logging_steps=rl.logging_steps,
        save_steps=rl.save_steps,
        save_total_limit=rl.save_total_limit,
        report_to=tracker.report_to,
        run_name="rl",
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=not cuda,
        bf16=mixed_precision(rl.mixed_precision) == "bf16",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    rollouts = EnvRollouts(cfg, tokenizer, out_dir)
    trainer = GRPOTrainer(
        model=model,
        peft_config=rl_lora(cfg),  # LoRA: the reference is the model with the adapter disabled (TRL's own way)
        reward_funcs=[reward_function(name, rl) for name in term_names(rl)],
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        rollout_func=rollouts,
        callbacks=[
            LogToPython("rl", out_dir / "metrics.jsonl"),
            EpisodeTable(rollouts, tracker),
            rundir.SafeCheckpoints(),
        ],
    )
    trainer.remove_callback(PrinterCallback)  # with tqdm off it prints every log to stdout: LogToPython logs them
    return trainer


def train_grpo(cfg: DictConfig, init: Path, ref: Path, out_dir: Path, tracker) -> Path:
    """GRPO from the policy in ``init``, KL-anchored to ``ref``; returns the saved policy's directory."""
    trainer = make_trainer(cfg, init, ref, out_dir, tracker)
    tokenizer = trainer.processing_class
    checkpoints = trainer.args.output_dir
    checkpoint = rundir.last_checkpoint(checkpoints) if cfg.resume else None
    if cfg.resume and checkpoint is None:
        log.warning("rl: resume=true but no complete checkpoint in %s; training from the start", checkpoints)
    if trainer.is_world_process_zero():
        # the reward curve and the rollout log keep the steps the checkpoint holds; later ones are redone
        done = rundir.checkpoint_step(checkpoint) if checkpoint else 0
        rundir.trim_history(out_dir / "metrics.jsonl", done)
        for rollouts in (out_dir / "rollouts").glob("rank*.jsonl"):
            rundir.trim_history(rollouts, done - 1)  # a rollout's step is the update it fed (0-based)
    trainer.accelerator.wait_for_everyone()
    with rundir.disk_full_reported(checkpoints):
        trainer.train(resume_from_checkpoint=checkpoint)

    policy_dir = out_dir / "policy"
    if trainer.is_world_process_zero():  # one writer under a distributed launch
        save_rl_policy(trainer.accelerator.unwrap_model(trainer.model), tokenizer, out_dir)
        log.info("rl: policy saved to %s", policy_dir)
    trainer.accelerator.wait_for_everyone()
    return policy_dir
