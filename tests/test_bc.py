"""Behavioural cloning: labels only on agent tokens, packing isolates episodes, training changes the policy."""

import pytest
import torch
from datasets import Dataset
from torch.utils.data import RandomSampler
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

from rl_agents.bc import BCConfig, LengthBatches, make_trainer, padded_tokens, report_truncation
from rl_agents.model import build_tiny_model, build_tokenizer, load_policy, trajectory_texts
from rl_agents.trajectory import encode_trajectory


def _tiny(calculator_data):
    tokenizer = build_tokenizer(trajectory_texts(calculator_data), 400)
    return build_tiny_model(tokenizer, 0, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), tokenizer


def test_labels_are_the_agent_tokens_only(tmp_path, calculator_data):
    model, tokenizer = _tiny(calculator_data)
    trainer = make_trainer(calculator_data[:8], model, tokenizer, tmp_path, BCConfig(max_steps=1, batch_size=2), seed=0)
    for row, trajectory in zip(trainer.train_dataset, calculator_data[:8]):
        encoded = encode_trajectory(trajectory, tokenizer)
        assert row["input_ids"] == encoded.input_ids
        assert row["labels"] == [i if m else -100 for i, m in zip(encoded.input_ids, encoded.agent_mask)]


def test_no_gradient_flows_from_prompt_or_observation_tokens(tmp_path, calculator_data):
    """Checked on the gradients: the BC loss has zero gradient at every position predicting a masked token."""
    model, tokenizer = _tiny(calculator_data)
    trajectory = next(t for t in calculator_data if len(t.turns) == 3)
    trainer = make_trainer([trajectory], model, tokenizer, tmp_path, BCConfig(max_steps=1, batch_size=1), seed=0)
    row = trainer.train_dataset[0]
    ids, labels = (torch.tensor([row[k]], device=model.device) for k in ("input_ids", "labels"))  # the trainer's device
    out = model(ids, labels=labels)
    (grad,) = torch.autograd.grad(out.loss, out.logits)  # (1, T, V)
    predicts_agent = labels[0, 1:] != -100  # position t predicts token t + 1
    per_position = grad[0, :-1].abs().sum(-1)
    assert torch.all(per_position[~predicts_agent] == 0)
    assert torch.all(per_position[predicts_agent] > 0)
    assert grad[0, -1].abs().sum() == 0


def test_packed_training_forward_isolates_episodes(tmp_path, calculator_data):
    """With packing=True, episodes share a row: SFTTrainer's forward (use_cache=False) must keep them apart."""
    model, tokenizer = _tiny(calculator_data)
    trainer = make_trainer(calculator_data[:4], model, tokenizer, tmp_path, BCConfig(max_steps=1, packing=True), seed=0)
    assert "seq_lengths" in trainer.train_dataset.column_names  # really packed
    a, b = (torch.tensor([encode_trajectory(t, tokenizer).input_ids], device=model.device) for t in calculator_data[:2])
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(a.shape[1]), torch.arange(b.shape[1])])[None].to(model.device)
    model.train(False)
    logits = model(packed, position_ids=positions, use_cache=False).logits
    assert torch.allclose(logits[:, a.shape[1] :], model(b).logits, atol=1e-5)


def test_bc_lowers_the_loss_on_agent_tokens_and_saves_a_loadable_policy(tiny_policy, calculator_data, tmp_path):
    policy_dir, _, tokenizer = tiny_policy
    model, _ = load_policy(policy_dir, local_files_only=True)  # its own copy: a trainer patches the model it gets
    init = build_tiny_model(tokenizer, seed=0, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128)

    def loss(m):
        trainer = make_trainer(
            calculator_data[:16], m, tokenizer, tmp_path, BCConfig(max_steps=1, batch_size=16), seed=0
        )
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(16)])
        batch = {k: v.to(m.device) for k, v in batch.items()}  # the trainer puts the model on a GPU when there is one
        with torch.no_grad():
            return m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss

    assert loss(model) < 0.5 * loss(init)


