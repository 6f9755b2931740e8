"""The bc stage: behavioural cloning of teacher trajectories with TRL's SFTTrainer.

Trajectories are flattened by ``trajectory.sft_dataset`` into pre-tokenised ``input_ids`` with an
``assistant_masks`` column, which SFTTrainer folds into the labels: only the agent's own tokens carry
loss. Sequences are packed (best-fit decreasing, padding-free) when ``packing`` is on. Checkpoints
land in ``<out_dir>/checkpoints``; ``resume=True`` continues from the last one. The BC policy is saved
as a plain Hugging Face model directory (LoRA merged; the adapter is kept beside it).

On CPU, padding (``packing=False``, the default) is about three times faster than packing: packed rows
need a dense block-diagonal attention mask with SDPA. Packing pays off on GPUs with FlashAttention.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import re
import string
from pathlib import Path

import torch
from datasets import Dataset, concatenate_datasets
from torch import nn
from torch.utils.data import Sampler
from transformers import PreTrainedModel, PreTrainedTokenizerBase, PrinterCallback, Trainer
from transformers.trainer_pt_utils import get_length_grouped_indices
from trl import SFTConfig, SFTTrainer
from trl.trainer import utils as trl_utils

from rl_agents import rundir
from rl_agents.config import BCConfig
from rl_agents.model import copy_rows, ordinary_tokens
from rl_agents.tracking import LogToPython
from rl_agents.trajectory import Trajectory, sft_dataset

log = logging.getLogger(__name__)


class LengthBatches(Sampler[int]):
    """Batches of episodes of similar length, in random order: each run of ``bucket`` batches' worth of
    shuffled episodes is sorted by length and cut into batches, and all the batches of the epoch are shuffled
    (a short last batch stays last, so the data loader cuts the stream where this sampler did). transformers'
    ``LengthGroupedSampler`` makes the same batches but leaves each run of ``bucket`` in order, longest first.
    The order depends only on (seed, epoch): a resumed run sees the batches the interrupted one would have."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, bucket: int = BCConfig.length_bucket):
        self.lengths, self.batch_size, self.seed, self.bucket = lengths, batch_size, seed, bucket
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        size = self.batch_size * self.bucket
        batches = []
        for start in range(0, len(order), size):
            run = sorted(order[start : start + size], key=self.lengths.__getitem__)
            batches += [run[i : i + self.batch_size] for i in range(0, len(run), self.batch_size)]
        last = [batches.pop()] if len(batches[-1]) < self.batch_size else []
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()] + last

    def __iter__(self):
        return (index for batch in self.batches() for index in batch)


def padded_tokens(
    lengths: list[int], batch_size: int, seed: int, accumulation: int = 1, bucket: int = BCConfig.length_bucket
) -> dict[str, int]:
    """The tokens one epoch feeds the model, padding included, under each ``bc.batching``, beside ``real`` (the
    rows' own): a padded step's compute follows them (docs/results.md#length-grouped-batches). The batches are
    the loader's, of ``batch_size`` rows, cut from groups of ``batch_size * accumulation`` as the samplers make
    them, ``length`` in runs of ``bucket`` batches."""
    generator = torch.Generator().manual_seed(seed)
    orders = {
        "random": torch.randperm(len(lengths), generator=generator).tolist(),
        "length": list(LengthBatches(lengths, batch_size * accumulation, seed, bucket)),
        "length_sorted": get_length_grouped_indices(lengths, batch_size * accumulation, generator=generator),
    }
    batches = {
        name: [order[i : i + batch_size] for i in range(0, len(order), batch_size)] for name, order in orders.items()
    }
    padded = {name: sum(len(b) * max(lengths[i] for i in b) for b in bs) for name, bs in batches.items()}
    return {"real": sum(lengths), **padded}


@contextlib.contextmanager
def label_positions_only():
    """TRL's fused LM head projects only the positions that carry a label where Triton runs (GPUs) and every
    position elsewhere (CPUs: prompts, observations and pads too, four times the agent's tokens on TaxiText-v0's
    batches). Inside this context it projects the labelled positions on every device (the same loss, 0.8x the BC
    step on CPU); its torch tile code is unchanged. A TRL without the switch is left as it is."""
    if not hasattr(trl_utils, "_use_triton"):
        yield
        return
    decide = trl_utils._use_triton
    trl_utils._use_triton = lambda device: True
    try:
        yield
    finally:
        trl_utils._use_triton = decide


