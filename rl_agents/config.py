"""Structured configs: the schema the YAML files in ``conf/`` extend, and the checks run before any work.

The dataclasses are registered in Hydra's ConfigStore, so an unknown key (``bc.bogus=1``) or a value of
the wrong type (``bc.max_steps=abc``) fails at composition with the key's name. ``validate`` then checks
what a schema cannot: that environments are registered, teachers importable, paths present, seed splits
disjoint. Every check runs before the first stage starts.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

import gymnasium as gym
from hydra.core.config_store import ConfigStore
from hydra.utils import get_class, get_method
from omegaconf import MISSING, DictConfig, OmegaConf

from rl_agents import distributed
from rl_agents.runtime import RuntimeConfig, check_workers
from rl_agents.trajectory import SPECIAL_TOKENS

POLICIES = ("teacher", "bc", "dagger", "rl")


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and what to do."""


# --- closed choices: composition refuses any other value, naming the key and the choices ---------
class Stage(StrEnum):
    collect = "collect"
    bc = "bc"
    dagger = "dagger"
    rl = "rl"
    eval = "eval"


class Split(StrEnum):
    """Which tasks: train (what every training stage sees), val (what defaults are chosen on), test (results)."""

    train = "train"
    val = "val"
    test = "test"


class Keep(StrEnum):
    """collect.keep: success (rejection sampling) or all (every teacher episode)."""

    success = "success"
    all = "all"


class OnMalformed(StrEnum):
    feedback = "feedback"
    end = "end"
    penalize = "penalize"


class MixedPrecision(StrEnum):
    auto = "auto"
    no = "no"
    bf16 = "bf16"


class KLIn(StrEnum):
    reward = "reward"
    loss = "loss"


class GAELevel(StrEnum):
    token = "token"
    turn = "turn"


class ScaleRewards(StrEnum):
    group = "group"
    batch = "batch"
    none = "none"


