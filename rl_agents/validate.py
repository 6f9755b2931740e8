"""The checks run before any work: what the schema's types cannot say (environments registered, teachers and
builders importable, paths present, seed ranges disjoint, values in range), each failing with a ``ConfigError``
that names the key. ``validate_train``, ``validate_evaluate`` and ``validate_bench`` are the entry points."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
from hydra._internal.utils import _locate  # get_method / get_class without their own error log
from omegaconf import DictConfig, OmegaConf

from rl_agents import distributed
from rl_agents.config import (
    OPENAI_TEACHER,
    POLICIES,
    PRETRAINED_MODEL,
    SCRIPTED_TEACHER,
    TINY_MODEL,
    ConfigError,
    env_entries,
    grpo_minibatches,
)
from rl_agents.runtime import check_workers
from rl_agents.runtime.workers import env_spec
from rl_agents.trajectory import SPECIAL_TOKENS


# --- checks that need more than types -----------------------------------------------------------
def _check_envs(cfg: DictConfig) -> None:
    if not cfg.env.envs:
        raise ConfigError("env.envs is empty: name at least one environment id")
    for env_id, entry in env_entries(cfg).items():
        try:
            env_spec(env_id)
        except ImportError as err:
            module = env_id.rpartition(":")[0]
            raise ConfigError(f"env.envs: cannot import {module!r} for {env_id!r}: {err}") from None
        except gym.error.Error as err:
            ours = sorted(k for k, s in gym.registry.items() if str(s.entry_point).startswith("envs."))
            raise ConfigError(
                f"unknown env {env_id!r} in env.envs ({err}); tool envs registered here: {', '.join(ours)}; "
                "a user env is named 'my_pkg.module:MyEnv-v0'"
            ) from None
        if "split" in entry.kwargs:
            raise ConfigError(
                f"env.envs.{env_id}.kwargs.split: the pipeline sets the split (train for collect and RL, eval.split "
                "for evaluation); remove it"
            )
        if not isinstance(entry.weight, (int, float)) or entry.weight <= 0:
            raise ConfigError(f"env.envs.{env_id}.weight must be positive, got {entry.weight}")


def _check_target(cfg: DictConfig, group: str) -> str:
    """The group's ``_target_``, importable; the removed ``kind`` key is refused with its replacement named."""
    node = cfg[group]
    if node.get("kind") is not None:
        raise ConfigError(
            f"{group}.kind is gone: choose the option with the group ({group}=<option>, conf/{group}/) or name a "
            f"builder with {group}._target_"
        )
    try:
        if not callable(_locate(node._target_)):
            raise ImportError("it is not callable")
    except Exception as err:
        raise ConfigError(f"{group}._target_={node._target_!r} cannot be imported: {err}") from None
    return node._target_


def _check_teacher(cfg: DictConfig) -> None:
    target = _check_target(cfg, "teacher")
    if target == SCRIPTED_TEACHER:
        for env_id, entry in env_entries(cfg).items():
            env_target = entry.teacher.get("_target_")
            if not env_target:
                raise ConfigError(f"env.envs.{env_id}.teacher has no _target_: teacher=scripted needs one")
            try:
                if not isinstance(_locate(env_target), type):
                    raise ImportError("it is not a class")
            except Exception as err:
                raise ConfigError(
                    f"env.envs.{env_id}.teacher._target_={env_target!r} cannot be imported: {err}"
                ) from None
    elif target == OPENAI_TEACHER and not cfg.teacher.model:
        raise ConfigError("teacher=openai needs teacher.model (the served model's name)")
    t = cfg.teacher
    for key in ("noise", "max_failure_rate", "max_malformed_rate"):
        if not 0.0 <= t[key] <= 1.0:
            raise ConfigError(f"teacher.{key} must be in [0, 1], got {t[key]}")
    for key, low in (("concurrency", 1), ("max_retries", 0), ("health_check_after", 1), ("backoff_s", 0)):
        if t[key] < low:
            raise ConfigError(f"teacher.{key} must be at least {low}, got {t[key]}")
    for key in ("timeout_s", "requests_per_s"):
        if t[key] is not None and t[key] <= 0:
            raise ConfigError(f"teacher.{key} must be positive, got {t[key]}")