def test_gradient_checkpointing_is_optional_and_changes_no_update(tmp_path, calculator_data):
    """Recomputing activations (``bc.gradient_checkpointing``) trades time for memory, never the result."""
    trained = {}
    for checkpointing in (False, True):
        model, tokenizer = _tiny(calculator_data)
        config = BCConfig(max_steps=2, batch_size=4, gradient_checkpointing=checkpointing, save_steps=100)
        trainer = make_trainer(calculator_data[:8], model, tokenizer, tmp_path / str(checkpointing), config, seed=0)
        trainer.train()
        assert trainer.model.is_gradient_checkpointing == checkpointing
        trained[checkpointing] = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    assert torch.allclose(trained[False], trained[True], atol=1e-6)


def test_a_bc_step_skips_the_padding_mask_and_unlabelled_positions_to_the_same_loss_and_gradients(
    tmp_path, calculator_data, monkeypatch
):
    """Right pads come after every real token, so under a causal mask the trainer drops the padding mask (SDPA's
    causal kernel), and TRL's fused LM head projects only the positions with a label, on CPU too: the loss, the
    gradients and the count of trained tokens are those of the model's own loss on the masked batch."""
    import trl.trainer.utils as trl_utils

    projected = []
    apply = trl_utils._ChunkedLogProbFunction.apply
    monkeypatch.setattr(
        trl_utils._ChunkedLogProbFunction,
        "apply",
        lambda hidden, *a: projected.append(len(hidden)) or apply(hidden, *a),
    )
    model, tokenizer = _tiny(calculator_data)
    trainer = make_trainer(calculator_data[:8], model, tokenizer, tmp_path, BCConfig(max_steps=1, batch_size=8), seed=0)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    batch = {k: v.to(trainer.model.device) for k, v in batch.items()}
    mask = batch["attention_mask"]
    assert 0 < int(mask.sum()) < mask.numel()  # rows of several lengths: the batch has pads
    seen = []
    trainer.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["attention_mask"]), with_kwargs=True)
    trainer.model.train()

    def gradients(loss):
        trainer.model.zero_grad()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None]), loss.item()

    fast, fast_loss = gradients(trainer.compute_loss(trainer.model, dict(batch)))
    assert bool(seen[-1].all())  # the model got no padding mask
    assert projected == [int((batch["labels"][:, 1:] != -100).sum())]  # the LM head saw the labelled positions only
    assert trainer._metrics["train"]["num_tokens"] == [int(mask.sum())]  # pads are not trained tokens
    masked, masked_loss = gradients(trainer.model(**batch).loss)
    assert torch.equal(seen[-1], mask)
    assert masked_loss == pytest.approx(fast_loss, rel=1e-5)
    assert torch.allclose(fast, masked, rtol=1e-4, atol=1e-6)

    holed = {**batch, "attention_mask": mask.clone()}
    holed["attention_mask"][0, 1] = 0  # a mask that is not right padding is passed on as it is
    trainer.compute_loss(trainer.model, holed)
    assert torch.equal(seen[-1], holed["attention_mask"])

    trainer.model.config._attn_implementation = "eager"  # only SDPA drops it (FlashAttention-2 skips pads with it)
    trainer.compute_loss(trainer.model, dict(batch))
    assert torch.equal(seen[-1], mask)


def test_bc_passes_the_schedulers_own_arguments(tmp_path, calculator_data):
    """``bc.lr_scheduler_kwargs`` reach transformers' scheduler: a cosine with a floor ends at its floor."""
    model, tokenizer = _tiny(calculator_data)
    config = BCConfig(
        max_steps=10, warmup_steps=0, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.5}
    )
    trainer = make_trainer(calculator_data[:8], model, tokenizer, tmp_path, config, seed=0)
    trainer.create_optimizer_and_scheduler(num_training_steps=config.max_steps)
    rates = [trainer.lr_scheduler.get_last_lr()[0]]
    for _ in range(config.max_steps):
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        rates.append(trainer.lr_scheduler.get_last_lr()[0])
    assert rates[0] == pytest.approx(config.learning_rate)
    assert rates[-1] == pytest.approx(0.5 * config.learning_rate)
    assert all(a >= b for a, b in zip(rates, rates[1:]))


