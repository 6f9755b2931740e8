"""Pretrained models and LoRA end to end, on small models saved locally as a user's would be: Llama (untied
embeddings) and Qwen2 (tied), BC with LoRA, the saved adapter and policy, and the chat template they carry."""

from pathlib import Path

import pytest
import torch

from rl_agents.bc import train_bc
from rl_agents.config import BCConfig
from rl_agents.model import load_policy, lora_config
from rl_agents.trajectory import SPECIAL_TOKENS, chat_messages, encode_trajectory
from tests.helpers.pretrained import save_pretrained_like


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def lora_run(request, tmp_path_factory, calculator_data):
    """A short BC run with LoRA from a locally saved pretrained-style model."""
    root = tmp_path_factory.mktemp(f"lora_{request.param}")
    base = save_pretrained_like(root / "base", request.param)
    model, tokenizer = load_policy(base, local_files_only=True)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    new_ids = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    peft = lora_config(8, 16, 0.0, "all-linear", new_ids)
    config = BCConfig(max_steps=8, batch_size=4, max_length=256, learning_rate=1e-2, logging_steps=4, save_steps=100)
    policy = train_bc(calculator_data[:32], model, tokenizer, root / "bc", config, seed=0, peft_config=peft)
    return request.param, base, root / "bc", policy, before, new_ids


def test_lora_trains_the_added_tokens_and_leaves_the_base_frozen(lora_run):
    architecture, _, _, policy, before, new_ids = lora_run
    model, tokenizer = load_policy(policy, local_files_only=True)
    embed = model.get_input_embeddings().weight.detach()
    old = before["model.embed_tokens.weight"]
    assert embed.shape == old.shape
    keep = torch.ones(len(embed), dtype=torch.bool)
    keep[new_ids] = False
    assert torch.equal(embed[keep], old[keep])  # the pretrained vocabulary is untouched
    assert not torch.allclose(embed[new_ids], old[new_ids])  # the format's tokens were trained
    # the merged LoRA deltas changed the attention and MLP weights
    merged = dict(model.named_parameters())
    assert not torch.allclose(
        merged["model.layers.0.self_attn.q_proj.weight"], before["model.layers.0.self_attn.q_proj.weight"]
    )
    if architecture == "qwen2":  # tied: the output embeddings are the input ones, trained rows included
        assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_the_adapter_loads_on_its_base_as_the_merged_policy(lora_run):
    """bc/adapter holds the tokenizer: the base is resized for the added tokens before the adapter loads."""
    _, base, bc_dir, policy, _, _ = lora_run
    merged, tokenizer = load_policy(policy, local_files_only=True)
    adapted, adapter_tokenizer = load_policy(bc_dir / "adapter", local_files_only=True)
    assert adapter_tokenizer.get_vocab() == tokenizer.get_vocab()
    ids = torch.tensor([tokenizer("<|im_start|>user\nWhat is 3 * 4?<|im_end|>")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids).logits, merged(ids).logits, atol=1e-4, rtol=1e-4)


def test_the_saved_tokenizer_renders_the_training_format(lora_run, calculator_data):
    """apply_chat_template of a teacher trajectory's messages gives the BC token ids exactly."""
    _, _, _, policy, _, _ = lora_run
    _, tokenizer = load_policy(policy, local_files_only=True)
    for trajectory in calculator_data[:20]:
        rendered = tokenizer.apply_chat_template(chat_messages(trajectory), tokenize=True, return_dict=False)
        assert list(rendered) == encode_trajectory(trajectory, tokenizer).input_ids


# --- the rl stage with LoRA --------------------------------------------------------------------------------------
def _rl_cfg(policy_dir, *overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        return compose("train", ["budget=smoke", "logger=none", "stages=[rl]", f"rl.init_from={policy_dir}",
                                 "runtime.max_new_tokens=48", "peft=lora", *overrides])  # fmt: skip


def _same_logits(a_dir, b_dir, tokenizer):
    a, _ = load_policy(a_dir, local_files_only=True)
    b, _ = load_policy(b_dir, local_files_only=True)
    ids = torch.tensor([tokenizer("<|im_start|>user\nWhat is 3 * 4?<|im_end|>")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, atol=1e-4, rtol=1e-4)


def test_ppo_with_lora_takes_its_reference_from_the_disabled_adapter(tmp_path, tiny_policy, fresh_accelerate_state):
    """No reference copy: the reference log-probabilities are the policy's with its adapter disabled, which are
    the starting (BC) policy's, before and after the adapter trained; the saved adapter is the saved policy."""
    from rl_agents import tracking
    from rl_agents.ppo import PPO, build_batch, token_logprobs
    from rl_agents.rl import sample_episodes, save_rl_policy

    policy_dir, model, tokenizer = tiny_policy
    cfg = _rl_cfg(policy_dir, "algo=ppo", "rl.steps=2", "algo.learning_rate=1e-2", "algo.warmup_steps=0",
                  "rl.shaping.per_turn=-0.1", "rl.temperature=1.5", "algo.critic_warmup_steps=0")  # fmt: skip
    ppo = PPO(cfg, policy_dir, policy_dir, tmp_path / "rl", tracking.Tracker())
    assert ppo.reference is None
    trainable = [name for name, p in ppo.policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    episodes = sample_episodes(cfg, model, tokenizer, {"Calculator-v0": list(range(4))}, step=0)
    batch = build_batch(episodes, tokenizer, cfg.rl)
    mask = batch.action_mask.bool()
    with torch.no_grad():
        bc = token_logprobs(model, batch, cfg.rl.temperature)[0]
    start = ppo.score(batch)
    assert torch.equal(start["logp"][mask], start["ref_logp"][mask])  # a fresh adapter is the identity
    ppo.iteration()
    ppo.iteration()
    moved = ppo.score(batch)
    assert (moved["logp"][mask] - moved["ref_logp"][mask]).abs().max() > 1e-4  # the adapter trained
    torch.testing.assert_close(moved["ref_logp"][mask], bc[mask], atol=1e-5, rtol=1e-5)  # the reference did not
    out = save_rl_policy(ppo.accelerator.unwrap_model(ppo.policy), tokenizer, tmp_path / "rl")
    assert (tmp_path / "rl" / "adapter" / "adapter_config.json").is_file()
    _same_logits(tmp_path / "rl" / "adapter", out, tokenizer)


def test_grpo_with_lora_trains_an_adapter_against_the_starting_policy(tmp_path, lora_run, fresh_accelerate_state):
    """From the BC policies of both architectures (Llama untied, Qwen2 tied)."""
    from accelerate.utils import is_peft_model

    from rl_agents import tracking
    from rl_agents.grpo import make_trainer, train_grpo

    policy_dir = lora_run[3]
    _, tokenizer = load_policy(policy_dir, local_files_only=True)
    cfg = _rl_cfg(policy_dir, "algo=grpo", "rl.steps=1")
    trainer = make_trainer(cfg, policy_dir, policy_dir, tmp_path / "probe", tracking.Tracker())
    assert is_peft_model(trainer.model) and trainer.ref_model is None  # TRL disables the adapter for the reference
    assert all("lora_" in name for name, p in trainer.model.named_parameters() if p.requires_grad)
    policy = train_grpo(cfg, policy_dir, policy_dir, tmp_path / "rl", tracking.Tracker())
    _same_logits(tmp_path / "rl" / "adapter", policy, tokenizer)