def _check_model(cfg: DictConfig) -> None:
    target = _check_target(cfg, "model")
    if target == PRETRAINED_MODEL and not cfg.model.name_or_path:
        raise ConfigError("model=hf needs model.name_or_path (a Hugging Face model name or a local directory)")
    if target == PRETRAINED_MODEL:
        _check_pretrained(cfg.model.name_or_path, cfg.model.local_files_only)
    if target == TINY_MODEL:
        sizes = ("vocab_size", "number_chunk", "hidden_size", "num_layers", "num_heads", "intermediate_size")
        for key in (*sizes, "copy_pretrain_span"):
            if cfg.model[key] <= 0:
                raise ConfigError(f"model.{key} must be positive, got {cfg.model[key]}")
        minimum = 256 + 1 + len(SPECIAL_TOKENS)  # the byte alphabet, the pad token and the format's tokens
        if cfg.model.vocab_size < minimum:
            raise ConfigError(
                f"model.vocab_size must be at least {minimum} (256 bytes and {1 + len(SPECIAL_TOKENS)} special "
                f"tokens), got {cfg.model.vocab_size}"
            )
        if (cfg.runtime.max_context or 0) > cfg.model.max_position_embeddings:
            raise ConfigError(
                f"runtime.max_context={cfg.runtime.max_context} exceeds model.max_position_embeddings="
                f"{cfg.model.max_position_embeddings} (null: the model's own)"
            )
        if cfg.model.get("number_tokens") and cfg.model.number_chunk > 3:
            raise ConfigError(
                f"model.number_tokens with model.number_chunk={cfg.model.number_chunk}: every digit string up to that "
                f"length would be a token (over {10**cfg.model.number_chunk}); use number_chunk <= 3"
            )
        if cfg.model.copy_pretrain_steps < 0:
            raise ConfigError(f"model.copy_pretrain_steps must be >= 0, got {cfg.model.copy_pretrain_steps}")
        if cfg.model.copy_pretrain_rounds < 1:
            raise ConfigError(f"model.copy_pretrain_rounds must be >= 1, got {cfg.model.copy_pretrain_rounds}")
        if not 0.0 < cfg.model.copy_pretrain_target <= 1.0:
            raise ConfigError(f"model.copy_pretrain_target must be in (0, 1], got {cfg.model.copy_pretrain_target}")
        if cfg.model.copy_pretrain_steps and 2 * cfg.model.copy_pretrain_span > cfg.model.max_position_embeddings:
            raise ConfigError(
                f"model.copy_pretrain_span={cfg.model.copy_pretrain_span} repeated must fit "
                f"model.max_position_embeddings={cfg.model.max_position_embeddings}"
            )
        if cfg.model.hidden_size % cfg.model.num_heads:
            raise ConfigError(
                f"model.hidden_size={cfg.model.hidden_size} must be a multiple of model.num_heads={cfg.model.num_heads}"
            )


def _check_logger(cfg: DictConfig) -> None:
    _check_target(cfg, "logger")


def _check_runtime(cfg: DictConfig) -> None:
    rt = cfg.runtime
    for key in ("max_new_tokens", "max_turns", "max_context", "batch_size"):
        if rt[key] is not None and rt[key] <= 0:
            raise ConfigError(f"runtime.{key} must be positive, got {rt[key]}")
    if not rt.greedy and rt.temperature <= 0:
        raise ConfigError(f"runtime.temperature must be positive when sampling, got {rt.temperature}")
    try:
        check_workers(rt)
    except ValueError as err:
        raise ConfigError(f"runtime.{err}") from None
    if rt.draft_budget is not None and rt.draft_budget < 1:
        raise ConfigError(f"runtime.draft_budget must be >= 1 (or null: no cap), got {rt.draft_budget}")
    if rt.draft_tokens < 0 or rt.draft_ngram < 1:
        raise ConfigError(
            f"runtime.draft_tokens must be >= 0 (0: no drafting) and runtime.draft_ngram >= 1, "
            f"got {rt.draft_tokens} and {rt.draft_ngram}"
        )
    if "eval" in cfg and cfg.eval.get("temperature") is not None and cfg.eval.temperature <= 0:
        raise ConfigError(f"eval.temperature must be positive (or null for greedy), got {cfg.eval.temperature}")