def test_copy_rows_rehearse_copying_beside_the_episodes_with_the_loss_on_the_repeat(tmp_path, calculator_data):
    """bc.copy_mix: copy_mix x episodes extra rows, each a random span of ordinary tokens and its repeat, labelled
    on the repeat only; the episodes' rows are unchanged, and the rows are the same for the same seed."""
    model, tokenizer = _tiny(calculator_data)
    # bc.copy_fixed_offset=true: the fixed-offset task, each span repeated at once
    config = BCConfig(max_steps=1, batch_size=2, copy_mix=0.5, copy_span=8, copy_fixed_offset=True)
    trainer = make_trainer(calculator_data[:8], model, tokenizer, tmp_path, config, seed=0)
    rows = list(trainer.train_dataset)
    assert len(rows) == 12
    for row, trajectory in zip(rows[:8], calculator_data[:8]):
        assert row["input_ids"] == encode_trajectory(trajectory, tokenizer).input_ids
    special = set(tokenizer.all_special_ids)
    for row in rows[8:]:
        ids = row["input_ids"]
        assert len(ids) == 16 and ids[:8] == ids[8:] and not special & set(ids)
        assert row["labels"] == [-100] * 8 + ids[8:]
    again = make_trainer(calculator_data[:8], model, tokenizer, tmp_path / "again", config, seed=0)
    assert [r["input_ids"] for r in again.train_dataset][8:] == [r["input_ids"] for r in rows[8:]]
    # bc.copy_fixed_offset=false (the default): the varying-distance task that keeps an induction head
    varied = BCConfig(max_steps=1, batch_size=2, copy_mix=0.5, copy_span=8, copy_fixed_offset=False)
    trainer = make_trainer(calculator_data[:8], model, tokenizer, tmp_path / "varied", varied, seed=0)
    for row in list(trainer.train_dataset)[8:]:
        ids, learned = row["input_ids"], [t for t, label in enumerate(row["labels"]) if label != -100]
        assert len(ids) == 16 and 1 <= len(learned) < 8 and ids[:8] != ids[8:]
        assert all(row["labels"][t] == ids[t] for t in learned)


def test_counterfactual_copies_replace_every_copied_number_alike_and_leave_decided_ones():
    """bc.copy_augment: a number the agent copies from the task or an observation is replaced by a random one of as
    many digits everywhere it occurs (task, observations, agent turns), so the copy still holds; a number the agent
    writes that nothing showed it, decimals and digits inside words are left alone."""
    from rl_agents.bc import copied_values, counterfactual_copies
    from rl_agents.trajectory import Trajectory, Turn

    episode = Trajectory(
        "Average salary of Finance hires after 2022 (table t2)?",
        [
            Turn("<tool_call>SELECT AVG(s) FROM t2 WHERE year > 2022 LIMIT 5</tool_call>", "AVG(s)\n85417\nrate 0.25"),
            Turn("<answer>85417</answer>", "Correct."),
        ],
        metadata={"seed": 3},
    )
    assert copied_values(episode) == {"2022", "85417"}  # not 2 (inside t2), 5 (nothing showed it), 0.25
    copies = counterfactual_copies([episode], 2.0, seed=0)
    assert len(copies) == 2 and copies != counterfactual_copies([episode], 2.0, seed=1)
    assert copies == counterfactual_copies([episode], 2.0, seed=0)
    for copy in copies:
        year = copy.task.split("after ")[1].split(" ")[0]
        value = copy.turns[1].agent.removeprefix("<answer>").removesuffix("</answer>")
        assert len(year) == 4 and len(value) == 5 and year != "2022" and value != "85417"
        assert copy.turns[0].agent == f"<tool_call>SELECT AVG(s) FROM t2 WHERE year > {year} LIMIT 5</tool_call>"
        assert copy.turns[0].observation == f"AVG(s)\n{value}\nrate 0.25"
        assert copy.metadata == {"seed": 3, "counterfactual": True} and episode.metadata == {"seed": 3}
    assert episode.turns[1].agent == "<answer>85417</answer>"  # the original is untouched
    nothing_copied = Trajectory("Say hi.", [Turn("<answer>hi 7</answer>", "Correct.")])
    assert counterfactual_copies([nothing_copied], 1.0, seed=0) == []


