"""Policies: build the tiny default model, load a user's pretrained model, wrap with LoRA.

Every stage loads a policy the same way, with ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained``
on a directory, so the tiny model (built here from a config and a tokenizer trained locally on the
run's own trajectories, nothing downloaded) and a real checkpoint follow the same path.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from rl_agents import rundir
from rl_agents.trajectory import CHAT_TEMPLATE, END_OF_TURN, SPECIAL_TOKENS, Trajectory

log = logging.getLogger(__name__)
PAD = "<|pad|>"


def trajectory_texts(trajectories: Iterable[Trajectory]) -> Iterable[str]:
    """Every piece of text a trajectory puts in a sequence: the tokenizer's training corpus."""
    for trajectory in trajectories:
        yield f"user\n{trajectory.task}\nassistant\n"
        for turn in trajectory.turns:
            yield turn.agent
            if turn.observation:
                yield f"user\n\n{turn.observation}\n\nassistant\n"


def build_tokenizer(
    corpus: Iterable[str],
    vocab_size: int = 2048,
    number_chunk: int = 3,
    merge_across_words: bool = False,
    number_tokens: bool = False,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``corpus``, numbers cut in chunks of up to ``number_chunk`` digits.

    Byte-level means any text can be encoded; the corpus only decides which merges exist. Numbers are
    split as GPT-4's tokenizer splits them: a small model copies "305|472" far more easily than six
    single digits, whose repeats make the copy position ambiguous. With ``merge_across_words`` the BPE
    merges are not confined to words (no GPT-2 word regex, as SentencePiece without whitespace
    splitting): a workflow's fixed boilerplate such as ``", "arguments": {"expression": "`` becomes one
    token, and sequences get shorter (about 30% on Calculator-v0), so training and decoding are faster.
    With ``number_tokens`` every digit string of up to ``number_chunk`` digits is a token of its own, whatever
    the corpus holds (1,110 tokens beyond ``vocab_size`` for chunks of 3): a number is cut the same way whether
    or not training saw it, into tokens that copy pretraining trains, where the corpus's merges would cut an
    unseen id into pieces BC never saw. Training is deterministic.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(rf"[0-9]{{1,{number_chunk}}}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=not merge_across_words),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, *SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        eos_token=END_OF_TURN,
        extra_special_tokens=[t for t in SPECIAL_TOKENS if t != END_OF_TURN],
        model_max_length=4096,
        chat_template=CHAT_TEMPLATE,
    )
    if number_tokens:  # matched leftmost-longest before the pre-tokenizer: the same cut as the chunking regex;
        # a digit string the corpus merged already keeps its id
        fast.add_tokens([f"{i:0{n}d}" for n in range(number_chunk, 0, -1) for i in range(10**n)])
    return fast


def build_tiny_model(
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 384,
    max_position_embeddings: int = 1024,
) -> LlamaForCausalLM:
    """A small Llama-style causal LM, initialised deterministically from ``seed``."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids(END_OF_TURN),
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    return model


def write_number_values(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, dims: int = 7, order_scale: float = 3.0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Write each number token's value into the first ``dims`` dimensions after dimension 0 of its embedding, for a
    freshly built model: an order feature (``log10(value + 1) / 3`` scaled to [-1, 1]), then the value's digits as
    Fourier features (cos and sin of ``2 pi value / 10^k``, k = 1, 2, 3: FoNE, Zhou et al. 2025).

    With every digit string a token of its own (``number_tokens``), "43" and "80" arrive as two unrelated random
    vectors: which is larger, the check a workflow's budget or threshold asks for, has to be learned token pair by
    token pair from the episodes, and a run may not (Shop-v0's explained pick, docs/results.md). Written into the
    embedding, the value is one direction a layer can compare. The entries are 3x the embedding's random scale
    (as ``wire_previous_token_head``'s constant); the rest of each row stays random, so that copies still tell
    "043" from "43". Dimension 0 and the last quarter are left to ``wire_previous_token_head``. ``order_scale``
    sizes the order feature alone (in the same units), the one a comparison reads.

    Returns (parameter, mask) of the entries set, for ``copy_pretrain`` to hold while it trains (its task is
    random tokens, where a value means nothing)."""
    embed = model.get_input_embeddings().weight
    numbers = [(i, int(t)) for t, i in tokenizer.get_vocab().items() if t.isascii() and t.isdigit() and len(t) <= 3]
    if not numbers:
        return []
    ids = torch.tensor([i for i, _ in numbers])
    value = torch.tensor([v for _, v in numbers], dtype=torch.float64)
    angles = [2 * math.pi * value / 10**k for k in (1, 2, 3)]
    features = torch.stack(
        [2 * torch.log10(value + 1) / 3 - 1, *[f(a) for a in angles for f in (torch.cos, torch.sin)]], 1
    )[:, :dims]
    mask = torch.zeros_like(embed)
    with torch.no_grad():
        scale = embed.std().item()
        sizes = torch.full((features.shape[1],), 3.0, dtype=features.dtype)
        sizes[0] = order_scale
        embed[ids, 1 : 1 + features.shape[1]] = (scale * sizes * features).to(embed.dtype)
    mask[ids, 1 : 1 + features.shape[1]] = 1
    return [(embed, mask)]


def add_special_tokens(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> list[int]:
    """Add the format's special tokens a pretrained tokenizer lacks, resize the embeddings, and give the tokenizer
    the format's chat template (``trajectory.CHAT_TEMPLATE``).

    Returns the ids of the added tokens (LoRA must train their embeddings).
    """
    vocab = tokenizer.get_vocab()
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if tokenizer.pad_token is None:
        missing.append(PAD)
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    else:  # present as plain added tokens (Qwen's <tool_call>): make sure they are never split
        tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = PAD
    tokenizer.chat_template = CHAT_TEMPLATE  # the policy speaks the trajectory format, whatever the base's template
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    return [tokenizer.convert_tokens_to_ids(t) for t in missing]


def load_policy(
    path: str | Path, dtype: str = "float32", local_files_only: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a policy (a model name or directory), with the format's special tokens in its tokenizer."""
    path = str(path)
    if (
        Path(path).is_dir()
        and not (Path(path) / "config.json").exists()
        and not (Path(path) / "adapter_config.json").exists()
    ):
        raise FileNotFoundError(f"{path} is a directory but holds no model (no config.json or adapter_config.json)")
    torch_dtype = getattr(torch, dtype)
    if (Path(path) / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=local_files_only)
        model = model.merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=local_files_only)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_files_only)
    rows = model.get_input_embeddings().weight.shape[0]
    if all(t in tokenizer.get_vocab() for t in SPECIAL_TOKENS) and len(tokenizer) > rows:
        # a tokenizer that already has the format's tokens comes from this pipeline: its model must fit it
        raise ValueError(
            f"{path}: the tokenizer has {len(tokenizer)} tokens and the model's embeddings {rows} rows: they do "
            "not belong together (a model and tokenizer saved by different runs?)"
        )
    add_special_tokens(tokenizer, model)
    return model, tokenizer


def lora_config(r: int, alpha: int, dropout: float, target_modules: str | list[str], new_token_ids: list[int]):
    """The peft LoRA config; tokens added to a pretrained vocabulary get trainable embeddings."""
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        task_type="CAUSAL_LM",
        trainable_token_indices={"embed_tokens": new_token_ids} if new_token_ids else None,
    )