def _check_rl(cfg: DictConfig, run_dir: Path) -> None:
    rl, algo = cfg.rl, cfg.algo
    if algo is None or algo.get("name") not in ("grpo", "ppo"):
        raise ConfigError("the rl stage needs algo=grpo or algo=ppo")
    for key in ("steps", "episodes_per_step", "save_steps", "logging_steps"):
        if rl[key] <= 0:
            raise ConfigError(f"rl.{key} must be positive, got {rl[key]}")
    if not 0 < rl.minibatch_size <= rl.episodes_per_step:
        raise ConfigError(
            f"rl.minibatch_size={rl.minibatch_size} must be in [1, rl.episodes_per_step={rl.episodes_per_step}]"
        )
    if rl.temperature <= 0:
        raise ConfigError(f"rl.temperature must be positive, got {rl.temperature}")
    if cfg.runtime.processes > 1:
        raise ConfigError(
            "runtime.processes > 1 is for evaluation and the bench: RL rollouts run in one process (worker "
            "processes would roll out the weights they were started with, not the trained ones)"
        )
    if algo.beta < 0:
        raise ConfigError(f"algo.beta must be >= 0, got {algo.beta}")
    if algo.name == "grpo":
        if algo.group_size < 2 or rl.episodes_per_step % algo.group_size:
            raise ConfigError(
                f"algo.group_size={algo.group_size} must be >= 2 and divide rl.episodes_per_step={rl.episodes_per_step}"
            )
        processes = distributed.world_size()
        if rl.episodes_per_step % (rl.minibatch_size * processes):
            raise ConfigError(
                f"rl.minibatch_size={rl.minibatch_size} x {processes} process(es) must divide "
                f"rl.episodes_per_step={rl.episodes_per_step} (GRPO accumulates the minibatches of a step into one "
                "update)"
            )
        _at_least(cfg, ["algo.updates_per_batch", "algo.num_iterations"], 1)
        minibatches = grpo_minibatches(rl, processes)
        if minibatches % algo.updates_per_batch:
            raise ConfigError(
                f"algo.updates_per_batch={algo.updates_per_batch} must divide the {minibatches} minibatches of a "
                "generation batch (rl.episodes_per_step / (rl.minibatch_size x processes))"
            )
        per_batch = algo.updates_per_batch * algo.num_iterations
        if rl.save_steps % per_batch:
            raise ConfigError(
                f"rl.save_steps={rl.save_steps} must be a multiple of algo.updates_per_batch x algo.num_iterations "
                f"= {per_batch} (the updates one generation batch gives): a checkpoint inside a batch would resume "
                "on a new batch"
            )
    else:
        if distributed.world_size() > 1:
            raise ConfigError(
                "algo=ppo runs in one process; under a distributed launch use algo=grpo (TRL's data-parallel GRPO)"
            )
        _at_least(cfg, ["algo.epochs", "algo.updates_per_batch"], 1)  # updates_per_batch null: one per minibatch
        if algo.updates_per_batch is not None and rl.episodes_per_step % algo.updates_per_batch:
            raise ConfigError(
                f"algo.updates_per_batch={algo.updates_per_batch} must divide rl.episodes_per_step="
                f"{rl.episodes_per_step} (each update takes an equal slice of the step's episodes), or be null (one "
                "update per rl.minibatch_size episodes)"
            )
        for key in ("lam", "critic_lam"):
            if algo[key] is not None and not 0 <= algo[key] <= 1:
                raise ConfigError(f"algo.{key} must be in [0, 1], got {algo[key]}")
        if algo.clip_high is not None and algo.clip_high <= 0:
            raise ConfigError(f"algo.clip_high must be positive (or null: algo.clip), got {algo.clip_high}")
        if algo.positive_lm_coef < 0:
            raise ConfigError(f"algo.positive_lm_coef must be >= 0, got {algo.positive_lm_coef}")
        if algo.target_kl is not None and algo.target_kl <= 0:
            raise ConfigError(f"algo.target_kl must be positive (or null: no early stopping), got {algo.target_kl}")
        if not 0 <= algo.critic_warmup_steps < rl.steps:
            raise ConfigError(
                f"algo.critic_warmup_steps={algo.critic_warmup_steps} must be in [0, rl.steps={rl.steps}): "
                "the policy would never be trained"
            )
    if cfg.peft.enabled and rl.ref_from is not None and rl.ref_from != rl.init_from:
        raise ConfigError(
            f"peft=lora: the rl stage's KL reference is its starting policy with the adapter disabled, so "
            f"rl.ref_from={rl.ref_from!r} must be rl.init_from ({rl.init_from!r}) or null"
        )
    for key in ("init_from", "ref_from"):
        path = rl[key]
        if path is not None and not (Path(path) / "config.json").is_file():
            raise ConfigError(f"rl.{key}={path!r} is not a saved policy directory (no config.json)")
    if rl.init_from is None and "bc" not in cfg.stages and not (run_dir / "bc" / "policy" / "config.json").is_file():
        raise ConfigError("the rl stage starts from the BC policy: add bc to stages, or set rl.init_from=DIR")