def test_counterfactual_copies_replace_a_copied_one_letter_literal_by_another_letter():
    """A one-letter literal the task names and the code copies ('u', JSON-escaped or not) is a copied value too:
    it becomes another letter of its case everywhere, never one the episode already quotes; letters inside
    words and longer strings stay."""
    from rl_agents.bc import copied_values, counterfactual_copies
    from rl_agents.trajectory import Trajectory, Turn

    task = "Write count_char(s): how many times the letter 'u' occurs in s. Replace 'A' by 'b' in 'sun'."
    code = '<tool_call>{"name": "submit", "arguments": {"code": "s.count(\'u\') + t.count(\\"A\\")"}}</tool_call>'
    episode = Trajectory(task, [Turn(code, "passed 3/3; 'sun' has 1 'u'")])
    assert copied_values(episode) == {"u", "A"}  # not b (never written), not the letters of 'sun'
    copies = counterfactual_copies([episode], 30.0, seed=0)
    letters = set()
    for copy in copies:
        u, a = copy.task.split("letter '")[1][0], copy.task.split("Replace '")[1][0]
        assert u.islower() and a.isupper() and u not in "ub" and a != "A"
        assert copy.task == task.replace("'u'", f"'{u}'").replace("'A'", f"'{a}'")
        assert copy.turns[0].agent == code.replace("'u'", f"'{u}'").replace('\\"A\\"', f'\\"{a}\\"')
        assert copy.turns[0].observation == f"passed 3/3; 'sun' has 1 '{u}'"
        letters.add(u)
    assert len(letters) > 10  # drawn from the alphabet, not from the letters the data names


def test_a_counterfactual_copy_never_takes_a_number_the_episode_already_shows():
    """A replaced id that lands on another listed id would make the copy ambiguous (which [id] is opened?): the
    replacement avoids every number the episode shows. Here digits 0-8 are shown, so 3 can only become 9."""
    from rl_agents.bc import counterfactual_copies
    from rl_agents.trajectory import Trajectory, Turn

    listing = "\n".join(f"[{i}] item" for i in range(9))
    search, open_3 = '<tool_call>{"name": "search"}</tool_call>', '<tool_call>{"name": "open", "id": 3}</tool_call>'
    episode = Trajectory("Open the third.", [Turn(search, listing), Turn(open_3, "[3] item")])
    copies = counterfactual_copies([episode], 20.0, seed=0)
    assert {copy.turns[1].agent for copy in copies} == {'<tool_call>{"name": "open", "id": 9}</tool_call>'}
    assert {copy.turns[0].observation for copy in copies} == {listing.replace("[3]", "[9]")}


def test_counterfactual_copies_are_extra_rows_of_the_bc_data(tmp_path, calculator_data):
    """copy_augment x episodes extra rows, after the episodes (which are unchanged)."""
    model, tokenizer = _tiny(calculator_data)
    config = BCConfig(max_steps=1, batch_size=2, copy_mix=0.0, copy_augment=0.5)
    trainer = make_trainer(calculator_data[:8], model, tokenizer, tmp_path, config, seed=0)
    rows = list(trainer.train_dataset)
    assert len(rows) == 12
    for row, trajectory in zip(rows[:8], calculator_data[:8]):
        assert row["input_ids"] == encode_trajectory(trajectory, tokenizer).input_ids
    originals = {tuple(encode_trajectory(t, tokenizer).input_ids) for t in calculator_data[:8]}
    assert not originals & {tuple(row["input_ids"]) for row in rows[8:]}