def ordinary_tokens(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """The ids of every token but the special ones and the format's (what the copy tasks draw from)."""
    special = set(tokenizer.all_special_ids) | {tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return torch.tensor([i for i in range(len(tokenizer)) if i not in special])


def copy_rows(
    ordinary: torch.Tensor, rows: int, span: int, generator: torch.Generator, fixed_offset: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` rows of the copy task, ``2 * span`` tokens each drawn uniformly from ``ordinary``, and a mask of
    the tokens to learn. Without ``fixed_offset``, each row holds a random span and, later, its repeat: the span
    is ``span // 4`` to ``span`` tokens long and the repeat starts anywhere after it, so the distance back to the
    copied token varies and only a content-addressed copy (an induction head: find the current token earlier,
    copy its successor) solves the task. The mask marks the repeat but its first token, which nothing before it
    predicts.

    ``fixed_offset`` (this function's default; ``model.copy_pretrain_fixed_offset=true``, ``recipe=fixed_offset``)
    is the earlier task, every row one ``span`` repeated at once: a head that attends exactly ``span`` positions
    back solves it without reading any content, and a model trained on it copies nothing at any other distance
    (docs/log.md, 2026-12-04)."""
    if fixed_offset:  # drawn as before copy_rows existed, so that its runs reproduce
        picks = ordinary[torch.randint(len(ordinary), (rows, span), generator=generator)]
        return torch.cat([picks, picks], dim=1), torch.cat([torch.zeros_like(picks), torch.ones_like(picks)], dim=1)
    length = 2 * span
    ids = ordinary[torch.randint(len(ordinary), (rows, length), generator=generator)]
    mask = torch.zeros(rows, length, dtype=torch.long)
    shortest = max(2, span // 4)
    for row, (u_len, u_start, u_repeat) in enumerate(torch.rand(rows, 3, generator=generator).tolist()):
        n = shortest + int(u_len * (span - shortest + 1))
        start = int(u_start * (length - 2 * n + 1))
        repeat = start + n + int(u_repeat * (length - start - 2 * n + 1))
        ids[row, repeat : repeat + n] = ids[row, start : start + n]
        mask[row, repeat + 1 : repeat + n] = 1
    return ids, mask


def wire_previous_token_head(
    model: PreTrainedModel, pairs: int = 5, sharpness: float = 12.0, channel: int | None = None
) -> list[tuple]:
    """Set the first attention head of the first layer of a freshly built Llama to attend to the previous token,
    and write what it reads into a reserved slice of the residual stream: half of an induction head, built by hand.

    An induction head (find the earlier occurrence of the current token, copy the token after it) needs a head
    that looks one token back, so that a later head can match "my token" against "the token before you". Gradient
    descent finds the pair together only after a long plateau (docs/log.md, 2026-12-05); given the first half,
    the second forms within copy pretraining's steps. The construction:

    - every token's embedding gets the same value in dimension 0, a constant direction the head's query and key
      read (the same logit shift for every token in the tied output layer, so the model's predictions do not
      change), and none in the last ``channel`` dimensions, the reserved slice;
    - query and key are that constant, set on the ``pairs`` fastest rotary frequencies so that after RoPE their
      score is sum_i cos((distance - 1) * theta_i): highest one token back, ``sharpness`` nats above any other
      distance up to the context length;
    - the value is a random orthonormal projection of the token's other dimensions, and the output writes it into
      the reserved slice.

    Returns (parameter, mask) pairs of the entries set, for ``copy_pretrain`` to hold while it trains."""
    cfg = model.config
    d, heads = cfg.hidden_size, cfg.num_attention_heads
    head_dim = d // heads
    half, channel = head_dim // 2, channel or min(head_dim, d // 4)
    embed = model.get_input_embeddings().weight
    attn = model.model.layers[0].self_attn
    theta = float((getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    inv_freq = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / head_dim)
    weight = torch.zeros(half, dtype=torch.float64)
    weight[:pairs] = 1.0
    distances = torch.tensor([0, *range(2, cfg.max_position_embeddings)], dtype=torch.float64)
    margin = (weight * (1 - torch.cos(torch.outer(distances - 1, inv_freq)))).sum(1).min().item()
    query = torch.zeros(head_dim, dtype=torch.float64)
    key = torch.zeros(head_dim, dtype=torch.float64)
    query[:half] = weight.sqrt()  # HF rotates dims (i, i + half) together: key = query turned by one position
    key[:half], key[half:] = weight.sqrt() * torch.cos(inv_freq), weight.sqrt() * torch.sin(inv_freq)
    with torch.no_grad():
        scale = embed[:, 1:].std().item()
        embed[:, 0] = 3 * scale
        embed[:, d - channel :] = 0
        normed = embed[0, 0].item() / embed.pow(2).mean(1).sqrt().mean().item()  # dimension 0 after RMSNorm
        amplitude = (sharpness * head_dim**0.5 / margin) ** 0.5 / normed
        for proj, vector in ((attn.q_proj, query), (attn.k_proj, key)):
            proj.weight[:head_dim] = 0
            proj.weight[:head_dim, 0] = (amplitude * vector).to(proj.weight.dtype)
        content = d - channel - 1
        generator = torch.Generator().manual_seed(cfg.hidden_size)
        projection = torch.linalg.qr(torch.randn(content, channel, generator=generator))[0].T
        attn.v_proj.weight[:head_dim] = 0
        attn.v_proj.weight[:channel, 1 : 1 + content] = projection.to(attn.v_proj.weight.dtype)
        attn.o_proj.weight[:, :head_dim] = 0
        attn.o_proj.weight[d - channel :, :channel] = scale * torch.eye(channel, dtype=attn.o_proj.weight.dtype)

    masks = [torch.zeros_like(p.weight) for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)]
    for mask in masks[:3]:
        mask[:head_dim] = 1  # the head's rows of query, key and value
    masks[3][:, :head_dim] = 1  # its columns of the output
    held = torch.zeros_like(embed)
    held[:, 0] = 1
    params = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight, embed]
    return list(zip(params, [*masks, held]))


def repeat_loss(model: PreTrainedModel, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The causal LM loss on the tokens ``mask`` marks (``copy_rows``' repeats), as the model's own loss with the
    others labelled -100, but with the LM head projecting only the positions that predict a marked token (the
    model's own loss projects every position: 0.8x the step on the default copy rows)."""
    hidden = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]
    marked = mask[:, 1:] == 1
    logits = model.get_output_embeddings()(hidden[marked])
    return torch.nn.functional.cross_entropy(logits.float(), input_ids[:, 1:][marked])


@torch.no_grad()
def repeat_accuracy(
    model: PreTrainedModel, ordinary: torch.Tensor, span: int, seed: int, fixed_offset: bool, rows: int = 64
) -> float:
    """Greedy accuracy on the repeats of ``rows`` held-out rows of the copy task (``copy_rows``, drawn from a stream
    the training rows never use)."""
    was_training = model.training
    model.eval()
    input_ids, mask = copy_rows(ordinary, rows, span, torch.Generator().manual_seed(seed + 7919), fixed_offset)
    device = next(model.parameters()).device
    logits = model(input_ids=input_ids.to(device)).logits[:, :-1].float().cpu()
    marked = mask[:, 1:] == 1
    accuracy = (logits.argmax(-1)[marked] == input_ids[:, 1:][marked]).float().mean().item()
    model.train(was_training)
    return accuracy


def copy_pretrain(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    steps: int,
    seed: int,
    span: int = 32,
    batch_size: int = 32,
    learning_rate: float = 3e-3,
    fixed_offset: bool = True,
    previous_token_head: bool = False,
    rounds: int = 1,
    target: float = 0.5,
    hold: list[tuple[torch.Tensor, torch.Tensor]] = (),
) -> PreTrainedModel:
    """Teach a freshly built model to copy before it sees any trajectory.

    A pretrained LM arrives with induction heads (find the earlier occurrence of the current token, copy
    the token after it); a model built from a config has none, so BC spends its first hundreds of steps on
    a loss plateau until a copy circuit forms, and mis-copies rare tokens (3-digit number chunks, item
    ids) after it. This trains on rows of uniformly random ordinary tokens with a span repeated, loss on the
    repeat only (``copy_rows``), so that every token's embedding gets trained before BC. ``fixed_offset`` (the
    default) repeats each span at once: the model learns to copy exactly ``span`` tokens back, a positional
    head, and BC then learns its own copies from its examples. False repeats spans at varying distances, which
    only an induction head solves; it needs several times the default steps (``rl_agents.copyprobe`` measures
    which a model learned). ``previous_token_head`` first builds the first half of an induction head by hand
    (``wire_previous_token_head``) and holds it while training, so that the varying-distance task forms the
    second half within the default steps. A plain loop in the calling process, on purpose: under torchrun only the main
    process builds the initial model, and a Trainer there would wait for the other ranks.

    When the circuit forms is a draw: with the built head, the loss on the repeat leaves its plateau between 600 and
    1,000 steps on most tokenizers and seeds, past 1,000 on some (docs/results.md, "One policy for all six"). So
    after its ``steps`` the model's greedy accuracy on held-out rows of the same task (``repeat_accuracy``) is
    checked, and below ``target`` another cycle of ``steps`` runs from a warm restart of the schedule (SGDR), for at
    most ``rounds`` cycles in all; a model that reaches ``target`` in the first cycle is exactly the one-cycle model.
    """
    from transformers import get_cosine_schedule_with_warmup

    ordinary = ordinary_tokens(tokenizer)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    hooks = []
    held = [*hold, *(wire_previous_token_head(model) if previous_token_head else [])]
    for param, mask in held:  # a zero gradient leaves AdamW (no weight decay) at the values set
        keep = (1 - mask).to(device=param.device, dtype=param.dtype)
        hooks.append(param.register_hook(lambda grad, keep=keep: grad * keep))
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    for cycle in range(1, rounds + 1):
        schedule = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 20), steps)  # from the peak again
        model.train()
        for step in range(1, steps + 1):
            input_ids, mask = copy_rows(ordinary, batch_size, span, generator, fixed_offset)
            input_ids = input_ids.to(device)
            loss = repeat_loss(model, input_ids, mask.to(device))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if step % max(1, steps // 10) == 0 or step == steps:
                where = f"step {step}/{steps}" if cycle == 1 else f"cycle {cycle} step {step}/{steps}"
                log.info("copy pretraining %s: loss on the repeat %.4f", where, loss.item())
        accuracy = repeat_accuracy(model, ordinary, span, seed, fixed_offset)
        log.info("copy pretraining: greedy accuracy on held-out rows %.3f after %d steps", accuracy, cycle * steps)
        if accuracy >= target:
            break
        if cycle < rounds:
            log.warning(
                "copy pretraining: accuracy %.3f < %.2f (model.copy_pretrain_target): %d more steps from a warm "
                "restart (cycle %d of at most %d)", accuracy, target, steps, cycle + 1, rounds
            )  # fmt: skip
        elif rounds > 1:
            log.warning(
                "copy pretraining: accuracy %.3f < %.2f after %d steps (model.copy_pretrain_rounds=%d): BC starts "
                "from a model that does not copy, and will mis-copy ids and numbers", accuracy, target, cycle * steps,
                rounds,
            )  # fmt: skip
    for hook in hooks:
        hook.remove()
    model.eval()
    return model


# --- the model group's builders (``model._target_``): (cfg, run_dir, trajectories) -> (model, tokenizer) ---
def tiny_policy(cfg, run_dir: Path, trajectories: list[Trajectory]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``model=tiny``: the small Llama of ``cfg.model`` with a tokenizer trained on the run's trajectories, copy
    pretrained, saved once in ``<run_dir>/model/init`` and loaded from there like any checkpoint."""
    init_dir = Path(run_dir) / "model" / "init"
    if not (init_dir / "config.json").is_file():
        m = cfg.model
        tokenizer = build_tokenizer(
            trajectory_texts(trajectories), m.vocab_size, m.number_chunk, m.merge_across_words, m.number_tokens
        )
        model = build_tiny_model(
            tokenizer,
            cfg.seed,
            m.hidden_size,
            m.num_layers,
            m.num_heads,
            m.intermediate_size,
            m.max_position_embeddings,
        )
        hold = write_number_values(model, tokenizer, order_scale=m.number_order_scale) if m.number_values else []
        if m.copy_pretrain_steps:
            model = copy_pretrain(
                model, tokenizer, m.copy_pretrain_steps, cfg.seed, m.copy_pretrain_span,
                learning_rate=m.copy_pretrain_learning_rate,
                fixed_offset=m.copy_pretrain_fixed_offset, previous_token_head=m.previous_token_head,
                rounds=m.copy_pretrain_rounds, target=m.copy_pretrain_target, hold=hold,
            )  # fmt: skip
        with rundir.atomic_dir(init_dir) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return load_policy(init_dir, cfg.model.dtype, local_files_only=True)


def pretrained_policy(
    cfg, run_dir: Path, trajectories: list[Trajectory]
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``model=hf``: a user's pretrained model, ``model.name_or_path`` (a Hub name or a local directory)."""
    return load_policy(cfg.model.name_or_path, cfg.model.dtype, cfg.model.local_files_only)