class BCTrainer(SFTTrainer):
    """TRL's SFTTrainer with ``bc.batching=length`` (``LengthBatches``), and the model's own loss where TRL's
    fused LM head would skip the LM head's module: with LoRA's trainable tokens on a model whose output
    embeddings are tied to the input ones (Qwen2, Llama 3.2, Gemma, ...), peft wraps the head too, and the fused
    head reads ``lm_head.weight`` directly (it fails on the wrapper, and would ignore the new tokens' trained
    rows). There the loss is the model's own, from the full logits, with the same normalisation (summed over the
    batch's loss tokens, divided by their number)."""

    length_bucket: int | None = None  # bc.batching=length: its runs of batches; None: the parent's sampler

    def _get_train_sampler(self, train_dataset=None):
        if self.length_bucket is None:
            return super()._get_train_sampler(train_dataset)
        dataset = self.train_dataset if train_dataset is None else train_dataset
        lengths = [len(ids) for ids in dataset["input_ids"]]
        seed = self.args.seed if self.args.data_seed is None else self.args.data_seed
        size = self.args.train_batch_size * self.args.gradient_accumulation_steps
        return LengthBatches(lengths, size, seed, self.length_bucket)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mask = inputs.get("attention_mask")
        pads = 0
        sdpa = getattr(self.model.config, "_attn_implementation", None) == "sdpa"
        if sdpa and mask is not None and mask.dim() == 2 and bool((mask[:, 1:] <= mask[:, :-1]).all()):
            # Right padding under a causal mask: no real token attends to a pad, so a mask of ones changes no real
            # token's output (pads carry no loss) and lets SDPA take its causal kernel instead of the masked one
            # (0.8x the step on CPU at Taxi's padding). FlashAttention-2 keeps the mask: it skips the pads with
            # it. TRL counts the mask's ones as trained tokens: the pads are taken back off below.
            pads = mask.numel() - int(mask.sum())
            inputs = {**inputs, "attention_mask": torch.ones_like(mask)}
        if isinstance(self.model.get_output_embeddings(), nn.Linear):
            with label_positions_only():
                loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if self.model.training and mask is not None:  # every rank gathers, as TRL's own count does
                pads = self.accelerator.gather_for_metrics(torch.tensor(pads, device=mask.device)).sum().item()
                self._total_train_tokens -= pads // self._tp_size
                self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            return loss
        inputs["use_cache"] = False
        return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)