def test_bc_says_what_truncation_to_max_length_takes_and_trains_on_what_it_says(tmp_path, calculator_data, caplog):
    """An episode longer than bc.max_length loses its agent tokens past it (SFTTrainer drops an episode left with
    none): the warning counts them, and the trainer's rows are the episodes cut where the report says."""
    model, tokenizer = _tiny(calculator_data)
    encoded = [encode_trajectory(t, tokenizer) for t in calculator_data[:8]]
    lengths = sorted(len(e.input_ids) for e in encoded)
    max_length = lengths[4]  # the longer half is cut ...
    assert all(e.agent_mask.index(1) < max_length for e in encoded)  # ... and keeps agent tokens
    over = [e for e in encoded if len(e.input_ids) > max_length]
    expected_cut = sum(sum(e.agent_mask[max_length:]) for e in over)
    config = BCConfig(max_steps=1, copy_mix=0.0, max_length=max_length)
    with caplog.at_level("WARNING", logger="rl_agents.bc"):
        trainer = make_trainer(calculator_data[:8], model, tokenizer, tmp_path, config, 0)
    assert over and expected_cut > 0
    assert f"{len(over)} of 8 episodes are longer than bc.max_length={max_length}" in caplog.text
    assert f"{expected_cut} agent tokens past it" in caplog.text
    trained = sum(sum(label != -100 for label in row["labels"]) for row in trainer.train_dataset)
    assert trained == sum(sum(e.agent_mask) for e in encoded) - expected_cut

    # episodes whose agent tokens all lie past max_length: counted as dropped, and the trainer has as many rows fewer
    rows = {"input_ids": [e.input_ids for e in encoded], "assistant_masks": [e.agent_mask for e in encoded]}
    firsts = sorted(e.agent_mask.index(1) for e in encoded)
    assert firsts[0] < firsts[4]
    report = report_truncation(Dataset.from_dict(rows), firsts[4])
    assert report["dropped"] == sum(f >= firsts[4] for f in firsts)
    config = BCConfig(max_steps=1, copy_mix=0.0, max_length=firsts[4])
    trainer = make_trainer(calculator_data[:8], model, tokenizer, tmp_path, config, 0)
    assert len(trainer.train_dataset) == 8 - report["dropped"]
    # all of them: a clear error that names the setting, not an empty dataset
    with pytest.raises(ValueError, match=f"bc.max_length={firsts[0]}"):
        make_trainer(calculator_data[:8], model, tokenizer, tmp_path, BCConfig(max_steps=1, max_length=firsts[0]), 0)

    # nothing longer: no warning, and the report says so
    caplog.clear()
    with caplog.at_level("WARNING", logger="rl_agents.bc"):
        make_trainer(calculator_data[:8], model, tokenizer, tmp_path, BCConfig(max_steps=1, copy_mix=0.0), 0)
    assert "longer than bc.max_length" not in caplog.text
    assert report_truncation(Dataset.from_dict(rows), lengths[-1])["longer_than_max_length"] == 0


def _padding(batches, lengths):
    return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)


def test_length_batches_hold_similar_lengths_in_random_order_and_replay_per_epoch():
    """Every episode once per epoch; batches cut from length-sorted runs (a fraction of random batches' padding);
    their order random (transformers' runs go longest first: every adjacent pair in a run descends); the same
    epoch gives the same order (a resumed run), another epoch another; a short last batch stays last."""
    lengths = torch.randint(20, 400, (1003,), generator=torch.Generator().manual_seed(0)).tolist()
    sampler = LengthBatches(lengths, batch_size=8, seed=3, bucket=10)
    stream = list(sampler)
    assert sorted(stream) == list(range(1003))
    batches = sampler.batches()
    assert [stream[i : i + 8] for i in range(0, 1003, 8)] == batches and len(batches[-1]) == 3
    shuffled = torch.randperm(1003, generator=torch.Generator().manual_seed(1)).tolist()
    assert _padding(batches, lengths) < 0.2 * _padding([shuffled[i : i + 8] for i in range(0, 1003, 8)], lengths)

    def descending(order):
        tops = [max(lengths[i] for i in order[j : j + 8]) for j in range(0, 1000, 8)]
        return sum(a >= b for a, b in zip(tops, tops[1:])) / (len(tops) - 1)

    torch.manual_seed(0)
    assert descending(get_length_grouped_indices(lengths, 8, mega_batch_mult=10)) > 0.85
    assert 0.3 < descending(stream) < 0.7
    assert list(LengthBatches(lengths, 8, seed=3, bucket=10)) == stream
    sampler.set_epoch(1)
    assert list(sampler) != stream and sorted(sampler) == list(range(1003))
    tokens = padded_tokens(lengths, 8, seed=3)
    assert tokens["real"] == sum(lengths) < tokens["length"] < 1.1 * tokens["real"] < 0.7 * tokens["random"]
    assert tokens["length"] == sum(len(b) * max(lengths[i] for i in b) for b in LengthBatches(lengths, 8, 3).batches())


