"""Config composition: the schema rejects typos and bad types; validation names what is wrong before work."""

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import open_dict
from omegaconf.errors import ValidationError

import rl_agents.config  # noqa: F401  (registers the schemas)
from rl_agents.config import ConfigError
from rl_agents.validate import validate_evaluate, validate_train

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def _compose(overrides=(), name="train"):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def test_default_config_composes_and_validates(tmp_path):
    cfg = _compose()
    assert list(cfg.stages) == ["collect", "bc", "eval"] and list(cfg.env.envs) == ["Calculator-v0"]
    assert cfg.model._target_.endswith("tiny_policy") and cfg.logger._target_.endswith("wandb_tracking")
    assert cfg.teacher._target_.endswith("scripted_teacher")
    validate_train(cfg, tmp_path)


@pytest.mark.parametrize("group", ["env=sql", "env=calculator_sql", "peft=lora", "logger=none", "budget=smoke"])
def test_every_group_option_composes(group, tmp_path):
    validate_train(_compose([group]), tmp_path)


def test_the_default_recipe_pinned_is_the_default():
    """recipe=merged pins today's defaults: composing it changes nothing (when a default moves, the pinned
    recipe is renamed and a new one pins the new default)."""
    assert _compose(["+recipe=merged"]) == _compose()
    assert _compose(["+recipe=shuffled"]).model.merge_across_words != _compose().model.merge_across_words
    assert _compose(["+recipe=induction"]).bc.batching != _compose().bc.batching


def test_the_mixed_env_carries_each_envs_own_settings():
    """env=mix holds every environment as its own env=<name> config does (teacher and keywords), with the runtime
    and collection settings the most demanding of them needs (turns, sandbox threads, collection workers)."""
    mix = _compose(["env=mix"])
    singles = [_compose([f"env={name}"]) for name in ("calculator", "sql", "shop", "code", "frozenlake", "taxi")]
    assert set(mix.env.envs) == {env_id for cfg in singles for env_id in cfg.env.envs}
    for cfg in singles:
        for env_id, entry in cfg.env.envs.items():
            assert mix.env.envs[env_id].teacher == entry.teacher and mix.env.envs[env_id].kwargs == entry.kwargs
    for key in ("runtime.max_turns", "runtime.env_workers", "collect.workers"):
        section, name = key.split(".")
        assert mix[section][name] == max(cfg[section][name] for cfg in singles), key


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(CONF) / "experiment").glob("*.yaml")))
def test_every_experiment_composes_and_validates(name, tmp_path):
    """Each published result's recipe (docs/results.md cites them) still composes and passes validation."""
    cfg = _compose([f"experiment={name}"])
    validate_train(cfg, tmp_path)
    env = name.removeprefix("compile_").removeprefix("induction_").split("_")[0]
    assert cfg.env.name == env  # <env>_..., compile_<env> or induction_<env>...


def test_hf_model_and_openai_teacher_compose_with_their_settings(tmp_path):
    saved = tmp_path / "model"
    saved.mkdir()
    (saved / "config.json").write_text("{}")
    validate_train(
        _compose(["model=hf", f"model.name_or_path={saved}", "teacher=openai", "teacher.model=gpt"]), tmp_path
    )


@pytest.mark.parametrize(
    "path, message",
    [("missing/model/dir", "no such directory"), (".", "holds no model (no config.json)")],
)
def test_a_pretrained_model_that_is_not_there_fails_before_any_work(tmp_path, path, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_train(_compose(["model=hf", f"model.name_or_path={path}"]), tmp_path)


def test_threads_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match="threads must be positive"):
        validate_train(_compose(["threads=0"]), tmp_path)


@pytest.mark.parametrize(
    "override",
    [
        "bc.bogus=1",
        "bc.max_steps=abc",
        "runtime.greedy=maybe",
        "algo.bogus=1",
        "algo.group_size=abc",
        "algo.kl_in=loss",  # a PPO key under algo=grpo
        "rl.steps=many",
        "stages=[collect,train]",  # closed choices are enums: any other value fails at composition
        "eval.split=holdout",
        "collect.keep=some",
        "logger.mode=sometimes",
        "model.dtype=int8",
        "rl.mixed_precision=fp8",
        "rl.on_malformed=ignore",
        "algo.scale_rewards=std",
    ],
)
def test_schema_rejects_unknown_keys_and_bad_types(override):
    with pytest.raises((ConfigCompositionException, ValidationError)) as err:
        _compose([override])
    assert override.split("=")[0].split(".")[-1] in str(err.value) + str(err.value.__cause__)