def make_trainer(
    trajectories: list[Trajectory],
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: Path,
    config: BCConfig,
    seed: int,
    peft_config=None,
    report_to: str = "none",
    callbacks: list | None = None,
) -> SFTTrainer:
    """The SFTTrainer for behavioural cloning on ``trajectories``."""
    if not trajectories:
        raise ValueError("bc: no trajectories to train on (did the teacher succeed on any episode?)")
    args = SFTConfig(
        output_dir=str(Path(out_dir) / "checkpoints"),
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler_type,
        lr_scheduler_kwargs=dict(config.lr_scheduler_kwargs),
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        adam_beta2=config.adam_beta2,
        max_length=config.max_length,
        packing=config.packing,
        packing_strategy="bfd",
        train_sampling_strategy="group_by_length"
        if config.batching == "length_sorted" and not config.packing
        else "random",
        activation_checkpointing=config.gradient_checkpointing,
        torch_compile=config.torch_compile,
        logging_steps=config.logging_steps,
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        report_to=report_to,
        run_name="bc",
        seed=seed,
        data_seed=seed,
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    episodes = sft_dataset(trajectories + counterfactual_copies(trajectories, config.copy_augment, seed), tokenizer)
    if not config.packing:
        report_truncation(episodes, config.max_length)
    trainer = BCTrainer(
        model=model,
        args=args,
        train_dataset=with_copy_rows(episodes, tokenizer, config, seed),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[LogToPython(), rundir.SafeCheckpoints(), *(callbacks or [])],
    )
    if config.batching == "length" and not config.packing:
        trainer.length_bucket = config.length_bucket
    trainer.remove_callback(PrinterCallback)  # with tqdm off it prints every log to stdout: LogToPython logs them
    return trainer


def report_truncation(dataset: Dataset, max_length: int | None) -> dict[str, int]:
    """What truncation to ``bc.max_length`` takes from the episodes (SFTTrainer cuts each sequence to it and drops
    the ones left without an agent token, silently): a warning that names the setting when it takes anything."""
    over = cut = dropped = 0
    for ids, mask in zip(dataset["input_ids"], dataset["assistant_masks"], strict=True):
        if max_length is None or len(ids) <= max_length:
            continue
        over += 1
        cut += sum(mask[max_length:])
        dropped += not any(mask[:max_length])
    if dataset and dropped == len(dataset):
        raise ValueError(
            f"bc: every episode's agent tokens lie past bc.max_length={max_length}: nothing to train on. Raise "
            "bc.max_length (up to the model's context) or shorten the prompts"
        )
    report = {"episodes": len(dataset), "longer_than_max_length": over, "agent_tokens_cut": cut, "dropped": dropped}
    if over:
        log.warning(
            "bc: %d of %d episodes are longer than bc.max_length=%d tokens: %d agent tokens past it are not trained on"
            " and %d episodes are dropped (nothing of the agent's left); the longest has %d tokens. Raise"
            " bc.max_length (up to the model's context) or shorten the episodes (runtime.max_turns)",
            over,
            len(dataset),
            max_length,
            cut,
            dropped,
            max(len(ids) for ids in dataset["input_ids"]),
        )
    return report


def with_copy_rows(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, config: BCConfig, seed: int) -> Dataset:
    """``config.copy_mix``: rehearsal of copy pretraining during BC. Adds ``copy_mix`` x len(dataset) rows of
    copy pretraining's task (``model.copy_rows``: ``copy_span`` random ordinary tokens repeated at a varying
    distance, or at once with ``copy_fixed_offset``; loss on the repeat).
    Without them BC moves only the tokens its episodes hold, and a token it never sees (the id of a task it
    never trained on) drifts out of what the model can copy."""
    rows = round(config.copy_mix * len(dataset))
    if rows <= 0:
        return dataset
    generator = torch.Generator().manual_seed(seed + 1)
    ids, mask = copy_rows(ordinary_tokens(tokenizer), rows, config.copy_span, generator, config.copy_fixed_offset)
    copies = Dataset.from_dict({"input_ids": ids.tolist(), "assistant_masks": mask.tolist()}, features=dataset.features)
    return concatenate_datasets([dataset, copies])


_NUMBER = re.compile(r"(?<![\w.])\d+(?![\w]|\.\d)")
# A one-letter string literal, 'u' or "u" (also JSON-escaped inside a tool call's arguments, \"u\"): a constant
# the agent copies into code or a query, like a number.
_LETTER = re.compile(r"(?<=(['\"]))[A-Za-z](?=\\?\1)")


def _values(text: str | None) -> set[str]:
    return set() if not text else set(_NUMBER.findall(text)) | {m.group(0) for m in _LETTER.finditer(text)}


def copied_values(trajectory: Trajectory) -> set[str]:
    """The values an agent turn writes after the task or an observation showed them, the values it copies
    rather than decides: whole numbers (digit strings not inside a word or a decimal) and one-letter string
    literals ('u')."""
    shown = _values(trajectory.task)
    copied = set()
    for turn in trajectory.turns:
        copied |= shown & _values(turn.agent)
        shown |= _values(turn.observation)
    return copied


def _swap(text: str | None, mapping: dict[str, str]) -> str | None:
    if text is None:
        return None
    text = _NUMBER.sub(lambda m: mapping.get(m.group(0), m.group(0)), text)
    return _LETTER.sub(lambda m: mapping.get(m.group(0), m.group(0)), text)


def _draw(value: str, taken: set[str], rng: random.Random) -> str:
    """A random value of ``value``'s kind (as many digits; a letter of its case), not in ``taken`` (and then
    added to it) where the kind has values enough to avoid them all."""
    if value.isalpha():
        pool = string.ascii_lowercase if value.islower() else string.ascii_uppercase
        drawn = rng.choice([c for c in pool if c not in taken] or pool)
        taken.add(drawn)
        return drawn
    low = 10 ** (len(value) - 1) if len(value) > 1 else 0
    if 10 ** len(value) - low <= sum(not t.isalpha() for t in taken):  # too few values of this length to avoid
        return str(rng.randint(low, 10 ** len(value) - 1))
    while (drawn := str(rng.randint(low, 10 ** len(value) - 1))) in taken:
        pass
    taken.add(drawn)
    return drawn


def counterfactual_copies(trajectories: list[Trajectory], fraction: float, seed: int) -> list[Trajectory]:
    """``bc.copy_augment``: ``fraction`` x len(trajectories) extra episodes, each an episode drawn at random in
    which every value the agent copies (``copied_values``: numbers, one-letter literals) is replaced, in the
    task, the observations and the agent's turns alike, by a random value of its kind (as many digits; a
    letter). The copy stays right, the value becomes unpredictable: where the copied values have a narrow prior
    (counts, rates, prices in a range, listed ids, the few letters training tasks name), the model can lower its
    loss by writing a plausible value instead of reading it, and these rows take that away. Episodes with
    nothing copied are left out; runtime token ids are dropped (the text changed)."""
    count = round(fraction * len(trajectories))
    if count <= 0:
        return []
    candidates = [(t, values) for t in trajectories if (values := copied_values(t))]
    if not candidates:
        return []
    rng = random.Random(seed + 2)
    out = []
    for trajectory, values in rng.choices(candidates, k=count):
        # A replacement is never a value the episode already shows (another listed id, say): the copy must stay
        # unambiguous. Numbers are drawn first, in order, then letters.
        taken = _values(trajectory.task)
        for turn in trajectory.turns:
            taken |= _values(turn.agent) | _values(turn.observation)
        mapping = {value: _draw(value, taken, rng) for value in sorted(values, key=lambda v: (v.isalpha(), v))}

        turns = [
            dataclasses.replace(
                turn,
                agent=_swap(turn.agent, mapping),
                observation=_swap(turn.observation, mapping),
                token_ids=None,
                logprobs=None,
            )
            for turn in trajectory.turns
        ]
        out.append(dataclasses.replace(trajectory, task=_swap(trajectory.task, mapping), turns=turns,
                                       metadata={**trajectory.metadata, "counterfactual": True}))  # fmt: skip
    return out


def train_bc(
    trajectories: list[Trajectory],
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: Path,
    config: BCConfig,
    seed: int,
    resume: bool = False,
    peft_config=None,
    report_to: str = "none",
    callbacks: list | None = None,
) -> Path:
    """Fine-tune ``model`` on ``trajectories``; returns the directory of the saved BC policy."""
    out_dir = Path(out_dir)
    trainer = make_trainer(trajectories, model, tokenizer, out_dir, config, seed, peft_config, report_to, callbacks)
    if not config.packing:
        lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
        log.info(
            "bc: one epoch's tokens, padding included, per bc.batching: %s",
            padded_tokens(lengths, config.batch_size, seed, config.gradient_accumulation_steps, config.length_bucket),
        )
    checkpoints = trainer.args.output_dir
    checkpoint = rundir.last_checkpoint(checkpoints) if resume else None
    if resume and checkpoint is None:
        log.warning("bc: resume=true but no complete checkpoint in %s; training from the start", checkpoints)
    if checkpoint:
        log.info("bc: resuming from %s", checkpoint)
    with rundir.disk_full_reported(checkpoints):
        trainer.train(resume_from_checkpoint=checkpoint)

    policy_dir = out_dir / "policy"
    if trainer.is_world_process_zero():  # one writer under a distributed launch
        trained = trainer.accelerator.unwrap_model(trainer.model)
        if peft_config is not None:
            with rundir.atomic_dir(out_dir / "adapter") as tmp:
                trained.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)  # the base is resized to it before the adapter loads
            trained = trained.merge_and_unload()
        rundir.save_policy(trained, tokenizer, policy_dir)
        log.info("bc: policy saved to %s", policy_dir)
    trainer.accelerator.wait_for_everyone()
    return policy_dir
