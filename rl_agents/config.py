"""Structured configs: the schema the YAML files in ``conf/`` extend.

The dataclasses are registered in Hydra's ConfigStore, so an unknown key (``bc.bogus=1``), a value of the
wrong type (``bc.max_steps=abc``) or outside a closed choice (``eval.split=holdout``) fails at composition
with the key's name. ``rl_agents.validate`` then checks what a schema cannot, before the first stage starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from rl_agents.runtime import RuntimeConfig

POLICIES = ("teacher", "bc", "dagger", "rl")


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and what to do."""


# --- closed choices: composition refuses any other value, naming the key and the choices ---------
class StrEnum(str, Enum):
    """An enum whose members are their string values (``enum.StrEnum``, which Python 3.10 lacks): they compare
    equal to, format and serialise as those strings."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


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


class Batching(StrEnum):
    """bc.batching: which episodes share a BC batch, and in what order the batches come."""

    random = "random"  # each batch a random sample of the data (the most padding)
    length = "length"  # batches of episodes of similar length (little padding), in random order
    length_sorted = "length_sorted"  # transformers' group_by_length: such batches, each run of 50 longest first


class Malformed(StrEnum):
    """collect.malformed: what becomes of a kept episode's malformed teacher turns."""

    mask = "mask"
    drop = "drop"
    keep = "keep"


class Keep(StrEnum):
    """collect.keep: success (rejection sampling) or all (every teacher episode)."""

    success = "success"
    all = "all"


class DAggerKeep(StrEnum):
    """dagger.keep: which round's policy the stage returns."""

    best_val = "best_val"
    last = "last"


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
    lr_scheduler_kwargs: dict[str, Any] = field(default_factory=dict)
    """the scheduler's own arguments (transformers' ``lr_scheduler_kwargs``), e.g. ``cosine_with_min_lr``'s floor:
    ``bc.lr_scheduler_type=cosine_with_min_lr +bc.lr_scheduler_kwargs.min_lr_rate=0.5``"""
    warmup_steps: float = 0.05
    """a fraction of max_steps when below 1"""
    weight_decay: float = 0.0
    adam_beta2: float = 0.999
    max_length: int = 1024
    """longest training sequence, in tokens"""
    packing: bool = False
    """pack sequences (best-fit decreasing, padding-free) instead of padding them (best on GPUs)"""
    batching: Batching = Batching.length
    """random | length | length_sorted (ignored when packing). ``length_sorted`` (the earlier recipes) orders
    each run of 50 batches from the longest episodes to the shortest: the steps are not i.i.d., the loss jumps
    every 50 steps and BC fails on tasks it learns otherwise (docs/results.md#length-grouped-batches)"""
    length_bucket: int = 50
    """bc.batching=length: batches per sorted run (``bc.LengthBatches``). Fewer pad more and mix more distinct
    episodes into a batch: on data with many repeats of few tasks (TaxiText-v0), runs of 50 put copies of the
    same task together (docs/results.md#taxitext-v0-in-30-minutes); 1 is random batches"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass: less memory for large models, slower steps (11% on the tiny one)"""
    torch_compile: bool = False
    """compile the model's training step with ``torch.compile`` (transformers' ``torch_compile``): a minute or
    two of compilation, then faster steps where elementwise work dominates (small models, CPUs)"""
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int = 2
    copy_mix: float = 0.1
    """rehearsal: synthetic copy rows (random tokens repeated, loss on the repeat) mixed into the BC data, as a
    fraction of its episodes, so that tokens BC never sees (unseen ids) stay copyable; 0 = off (docs/results.md)"""
    copy_span: int = 32
    """tokens per copy row's span (each row holds it twice)"""
    copy_fixed_offset: bool = False
    """copy rows repeat each span at a varying distance, the task that keeps an induction head (copy
    pretraining's default); true: at once, the fixed-offset task (``model.copy_pretrain_fixed_offset=true``)"""
    copy_augment: float = 0.0
    """counterfactual copies: extra episodes, this fraction of the data, in which every value the agent copies
    from the task or an observation (a number; a one-letter literal such as 'u') is replaced everywhere by a
    random one of its kind, so that writing a plausible value instead of reading it stops paying
    (``bc.counterfactual_copies``); 0 = off"""


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
    """episodes per forward/backward pass (PPO: per optimizer update unless algo.updates_per_batch; GRPO: accumulated
    to one update a step)"""
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
    keep: DAggerKeep = DAggerKeep.best_val
    """the policy the stage returns (dagger/policy): best_val, the round with the highest validation success (the
    later one on a tie; the last without val_episodes), as the paper returns the best of its iterates on
    validation; last: the last round's"""


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
    updates_per_batch: int = 1
    """optimizer updates per pass over a generation batch, each on an equal slice of its episodes (1: the whole
    batch accumulated into one update); a batch gives updates_per_batch x num_iterations of the rl.steps"""
    epsilon: float = 0.2
    """clipping range of the importance ratio"""
    loss_type: str = "dapo"
    """TRL's loss aggregation: dapo (token-level), grpo (per sequence), dr_grpo, bnpo"""
    scale_rewards: ScaleRewards = ScaleRewards.group
    """advantage scaling: group, batch or none"""
    gamma: float = 1.0
    """per-turn discount of the episode's return: a reward earned at turn t counts gamma**t (1.0: none)"""