@pytest.mark.parametrize(
    ("override", "choices"), [("algo.kl_in=both", "reward, loss"), ("algo.gae_level=step", "token, turn")]
)
def test_a_closed_choice_is_refused_with_the_choices_named(override, choices):
    with pytest.raises((ConfigCompositionException, ValidationError)) as err:
        _compose(["algo=ppo", override])
    message = str(err.value) + str(err.value.__cause__)
    assert override.split("=")[0] in message and f"expected one of [{choices}]" in message


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["+env.envs.Calcuator-v0.weight=1.0"], "unknown env 'Calcuator-v0'"),
        (["model=hf"], "model.name_or_path"),
        (["teacher=openai"], "teacher.model"),
        (["teacher.noise=1.5"], "teacher.noise"),
        (["collect.episodes=2000000"], "overlap"),
        (["stages=[bc]"], "trajectories=PATH"),
        (["trajectories=/nope.jsonl"], "/nope.jsonl"),
        (["stages=[eval]"], "bc stage"),
        (["runtime.max_turns=0"], "runtime.max_turns"),
        (["runtime.draft_tokens=-1"], "runtime.draft_tokens"),
        (["runtime.draft_tokens=4", "runtime.draft_ngram=0"], "runtime.draft_ngram"),
        (["runtime.draft_budget=0"], "runtime.draft_budget"),
        (["runtime.env_workers=-1"], "runtime.env_workers"),
        (["runtime.env_workers=2", "runtime.draft_tokens=4", "runtime.greedy=false"], "sampled drafts"),
        (["runtime.processes=0"], "runtime.processes"),
        (["runtime.processes=2", "runtime.draft_tokens=4", "runtime.greedy=false"], "processes > 1 with sampled"),
        (["stages=[collect,bc,rl]", "runtime.processes=2"], "RL rollouts run in one process"),
        (["+env.envs.Calculator-v0.bogus=1"], "unknown key"),
        (["env.envs.Calculator-v0.weight=0"], "weight must be positive"),
        (["logger.kind=none"], "logger.kind is gone: choose the option with the group"),
        (["model.kind=hf"], "model.kind is gone"),
        (["logger._target_=my_pkg.nope"], "logger._target_='my_pkg.nope' cannot be imported"),
        (["model._target_=rl_agents.model.nope"], "model._target_='rl_agents.model.nope' cannot be imported"),
        (["+env.envs.Calculator-v0.kwargs.split=test"], "the pipeline sets the split"),
        (["model.number_chunk=0"], "model.number_chunk"),
        (["model.number_tokens=true", "model.number_chunk=4"], "model.number_tokens with model.number_chunk=4"),
        (["model.num_heads=3"], "multiple of model.num_heads"),
        (["model.copy_pretrain_steps=-1"], "model.copy_pretrain_steps"),
        (["model.copy_pretrain_steps=10", "model.copy_pretrain_span=600"], "model.copy_pretrain_span=600"),
        (["model.copy_pretrain_rounds=0"], "model.copy_pretrain_rounds"),
        (["model.copy_pretrain_target=1.5"], "model.copy_pretrain_target"),
        (["env.envs.Calculator-v0.teacher._target_=envs.nope.Teacher"], "cannot be imported"),
        (["stages=[rl,eval]", "eval.policies=[rl]"], "starts from the BC policy"),
        (["stages=[eval]", "eval.policies=[rl]"], "rl stage"),
        (["stages=[collect,bc,rl]", "algo.group_size=3"], "algo.group_size=3"),
        (["stages=[collect,bc,rl]", "rl.minibatch_size=12"], "rl.minibatch_size=12"),
        (["stages=[collect,bc,rl]", "algo.updates_per_batch=3"], "algo.updates_per_batch=3 must divide the 4"),
        (["stages=[collect,bc,rl]", "algo.updates_per_batch=4", "algo.num_iterations=2"], "rl.save_steps=20"),
        (["stages=[collect,bc,rl]", "algo=ppo", "algo.critic_lam=1.5"], "algo.critic_lam"),
        (["stages=[collect,bc,rl]", "algo=ppo", "algo.target_kl=0"], "algo.target_kl"),
        (["stages=[collect,bc,rl]", "algo=ppo", "algo.updates_per_batch=3"], "algo.updates_per_batch=3 must divide rl"),
        (["stages=[collect,bc,rl]", "algo=ppo", "algo.clip_high=-0.1"], "algo.clip_high"),
        (["stages=[collect,bc,rl]", "algo=ppo", "algo.positive_lm_coef=-1"], "algo.positive_lm_coef"),
        (["stages=[collect,bc,rl]", "algo=ppo", "rl.steps=5", "algo.critic_warmup_steps=5"], "critic_warmup_steps=5"),
        (["stages=[collect,bc,rl]", "rl.init_from=/nope"], "rl.init_from='/nope'"),
        (["stages=[collect,bc,rl]", "peft=lora", "rl.ref_from=/elsewhere"], "must be rl.init_from"),
        (["eval.policies=[teacher,mystery]"], "unknown eval.policies"),
        (["eval.temperature=0"], "eval.temperature"),
        (["collect.episodes=0"], "collect.episodes must be >= 1, got 0"),
        (["collect.workers=0"], "collect.workers must be >= 1, got 0"),
        (["collect.perturb=1.0"], "collect.perturb must be in"),
        (["eval.episodes=-1"], "eval.episodes must be >= 1, got -1"),
        (["bc.max_steps=0"], "bc.max_steps must be >= 1"),
        (["bc.batch_size=0"], "bc.batch_size must be >= 1"),
        (["bc.length_bucket=0"], "bc.length_bucket must be >= 1, got 0"),
        (["bc.learning_rate=-0.001"], "bc.learning_rate must be > 0"),
        (["seed=-1"], "seed must be >= 0"),
        (["env.train_seed_start=-5"], "env.train_seed_start must be >= 0"),
        (["bc.max_length=1"], "bc.max_length must be >= 32"),
        (["bc.max_length=4096"], "bc.max_length=4096 exceeds model.max_position_embeddings=1024"),
        (["model.vocab_size=10"], "model.vocab_size must be at least"),
        (["runtime.max_context=3000"], "runtime.max_context=3000 exceeds model.max_position_embeddings=1024"),
        (["stages=[collect,bc,rl]", "algo.learning_rate=0"], "algo.learning_rate must be > 0"),
        (["stages=[collect,bc,rl]", "algo=ppo", "algo.critic_learning_rate=-1"], "algo.critic_learning_rate"),
    ],
)
def test_validation_fails_fast_naming_the_problem(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("[", r"\[")):
        validate_train(_compose(overrides), tmp_path)


