"""Pretrained models and LoRA end to end, on small models saved locally as a user's would be: Llama (untied
embeddings) and Qwen2 (tied), BC with LoRA, the saved adapter and policy, and the chat template they carry."""

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