@dataclass
class PPOAlgoConfig(AlgoConfig):
    name: str = "ppo"
    kl_in: KLIn = KLIn.loss
    """where the KL penalty goes: reward (per-token -beta*KL in the reward) or loss (beta*KL added to the loss)"""
    critic_learning_rate: float = 1e-3
    epochs: int = 1
    """passes over each step's episodes"""
    updates_per_batch: int | None = 1
    """optimizer updates per pass, each on an equal slice of the step's episodes, its gradient accumulated over
    forward passes of rl.minibatch_size episodes (GRPO's key); null: one update per rl.minibatch_size episodes"""
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
    merge_across_words: bool = True
    number_tokens: bool = True
    """tiny only: every digit string of up to number_chunk (<= 3) digits is a token, whatever the trajectories hold"""
    number_values: bool = False
    """tiny only: each number token's embedding starts with its value written in (order and digits,
    ``rl_agents.model.write_number_values``), held through copy pretraining"""
    number_order_scale: float = 3.0
    """tiny, with number_values: the order feature's size, in units of the embedding's initial std (the digits' is 3)"""
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    max_position_embeddings: int = 1024
    copy_pretrain_steps: int = 1000
    """tiny only: steps of synthetic copy pretraining (random tokens, repeated) before BC; 0 = off"""
    copy_pretrain_span: int = 32
    """length of each random span the copy pretraining repeats (the longest, without fixed_offset)"""
    copy_pretrain_learning_rate: float = 1e-3
    """copy pretraining's peak learning rate (cosine schedule); an induction head forms at 1e-3, not at 3e-3"""
    copy_pretrain_rounds: int = 3
    """at most this many cycles of copy_pretrain_steps: another runs (a warm restart) while the greedy accuracy on
    held-out rows of the copy task is below copy_pretrain_target (``rl_agents.model.copy_pretrain``); 1: one cycle"""
    copy_pretrain_target: float = 0.5
    """the held-out copy accuracy that ends copy pretraining after a cycle"""
    copy_pretrain_fixed_offset: bool = False
    """false: each span's repeat comes at a varying distance, which only an induction head solves
    (``rl_agents.model.copy_rows``). true: each span repeated at once, at a fixed distance, which a positional
    head solves without copying by content (the earlier recipe, ``recipe=fixed_offset``)"""
    previous_token_head: bool = True
    """copy pretraining starts from a previous-token head built by hand (``rl_agents.model.wire_previous_token_head``),
    the first half of an induction head; on the varying-distance task the second half forms in the default steps
    (without it, not in 1,500: docs/results.md#an-induction-head-from-copy-pretraining)"""


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
    """the environment variable that holds the key (unset with a base_url: a placeholder, as local servers take)"""
    temperature: float = 0.0
    max_tokens: int = 512
    timeout_s: float = 60.0
    """per request"""
    max_retries: int = 4
    """retries of a request that timed out, could not connect, or got a 429 or a 5xx (a 4xx stops the run)"""
    backoff_s: float = 1.0
    """the first retry's wait; each next one doubles it"""
    requests_per_s: float | None = None
    """null: no rate limit"""
    concurrency: int = 8
    """episodes collected at once (one request in flight each)"""
    price_input_per_1m: float = 0.0
    """dollars per million prompt tokens, for the cost in collect_stats.json"""
    price_output_per_1m: float = 0.0
    max_failure_rate: float = 0.5
    """the collection stops when more of the last health_check_after turns than this got no reply after their
    retries (the endpoint is down) ..."""
    max_malformed_rate: float = 0.5
    """... or when more of its last replies than this were malformed (the prompt or the model is wrong)"""
    health_check_after: int = 20
    """the window of recent turns those rates are measured on"""
    native_tools: bool = False
    """send the tools as OpenAI ``tools`` and read the endpoint's ``tool_calls`` (a server with native tool
    calling, such as rl_agents.serve's tool-calling mode) instead of the system prompt's text format"""


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
    malformed: Malformed = Malformed.mask
    """a kept episode's malformed teacher turns: mask (context only, out of the loss: the recovery after the
    error observation is still learned), drop (the whole episode), keep (cloned like any turn)"""
    workers: int = 1
    """episodes a scripted teacher collects at once, each thread with its own copy of the teacher and environment
    (pays where steps wait on a sandbox or a slow tool; an LLM teacher runs teacher.concurrency at once)"""
    perturb: float = 0.0
    """per-turn probability that the teacher's ``perturbation`` (a random action, for the planner teachers) is
    taken in place of its own action, as context only: the episodes then show the states off the expert's path
    and the teacher's recovery from them (DART, Laskey et al., 2017); 0: the expert's own episodes"""


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
    """progress bars (collection, and transformers', datasets' and the Hub's); false silences them all"""
    threads: int | None = None
    """torch's CPU threads in this process; null: the CPUs it may use (affinity, cgroup quota), shared among the
    processes of a distributed launch and the parallel jobs of a joblib sweep"""
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
    threads: int | None = None
    """torch's CPU threads; null: OMP_NUM_THREADS if set, else the CPUs this process may use"""
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


def grpo_minibatches(rl: RLConfig | DictConfig, processes: int) -> int:
    """One GRPO generation batch (rl.episodes_per_step over all processes) in one process's minibatches."""
    return rl.episodes_per_step // (rl.minibatch_size * processes)


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


# The builders of the default group options (the checks that apply to one of them test for it).
SCRIPTED_TEACHER = "rl_agents.teachers.scripted_teacher"
OPENAI_TEACHER = "rl_agents.teachers.openai_teacher"
TINY_MODEL = "rl_agents.model.tiny_policy"
PRETRAINED_MODEL = "rl_agents.model.pretrained_policy"