class DType(StrEnum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class WandbMode(StrEnum):
    auto = "auto"
    online = "online"
    offline = "offline"
    disabled = "disabled"


# --- schemas of the stages ---
@dataclass
class BCConfig:
    max_steps: int = 2000
    """optimizer steps"""
    batch_size: int = 32
    """sequences per step (per device)"""
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-3
    lr_scheduler_type: str = "cosine"
    warmup_steps: float = 0.05
    """a fraction of max_steps when below 1"""
    weight_decay: float = 0.0
    adam_beta2: float = 0.999
    max_length: int = 1024
    """longest training sequence, in tokens"""
    packing: bool = False
    """pack sequences (best-fit decreasing, padding-free) instead of padding them (best on GPUs)"""
    group_by_length: bool = True
    """batch episodes of similar length together (less padding); ignored when packing"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass: less memory for large models, slower steps (11% on the tiny one)"""
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int = 2


@dataclass
class ShapingConfig:
    """Terms added to the environment's reward (0 turns a term off)."""

    per_turn: float = 0.0
    """added for every agent turn (negative: prefer short episodes)"""
    tool_error: float = 0.0
    """added for every well-formed call the tool refused (a bad expression, an SQL error)"""
    truncated: float = 0.0
    """added once when the episode was cut short (turn or context budget, or a malformed turn with on_malformed=end)"""


@dataclass
class RLConfig:
    init_from: str | None = None
    """the policy to start from (a saved policy dir); default: this run's bc/policy"""
    ref_from: str | None = None
    """the frozen KL reference; default: this run's bc/policy, else init_from"""
    steps: int = 100
    """optimizer updates (GRPO) or PPO iterations (each: sample episodes, then epochs of minibatches)"""
    episodes_per_step: int = 64
    """episodes sampled per step (GRPO: prompts x algo.group_size)"""
    minibatch_size: int = 16
    """episodes per forward/backward pass (PPO: per optimizer update; GRPO: accumulated to one update a step)"""
    temperature: float = 1.0
    """sampling temperature of the rollouts (and of the log-probabilities trained on)"""
    on_malformed: OnMalformed = OnMalformed.feedback
    """a malformed tool call: feedback (the error is the next observation), end (the episode ends), or
    penalize (feedback, and malformed_penalty is subtracted from the reward for each one)"""
    malformed_penalty: float = 0.2
    shaping: ShapingConfig = field(default_factory=ShapingConfig)
    save_steps: int = 20
    save_total_limit: int = 2
    logging_steps: int = 1
    mixed_precision: MixedPrecision = MixedPrecision.auto
    """auto: bf16 autocast on a GPU that supports it, else none; no; bf16 (also on a CPU). The KL reference
    runs in the same precision as the policy"""


@dataclass
class DAggerConfig:
    """The dagger stage (rl_agents/dagger.py): rounds of policy rollouts, teacher labels and BC on the aggregate."""

    rounds: int = 2
    episodes: int = 1000
    """policy episodes per round, on train tasks the collect stage did not draw"""
    beta: float = 0.0
    """a round-i episode is the teacher's own with probability beta**i (0: the policy's only, after the BC data)"""
    steps: int = 500
    """BC steps per round, continuing from the previous round's policy on the teacher's data and every round's"""
    learning_rate: float | None = None
    """null: bc.learning_rate"""
    temperature: float | None = None
    """null: greedy rollouts (the states the deployed agent visits); a temperature: sampled ones"""
    val_episodes: int = 200
    """validation-task episodes after each round (greedy success in dagger/metrics.jsonl); 0: none"""


@dataclass
class AlgoConfig:
    """What both algorithms have (the ``algo`` group: grpo or ppo)."""

    name: str = "grpo"
    beta: float = 0.05
    """KL coefficient to the reference policy"""
    learning_rate: float = 1e-4
    lr_scheduler_type: str = "constant_with_warmup"
    warmup_steps: int = 5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0


@dataclass
class GRPOAlgoConfig(AlgoConfig):
    name: str = "grpo"
    group_size: int = 8
    """episodes per prompt (the group whose rewards give the baseline)"""
    num_iterations: int = 1
    """optimizer passes over each generation batch (mu in the GRPO paper)"""
    epsilon: float = 0.2
    """clipping range of the importance ratio"""
    loss_type: str = "dapo"
    """TRL's loss aggregation: dapo (token-level), grpo (per sequence), dr_grpo, bnpo"""
    scale_rewards: ScaleRewards = ScaleRewards.group
    """advantage scaling: group, batch or none"""


@dataclass
class PPOAlgoConfig(AlgoConfig):
    name: str = "ppo"
    kl_in: KLIn = KLIn.loss
    """where the KL penalty goes: reward (per-token -beta*KL in the reward) or loss (beta*KL added to the loss)"""
    critic_learning_rate: float = 1e-3
    epochs: int = 2
    """passes over each step's episodes (in minibatches of rl.minibatch_size)"""
    clip: float = 0.2
    clip_high: float | None = None
    """upper clip of the ratio, 1 + clip_high (None: clip); DAPO's clip-higher uses 0.28 with clip 0.2"""
    value_clip: float = 0.2
    vf_coef: float = 1.0
    entropy_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    """GAE lambda of the policy's advantages"""
    gae_level: GAELevel = GAELevel.turn
    """what gamma and lambda discount: token (every agent token) or turn (once per turn, between turns only)"""
    critic_lam: float | None = 1.0
    """GAE lambda of the critic's value targets (None: lam); 1.0 regresses on the returns themselves, so the
    critic does not learn its own bias back (decoupled GAE, VC-PPO: Yuan et al. 2025)"""
    critic_warmup_steps: int = 0
    """the first iterations train the critic only, the policy frozen (value pretraining, as verl's critic_warmup)"""
    normalize_advantages: bool = True
    positive_lm_coef: float = 0.0
    """weight of a language-model loss (mean NLL of the action tokens) on the batch's successful episodes,
    VAPO's positive-example LM loss (Yue et al. 2025, 0.1 there): self-imitation of what worked"""
    target_kl: float | None = 0.02
    """early stopping: an iteration's updates stop at the first minibatch whose approximate KL to the rollout
    policy exceeds 1.5 x target_kl (Stable-Baselines3's rule); None: every epoch runs"""


@dataclass
class EnvEntry:
    kwargs: dict[str, Any] = field(default_factory=dict)
    """keyword arguments of gymnasium.make"""
    teacher: dict[str, Any] = field(default_factory=dict)
    """the scripted teacher, as a Hydra node: {_target_: module.Class, ...}"""
    weight: float = 1.0
    """share of the collect episodes (several envs)"""


@dataclass
class EnvConfig:
    name: str = MISSING
    """a label for this environment set (eval.json's "env")"""
    envs: dict[str, Any] = field(default_factory=dict)
    """gymnasium ids ("Calculator-v0", or "my_pkg.module:MyEnv-v0") -> EnvEntry fields (checked by env_entries,
    untyped here so that +env.envs.<id>.teacher._target_=... can add an environment from the command line)"""
    train_seed_start: int = 0
    """seeds [train_seed_start, eval_seed_start) feed teacher data and RL (on train tasks only)"""
    eval_seed_start: int = 1_000_000
    """evaluation seeds start here (on the tasks of eval.split: held out by task, not only by seed)"""


@dataclass
class ModelConfig:
    _target_: str = "rl_agents.model.tiny_policy"
    """the builder of the policy BC starts from, called as f(cfg, run_dir, trajectories) -> (model, tokenizer):
    rl_agents.model.tiny_policy (model=tiny: a small Llama built from this config) or
    rl_agents.model.pretrained_policy (model=hf: model.name_or_path, a Hub name or a directory)"""
    kind: str | None = None
    """removed: choose the group option (model=tiny, model=hf) or model._target_"""
    name_or_path: str | None = None
    dtype: DType = DType.float32
    local_files_only: bool = False
    vocab_size: int = 2048
    number_chunk: int = 3
    merge_across_words: bool = False
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    max_position_embeddings: int = 1024
    copy_pretrain_steps: int = 1000
    """tiny only: steps of synthetic copy pretraining (random tokens, repeated) before BC; 0 = off"""
    copy_pretrain_span: int = 32
    """length of each random span the copy pretraining repeats"""


@dataclass
class TeacherConfig:
    _target_: str = "rl_agents.teachers.scripted_teacher"
    """the teacher's builder, called as f(cfg, env_id) -> teacher: rl_agents.teachers.scripted_teacher
    (teacher=scripted: each env's expert, env.envs.<id>.teacher) or rl_agents.teachers.openai_teacher
    (teacher=openai: an LLM behind an OpenAI-compatible endpoint)"""
    kind: str | None = None
    """removed: choose the group option (teacher=scripted, teacher=openai) or teacher._target_"""
    noise: float = 0.0
    """fraction of episodes in which a scripted teacher acts lazily or wrongly"""
    think: bool = True
    """scripted teachers write a short <think> before tool calls"""
    model: str | None = None
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float = 0.0
    max_tokens: int = 512


@dataclass
class PeftConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str = "all-linear"


@dataclass
class LoggerConfig:
    _target_: str = "rl_agents.tracking.wandb_tracking"
    """the tracker's builder, called as f(cfg, run_dir, job) -> Tracker: rl_agents.tracking.wandb_tracking
    (logger=wandb) or rl_agents.tracking.no_tracking (logger=none)"""
    kind: str | None = None
    """removed: choose the group option (logger=wandb, logger=none) or logger._target_"""
    project: str = "rl_agents"
    entity: str | None = None
    mode: WandbMode = WandbMode.auto
    """auto: online when WANDB_API_KEY is set, else offline; or online / offline / disabled"""
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    table_episodes: int = 8
    """sample episodes per policy in the W&B episode table"""
    artifacts: bool = True
    """log the trajectory dataset, the policies and the evaluation as W&B artifacts (lineage in metadata)"""


@dataclass
class CollectConfig:
    episodes: int = 32_000
    keep: Keep = Keep.success
    """success: rejection sampling, keep successful episodes; all: keep every episode"""


@dataclass
class EvalConfig:
    episodes: int = 200
    """held-out episodes per environment"""
    policies: list[str] = field(default_factory=lambda: ["teacher", "bc"])
    temperature: float | None = None
    """null: greedy decoding (the deployed agent); a temperature: sampled episodes (``runtime.top_p``,
    seeded by ``seed``), the stochastic policy that RL optimises"""
    split: Split = Split.test
    """the tasks evaluated: test (what results report), val (what defaults and searches are chosen on), or train
    (the training distribution, for the generalisation gap; never a result)"""


@dataclass
class TrainConfig:
    seed: int = 0
    stages: list[Stage] = field(default_factory=lambda: [Stage.collect, Stage.bc, Stage.eval])
    resume: bool = False
    """continue an interrupted run in the same run dir (hydra.run.dir=...)"""
    overwrite: bool = False
    """start afresh in a run dir that already holds a run, removing its artifacts (a fresh run refuses otherwise)"""
    trajectories: str | None = None
    """a trajectory JSONL to clone instead of running the collect stage"""
    progress: bool = True
    env: EnvConfig = field(default_factory=EnvConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    bc: BCConfig = field(default_factory=BCConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dagger: DAggerConfig = field(default_factory=DAggerConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    algo: Any = None
    """the RL algorithm (group algo: grpo or ppo; typed by GRPOAlgoConfig / PPOAlgoConfig)"""


@dataclass
class EvaluateConfig:
    checkpoint: str = MISSING
    """a saved policy directory (a bc/policy dir, or any Hugging Face model dir)"""
    name: str = "policy"
    """the policy's key in eval.json"""
    seed: int = 0
    progress: bool = True
    env: EnvConfig = field(default_factory=EnvConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(policies=["policy"]))


ConfigStore.instance().store(name="train_schema", node=TrainConfig)
ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)
ConfigStore.instance().store(group="algo", name="grpo_schema", node=GRPOAlgoConfig)
ConfigStore.instance().store(group="algo", name="ppo_schema", node=PPOAlgoConfig)


def env_entries(cfg: DictConfig) -> dict[str, EnvEntry]:
    """The configured environments, each checked against EnvEntry's fields."""
    entries = {}
    for env_id, entry in cfg.env.envs.items():
        data = OmegaConf.to_container(entry, resolve=True) if entry is not None else {}
        if not isinstance(data, dict):
            raise ConfigError(f"env.envs.{env_id} must be a mapping of kwargs / teacher / weight, got {data!r}")
        unknown = set(data) - {f.name for f in fields(EnvEntry)}
        if unknown:
            raise ConfigError(f"env.envs.{env_id}: unknown key(s) {sorted(unknown)}; known: kwargs, teacher, weight")
        entries[env_id] = EnvEntry(**data)
    return entries


# --- checks that need more than types -----------------------------------------------------------
def _check_envs(cfg: DictConfig) -> None:
    if not cfg.env.envs:
        raise ConfigError("env.envs is empty: name at least one environment id")
    for env_id, entry in env_entries(cfg).items():
        module, _, name = env_id.rpartition(":")
        try:
            if module:  # gymnasium's "module:EnvId-v0" form: importing the module registers the env
                importlib.import_module(module)
            gym.spec(name)
        except ImportError as err:
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
        get_method(node._target_)
    except Exception as err:
        raise ConfigError(f"{group}._target_={node._target_!r} cannot be imported: {err}") from None
    return node._target_


SCRIPTED_TEACHER = "rl_agents.teachers.scripted_teacher"
OPENAI_TEACHER = "rl_agents.teachers.openai_teacher"
TINY_MODEL = "rl_agents.model.tiny_policy"
PRETRAINED_MODEL = "rl_agents.model.pretrained_policy"


def _check_teacher(cfg: DictConfig) -> None:
    target = _check_target(cfg, "teacher")
    if target == SCRIPTED_TEACHER:
        for env_id, entry in env_entries(cfg).items():
            env_target = entry.teacher.get("_target_")
            if not env_target:
                raise ConfigError(f"env.envs.{env_id}.teacher has no _target_: teacher=scripted needs one")
            try:
                get_class(env_target)
            except Exception as err:
                raise ConfigError(
                    f"env.envs.{env_id}.teacher._target_={env_target!r} cannot be imported: {err}"
                ) from None
    elif target == OPENAI_TEACHER and not cfg.teacher.model:
        raise ConfigError("teacher=openai needs teacher.model (the served model's name)")
    if not 0.0 <= cfg.teacher.noise <= 1.0:
        raise ConfigError(f"teacher.noise must be in [0, 1], got {cfg.teacher.noise}")


def _check_model(cfg: DictConfig) -> None:
    target = _check_target(cfg, "model")
    if target == PRETRAINED_MODEL and not cfg.model.name_or_path:
        raise ConfigError("model=hf needs model.name_or_path (a Hugging Face model name or a local directory)")
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
        if cfg.model.copy_pretrain_steps < 0:
            raise ConfigError(f"model.copy_pretrain_steps must be >= 0, got {cfg.model.copy_pretrain_steps}")
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
    else:
        if distributed.world_size() > 1:
            raise ConfigError(
                "algo=ppo runs in one process; under a distributed launch use algo=grpo (TRL's data-parallel GRPO)"
            )
        if algo.epochs <= 0:
            raise ConfigError(f"algo.epochs must be positive, got {algo.epochs}")
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
    if cfg.peft.enabled:
        raise ConfigError("the rl stage trains full weights for now: run it with peft=none (LoRA RL is not built yet)")
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
              "bc.logging_steps", "bc.save_total_limit"]  # fmt: skip
    _at_least(cfg, (["collect.episodes"] if "collect" in cfg.stages else []) + counts, 1)
    _at_least(cfg, ["bc.learning_rate"], 0, strict=True)
    _at_least(cfg, ["bc.weight_decay", "bc.warmup_steps"], 0)
    if cfg.bc.max_length < 32:
        raise ConfigError(f"bc.max_length must be >= 32 tokens (a prompt and a turn), got {cfg.bc.max_length}")
    if cfg.model._target_ == TINY_MODEL and cfg.bc.max_length > cfg.model.max_position_embeddings:
        raise ConfigError(
            f"bc.max_length={cfg.bc.max_length} exceeds model.max_position_embeddings="
            f"{cfg.model.max_position_embeddings}"
        )
    if "rl" in cfg.stages and cfg.algo is not None:
        _at_least(cfg, ["algo.learning_rate", "algo.critic_learning_rate"], 0, strict=True)


def validate_train(cfg: DictConfig, run_dir: Path) -> None:
    """Every check a training run needs before its first stage."""
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
