"""Small "pretrained" models saved locally, as a user's checkpoint would be: a byte-level BPE tokenizer that
lacks the trajectory format's special tokens, and a model of a given architecture (Llama with untied
embeddings, Qwen2 with tied ones, as many small instruct models have)."""

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

CORPUS = [
    "What is 12 * 34 - 5? Use the calculator tool and answer with the result.",
    '{"name": "calculator", "arguments": {"expression": "12 * 34 - 5"}} 403 The answer is 403.',
    "SELECT name FROM items WHERE price > 10 ORDER BY price; What does item413 cost? It costs 17.",
] * 20


def save_pretrained_like(path: Path, architecture: str = "qwen2", vocab_size: int = 600, seed: int = 0) -> Path:
    """Save a tokenizer and a randomly initialised small model of ``architecture`` (``llama``: untied
    embeddings; ``qwen2``: tied) to ``path``; returns ``path``."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", model_max_length=1024)
    sizes = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    if architecture == "llama":
        model = LlamaForCausalLM(LlamaConfig(**sizes, tie_word_embeddings=False))
    elif architecture == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**sizes, tie_word_embeddings=True))
    else:
        raise ValueError(f"architecture: llama or qwen2, got {architecture!r}")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)