def test_bc_batching_picks_the_sampler_and_the_loader_follows_it(tmp_path, calculator_data):
    model, tokenizer = _tiny(calculator_data)
    trainers = {
        batching: make_trainer(
            calculator_data[:40],
            model,
            tokenizer,
            tmp_path,
            BCConfig(max_steps=1, batch_size=4, copy_mix=0.0, batching=batching),
            seed=0,
        )
        for batching in ("random", "length", "length_sorted")
    }
    assert isinstance(trainers["random"]._get_train_sampler(), RandomSampler)
    assert isinstance(trainers["length_sorted"]._get_train_sampler(), LengthGroupedSampler)
    sampler = trainers["length"]._get_train_sampler()
    assert isinstance(sampler, LengthBatches)
    first = next(iter(trainers["length"].get_train_dataloader()))
    expected = [encode_trajectory(calculator_data[i], tokenizer).input_ids for i in sampler.batches()[0]]
    assert first["input_ids"].shape == (4, max(map(len, expected)))
    assert [row[: len(ids)].tolist() for row, ids in zip(first["input_ids"], expected)] == expected


def test_bc_length_bucket_sets_the_runs_the_trainer_and_the_padding_log_sort(tmp_path, calculator_data):
    """``bc.length_bucket``: the trainer's sampler sorts runs of that many batches; on data of few tasks repeated
    (lengths fixed per task), short runs mix more distinct tasks into a batch than long ones, for more padding,
    and runs of one batch are random batches."""
    model, tokenizer = _tiny(calculator_data)
    config = BCConfig(max_steps=1, batch_size=4, copy_mix=0.0, batching="length", length_bucket=2)
    trainer = make_trainer(calculator_data[:40], model, tokenizer, tmp_path, config, seed=0)
    sampler = trainer._get_train_sampler()
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    assert sampler.bucket == 2 and sampler.batches() == LengthBatches(lengths, 4, 0, bucket=2).batches()

    tasks = [i % 40 for i in range(2000)]  # 40 tasks, 50 copies each
    lengths = [100 + 7 * task for task in tasks]

    def distinct(bucket):
        batches = LengthBatches(lengths, 32, seed=0, bucket=bucket).batches()
        return sum(len({tasks[i] for i in b}) for b in batches) / len(batches)

    assert distinct(50) < 3 < 8 < distinct(4) < distinct(1)
    padded = {bucket: padded_tokens(lengths, 32, seed=0, bucket=bucket)["length"] for bucket in (1, 4, 50)}
    assert padded[50] < padded[4] < padded[1] == padded_tokens(lengths, 32, seed=0)["random"]


def test_the_logged_padding_is_the_loaders_with_gradient_accumulation(tmp_path, calculator_data):
    """padded_tokens' ``length`` figure counts what one epoch of the loader feeds, where the sampler groups
    ``batch_size * gradient_accumulation_steps`` rows and the loader cuts them into batches of ``batch_size``."""
    model, tokenizer = _tiny(calculator_data)
    config = BCConfig(max_steps=1, batch_size=4, gradient_accumulation_steps=3, copy_mix=0.0, batching="length")
    trainer = make_trainer(calculator_data, model, tokenizer, tmp_path, config, seed=0)  # 2 buckets by 4, 1 by 12
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    fed = sum(batch["input_ids"].numel() for batch in trainer.get_train_dataloader())
    assert padded_tokens(lengths, 4, seed=0, accumulation=3)["length"] == fed
    assert padded_tokens(lengths, 4, seed=0)["length"] != fed  # grouped by 4, as the log did before


@pytest.mark.slow  # compilation: 12 s here with a warm inductor cache, more on a clean machine
def test_compiled_bc_takes_the_eager_steps_and_saves_a_plain_policy(tmp_path, calculator_data):
    """``bc.torch_compile``: the same losses step by step as the eager model (float32, same data order), and the
    saved policy is the plain model's (its weights load without the compiled wrapper's prefix)."""
    losses, policies = {}, {}
    for compiled in (False, True):
        model, tokenizer = _tiny(calculator_data)
        config = BCConfig(max_steps=4, batch_size=4, logging_steps=1, batching="random", torch_compile=compiled)
        trainer = make_trainer(calculator_data[:32], model, tokenizer, tmp_path / str(compiled), config, seed=0)
        trainer.train()
        losses[compiled] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        trainer.save_model(str(tmp_path / f"policy{compiled}"))
        policies[compiled] = load_policy(tmp_path / f"policy{compiled}", local_files_only=True)[0]
    assert len(losses[True]) == 4 and losses[True] == pytest.approx(losses[False], rel=1e-3)
    plain, compiled = (policies[k].state_dict() for k in (False, True))
    assert plain.keys() == compiled.keys()
    assert all(torch.allclose(plain[k], compiled[k], atol=1e-4) for k in plain)