def _check_dagger(cfg: DictConfig, run_dir: Path) -> None:
    d = cfg.dagger
    _at_least(cfg, ["dagger.rounds", "dagger.episodes", "dagger.steps"], 1)
    _at_least(cfg, ["dagger.val_episodes"], 0)
    if not 0.0 <= d.beta <= 1.0:
        raise ConfigError(f"dagger.beta must be in [0, 1], got {d.beta}")
    for key in ("learning_rate", "temperature"):
        if d[key] is not None and d[key] <= 0:
            raise ConfigError(f"dagger.{key} must be positive (or null), got {d[key]}")
    last = cfg.env.train_seed_start + cfg.collect.episodes + d.rounds * d.episodes
    if last > cfg.env.eval_seed_start:
        raise ConfigError(
            f"the dagger rounds' seeds run to {last}, past env.eval_seed_start={cfg.env.eval_seed_start}: "
            "fewer dagger.rounds or dagger.episodes"
        )
    if "bc" not in cfg.stages and not (run_dir / "bc" / "policy" / "config.json").is_file():
        raise ConfigError(
            "the dagger stage starts from the BC policy: add bc to stages (stages=[collect,bc,dagger,eval])"
        )
    if (
        "collect" not in cfg.stages
        and cfg.trajectories is None
        and not (run_dir / "trajectories" / "train.jsonl").is_file()
    ):
        raise ConfigError(
            "the dagger stage aggregates on the teacher's trajectories: add collect, or trajectories=PATH"
        )
    _check_teacher(cfg)
    if cfg.peft.enabled:
        raise ConfigError("the dagger stage trains full weights for now: run it with peft=none")
    if distributed.world_size() > 1:
        raise ConfigError("the dagger stage runs in one process: launch it without torchrun / accelerate")


def _at_least(cfg: DictConfig, keys: list[str], minimum: float, strict: bool = False) -> None:
    for key in keys:
        value = OmegaConf.select(cfg, key)
        if value is not None and (value <= minimum if strict else value < minimum):
            raise ConfigError(f"{key} must be {'>' if strict else '>='} {minimum:g}, got {value}")


def _check_values(cfg: DictConfig) -> None:
    """Counts >= 1, rates > 0, seeds >= 0, lengths the model can hold: before any work, the key named."""
    _at_least(cfg, ["seed", "env.train_seed_start", "env.eval_seed_start"], 0)
    counts = ["eval.episodes", "bc.max_steps", "bc.batch_size", "bc.gradient_accumulation_steps", "bc.save_steps",
              "bc.logging_steps", "bc.save_total_limit", "bc.length_bucket"]  # fmt: skip
    _at_least(cfg, (["collect.episodes", "collect.workers"] if "collect" in cfg.stages else []) + counts, 1)
    if not 0.0 <= cfg.collect.perturb < 1.0:
        raise ConfigError(f"collect.perturb must be in [0, 1), got {cfg.collect.perturb}")
    _at_least(cfg, ["bc.learning_rate"], 0, strict=True)
    _at_least(cfg, ["bc.weight_decay", "bc.warmup_steps", "bc.copy_mix", "bc.copy_augment"], 0)
    if cfg.bc.max_length < 32:
        raise ConfigError(f"bc.max_length must be >= 32 tokens (a prompt and a turn), got {cfg.bc.max_length}")
    if cfg.model._target_ == TINY_MODEL and cfg.bc.max_length > cfg.model.max_position_embeddings:
        raise ConfigError(
            f"bc.max_length={cfg.bc.max_length} exceeds model.max_position_embeddings="
            f"{cfg.model.max_position_embeddings}"
        )
    if "rl" in cfg.stages and cfg.algo is not None:
        _at_least(cfg, ["algo.learning_rate", "algo.critic_learning_rate"], 0, strict=True)


def _check_pretrained(name_or_path: str, local_files_only: bool) -> None:
    """A local directory that holds a model, or a Hub name whose config loads (from the cache or the Hub):
    before collection, not at BC's first step."""
    from transformers import AutoConfig

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.name_or_path={name_or_path!r}: the directory holds no model (no config.json)")
        return
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise ConfigError(f"model.name_or_path={name_or_path!r}: no such directory")
    try:
        AutoConfig.from_pretrained(name_or_path, local_files_only=local_files_only)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"model.name_or_path={name_or_path!r} is neither a local model directory nor a model that loads from "
            f"the Hugging Face Hub{' cache (model.local_files_only=true)' if local_files_only else ''}: {err}"
        ) from None