def test_trajectories_and_collect_together_are_refused(tmp_path):
    """Either the teacher collects BC's data or a file gives it; both at once would silently drop one."""
    data = tmp_path / "train.jsonl"
    data.write_text("")
    with pytest.raises(ConfigError, match="drop collect"):
        validate_train(_compose([f"trajectories={data}"]), tmp_path)
    validate_train(_compose([f"trajectories={data}", "stages=[bc,eval]"]), tmp_path)


def test_a_users_env_is_added_from_the_command_line(tmp_path):
    """A user's env in the 'module:Id' form, with its teacher by _target_, and no change to the package."""
    cfg = _compose(["~env.envs.Calculator-v0", "+env.envs.SQL-v0.teacher._target_=envs.sql.SQLTeacher"])
    validate_train(cfg, tmp_path)
    assert list(cfg.env.envs) == ["SQL-v0"]
    # the "module:Id" form (Hydra overrides cannot hold ':', so it comes from an env YAML file)
    with open_dict(cfg):
        cfg.env.envs = {"envs:SQL-v0": {"teacher": {"_target_": "envs.sql.SQLTeacher"}}}
    validate_train(cfg, tmp_path)


def test_evaluate_config_needs_a_real_checkpoint(tmp_path):
    cfg = _compose([f"checkpoint={tmp_path}"], name="evaluate")
    with pytest.raises(ConfigError, match="not a saved policy"):
        validate_evaluate(cfg)


def test_the_default_budget_is_the_schemas_own_defaults():
    """budget/default.yaml writes out the schema's defaults (so that budget=smoke can swap them): a library user
    constructing the dataclasses gets the same run as the command line."""
    import yaml
    from omegaconf import OmegaConf

    from rl_agents.config import TrainConfig

    budget = yaml.safe_load((Path(CONF) / "budget" / "default.yaml").read_text())
    schema = OmegaConf.structured(TrainConfig)
    for group, values in budget.items():
        for key, value in values.items():
            assert schema[group][key] == value, f"{group}.{key}: schema {schema[group][key]}, budget {value}"


@pytest.mark.parametrize("quota, expected", [("max 100000", None), ("100000 100000", 1), ("50000 100000", 1)])
def test_the_cpu_budget_honours_a_cgroup_quota(tmp_path, quota, expected):
    """threads=null: torch's threads are the CPUs this process may use, a container's quota included."""
    import os

    from rl_agents.distributed import cpu_budget

    (tmp_path / "cpu.max").write_text(quota + "\n")
    affinity = len(os.sched_getaffinity(0))
    assert cpu_budget(tmp_path / "cpu.max") == (expected or affinity)
    assert cpu_budget(tmp_path / "missing") == affinity