def validate_train(cfg: DictConfig, run_dir: Path) -> None:
    """Every check a training run needs before its first stage."""
    if cfg.threads is not None and cfg.threads <= 0:
        raise ConfigError(f"threads must be positive (or null: this process's share of the CPUs), got {cfg.threads}")
    _check_values(cfg)
    _check_envs(cfg)
    _check_model(cfg)
    _check_logger(cfg)
    _check_runtime(cfg)
    collecting = "collect" in cfg.stages
    if collecting or "teacher" in cfg.eval.policies:
        _check_teacher(cfg)
    if cfg.env.train_seed_start + cfg.collect.episodes > cfg.env.eval_seed_start:
        raise ConfigError(
            f"train seeds [{cfg.env.train_seed_start}, {cfg.env.train_seed_start + cfg.collect.episodes}) overlap "
            f"the held-out seeds from env.eval_seed_start={cfg.env.eval_seed_start}"
        )
    if cfg.trajectories is not None and not Path(cfg.trajectories).is_file():
        raise ConfigError(f"trajectories={cfg.trajectories!r}: no such file")
    if cfg.trajectories is not None and collecting:
        raise ConfigError(
            f"trajectories={cfg.trajectories!r} and the collect stage both give BC its data: "
            "drop collect from stages (stages=[bc,eval]) or the trajectories key"
        )
    if "bc" in cfg.stages and not collecting and cfg.trajectories is None:
        if not (cfg.resume and (run_dir / "trajectories" / "train.jsonl").is_file()):
            raise ConfigError("stage bc without collect needs trajectories=PATH (a trajectory JSONL)")
    unknown_policies = [p for p in cfg.eval.policies if p not in POLICIES]
    if unknown_policies:
        raise ConfigError(f"unknown eval.policies {unknown_policies}; known: {', '.join(POLICIES)}")
    if "dagger" in cfg.stages:
        _check_dagger(cfg, run_dir)
    if "rl" in cfg.stages:
        _check_rl(cfg, run_dir)
    for stage in ("bc", "dagger", "rl"):
        if "eval" in cfg.stages and stage in cfg.eval.policies and stage not in cfg.stages:
            if not (run_dir / stage / "policy" / "config.json").is_file():
                raise ConfigError(
                    f"eval of the {stage} policy needs the {stage} stage (or a run dir that has {stage}/policy)"
                )


def _check_checkpoint(checkpoint: str) -> None:
    path = Path(checkpoint)
    if not ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
        raise ConfigError(f"checkpoint={checkpoint!r} is not a saved policy directory (no config.json)")


def validate_evaluate(cfg: DictConfig) -> None:
    _at_least(cfg, ["seed", "env.eval_seed_start"], 0)
    _at_least(cfg, ["eval.episodes"], 1)
    _check_envs(cfg)
    _check_logger(cfg)
    _check_runtime(cfg)
    _check_checkpoint(cfg.checkpoint)
    unknown = [p for p in cfg.eval.policies if p not in ("teacher", "policy")]
    if unknown:
        raise ConfigError(f"unknown eval.policies {unknown}; known: teacher, policy (the checkpoint)")
    if "teacher" in cfg.eval.policies:
        _check_teacher(cfg)


def scale_size(size: str) -> tuple[int, int]:
    """``HIDDENxLAYERS`` (e.g. ``256x6``) of the bench's ``scale.sizes`` as (hidden size, layers)."""
    parts = str(size).lower().split("x")
    if len(parts) != 2 or not all(x.isdigit() and int(x) > 0 for x in parts):
        raise ConfigError(f"scale.sizes: {size!r} is not HIDDENxLAYERS (e.g. 256x6)")
    return int(parts[0]), int(parts[1])


def validate_bench(cfg: DictConfig) -> None:
    """The checks of ``python -m rl_agents.bench``."""
    _check_envs(cfg)
    _check_runtime(cfg)
    if cfg.checkpoint is not None:
        _check_checkpoint(cfg.checkpoint)
    for key in ("episodes", "throughput_episodes", "limit_tokens", "rounds"):
        if cfg[key] <= 0:
            raise ConfigError(f"{key} must be positive, got {cfg[key]}")
    for key in ("turns", "parallel"):
        if not cfg[key] or any(n <= 0 for n in cfg[key]):
            raise ConfigError(f"{key} must be a non-empty list of positive numbers, got {list(cfg[key])}")
    for size in cfg.scale.sizes:
        scale_size(size)
    if cfg.scale.episodes <= 0:
        raise ConfigError(f"scale.episodes must be positive, got {cfg.scale.episodes}")
    if cfg.turn_scaling.episodes <= 0:
        raise ConfigError(f"turn_scaling.episodes must be positive, got {cfg.turn_scaling.episodes}")
    if cfg.device not in ("auto", "cpu") and not cfg.device.startswith("cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda[:N], got {cfg.device!r}")
