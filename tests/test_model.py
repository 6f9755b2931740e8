"""Models: the tiny model is deterministic and loads like any checkpoint; pretrained loading adds tokens."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rl_agents import copyprobe
from rl_agents.copyprobe import copy_accuracy
from rl_agents.model import (
    add_special_tokens,
    build_tiny_model,
    build_tokenizer,
    copy_pretrain,
    copy_rows,
    load_policy,
    ordinary_tokens,
    repeat_accuracy,
    repeat_loss,
    trajectory_texts,
    write_number_values,
)
from rl_agents.trajectory import SPECIAL_TOKENS, encode_trajectory


def test_tiny_model_is_deterministic_from_the_seed(calculator_data):
    tokenizer = build_tokenizer(trajectory_texts(calculator_data), 400)
    again = build_tokenizer(trajectory_texts(calculator_data), 400)
    assert tokenizer.get_vocab() == again.get_vocab()
    a, b, c = (build_tiny_model(tokenizer, seed, hidden_size=32, num_layers=1, num_heads=2) for seed in (0, 0, 1))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_tokenizer_has_the_format_tokens_as_single_special_tokens(calculator_data):
    tokenizer = build_tokenizer(trajectory_texts(calculator_data), 400)
    for token in SPECIAL_TOKENS:
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [tokenizer.convert_tokens_to_ids(token)]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token is not None
    # numbers are cut in chunks of at most three digits from the left, whatever surrounds them
    for text in ["12345", "x=12345?", " 12345 "]:
        pieces = [tokenizer.decode([i]).strip("x=? ") for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
        digits = [p for p in pieces if p]
        assert "".join(digits) == "12345"
        boundaries = {sum(len(p) for p in digits[:k]) for k in range(len(digits) + 1)}
        assert 3 in boundaries and all(len(p) <= 3 for p in digits)


def test_merges_across_words_shorten_sequences_and_keep_numbers_and_text_exact(calculator_data):
    words = build_tokenizer(trajectory_texts(calculator_data), 600)
    merged = build_tokenizer(trajectory_texts(calculator_data), 600, merge_across_words=True)
    length = {t: sum(len(encode_trajectory(x, t).input_ids) for x in calculator_data) for t in (words, merged)}
    assert length[merged] < 0.85 * length[words]
    for trajectory in calculator_data[:20]:
        for turn in trajectory.turns:
            ids = merged(turn.agent, add_special_tokens=False)["input_ids"]
            assert merged.decode(ids) == turn.agent  # lossless
            pieces = [merged.decode([i]) for i in ids]
            numeric = [p for p in pieces if any(ch.isdigit() for ch in p)]
            assert all(p.isdigit() and len(p) <= 3 for p in numeric)  # numbers stay in chunks of their own


def test_number_tokens_cut_every_number_the_same_way_seen_in_training_or_not(tmp_path, calculator_data):
    """model.number_tokens: each chunk of up to three digits is one token whatever the corpus held (the
    corpus's merges cut an unseen number into other pieces than a seen one), text stays exact, and the
    saved tokenizer cuts the same way."""
    corpus = list(trajectory_texts(calculator_data))
    plain = build_tokenizer(corpus, 400)
    numbers = build_tokenizer(corpus, 400, number_tokens=True)

    def pieces(tokenizer, text):
        return [tokenizer.decode([i]) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]

    cuts = {len(pieces(plain, f"open {n}")) for n in range(100, 1000)}
    assert len(cuts) > 1  # the corpus's merges: some 3-digit numbers are one token, others several
    for n in [*range(1000), 4908600, 1369199040]:
        text = f"open {n}, then {n}."
        assert numbers.decode(numbers(text, add_special_tokens=False)["input_ids"]) == text
        digits = [p for p in pieces(numbers, text) if p.isdigit()]
        expected = [str(n)[i : i + 3] for i in range(0, len(str(n)), 3)] * 2
        assert digits == expected
    assert len(numbers) >= 1110 + 256
    numbers.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded("open 775 and 4908600")["input_ids"] == numbers("open 775 and 4908600")["input_ids"]


def test_saved_tiny_model_loads_through_from_pretrained(tmp_path, calculator_data):
    tokenizer = build_tokenizer(trajectory_texts(calculator_data), 400)
    model = build_tiny_model(tokenizer, 0, hidden_size=32, num_layers=1, num_heads=2)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tok = load_policy(tmp_path, local_files_only=True)
    assert loaded_tok.get_vocab() == tokenizer.get_vocab()
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_pretrained_model_without_the_format_tokens_gets_them_and_resized_embeddings(tmp_path, calculator_data):
    """A 'user's pretrained model': a checkpoint whose tokenizer lacks our special tokens and a pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    base.pre_tokenizer = pre_tokenizers.Whitespace()
    plain = PreTrainedTokenizerFast(tokenizer_object=base, unk_token="[UNK]")
    model = build_tiny_model(plain, 0, hidden_size=32, num_layers=1, num_heads=2)
    model.config.pad_token_id = None
    model.save_pretrained(tmp_path)
    plain.save_pretrained(tmp_path)

    loaded, tokenizer = load_policy(tmp_path, local_files_only=True)
    assert len(tokenizer) == 3 + len(SPECIAL_TOKENS) + 1  # + pad
    assert loaded.get_input_embeddings().weight.shape[0] >= len(tokenizer)
    assert tokenizer.pad_token is not None
    ids = tokenizer("<tool_call>hello</tool_call>", add_special_tokens=False)["input_ids"]
    assert ids == [tokenizer.convert_tokens_to_ids("<tool_call>"), 1, tokenizer.convert_tokens_to_ids("</tool_call>")]
    out = loaded(torch.tensor([ids]))
    assert out.logits.shape[-1] == loaded.get_input_embeddings().weight.shape[0]


def test_add_special_tokens_is_idempotent(calculator_data):
    tokenizer = build_tokenizer(trajectory_texts(calculator_data), 400)
    model = build_tiny_model(tokenizer, 0, hidden_size=32, num_layers=1, num_heads=2)
    before = len(tokenizer)
    assert add_special_tokens(tokenizer, model) == []
    assert len(tokenizer) == before


def test_auto_classes_load_the_tiny_model_directly(tiny_policy):
    policy_dir, _, _ = tiny_policy
    model = AutoModelForCausalLM.from_pretrained(policy_dir, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(policy_dir, local_files_only=True)
    assert model.config.model_type == "llama" and tokenizer.convert_tokens_to_ids("<tool_call>") > 0


def _repeat_loss(model, tokenizer, span: int, seed: int, gap: int = 0) -> float:
    """Mean loss on the repeat (its first token aside) of random ordinary-token spans repeated after ``gap``
    random tokens (fresh samples): the copy is ``span + gap`` tokens back."""
    generator = torch.Generator().manual_seed(seed)
    ordinary = torch.tensor([i for i in range(len(tokenizer)) if i not in set(tokenizer.all_special_ids)])
    picks = ordinary[torch.randint(len(ordinary), (16, span), generator=generator)]
    filler = ordinary[torch.randint(len(ordinary), (16, gap), generator=generator)]
    ids = torch.cat([picks, filler, picks], dim=1)
    labels = ids.clone()
    labels[:, : span + gap + 1] = -100
    with torch.no_grad():
        return model(input_ids=ids, labels=labels).loss.item()


def test_copy_pretraining_teaches_a_fresh_model_to_copy_at_the_distance_it_trained_at_only(calculator_data):
    """Chance is log(vocab) ~ 5.7 nats. The default task repeats each span at once, and the model learns to copy
    there; it is solved by attending a fixed distance back, so the model copies nothing at another distance
    (a 10-token span 30 tokens back). The copy a task needs (an id read from an earlier observation) is at
    any distance: this is why ``copy_rows`` has a varying-distance task."""
    tokenizer = build_tokenizer(trajectory_texts(calculator_data), 300)
    model = build_tiny_model(tokenizer, 0, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128)
    before = _repeat_loss(model, tokenizer, span=16, seed=123)
    copy_pretrain(model, tokenizer, steps=400, seed=0, span=16, batch_size=16)
    after = _repeat_loss(model, tokenizer, span=16, seed=123)
    elsewhere = _repeat_loss(model, tokenizer, span=10, seed=7, gap=20)
    assert before > 4.0
    assert after < 0.5, (before, after)
    assert elsewhere > 4.0, elsewhere
    # the probe a user runs (python -m rl_agents.copyprobe) says the same in greedy accuracy
    assert copy_accuracy(model, tokenizer, span=16, gap=0) > 0.9 > 0.1 > copy_accuracy(model, tokenizer, 10, 20)


def test_copyprobe_cli_prints_one_accuracy_per_distance(tiny_policy, capsys):
    policy_dir, _, _ = tiny_policy
    copyprobe.main([str(policy_dir)])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(copyprobe.PROBES) and all(0.0 <= float(line.split()[-1]) <= 1.0 for line in lines)


@pytest.mark.parametrize("fixed_offset", [True, False])
def test_the_repeat_loss_is_the_models_own_loss_on_the_marked_tokens_and_its_gradient(calculator_data, fixed_offset):
    """Copy pretraining's loss projects only the positions that predict a marked token: the same value and
    gradients as the model's own loss with every other token labelled -100."""
    tokenizer = build_tokenizer(trajectory_texts(calculator_data), 300)
    model = build_tiny_model(tokenizer, 0, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    ids, mask = copy_rows(ordinary_tokens(tokenizer), 8, 12, torch.Generator().manual_seed(0), fixed_offset)
    grads = []
    for loss in (repeat_loss(model, ids, mask), model(input_ids=ids, labels=ids.masked_fill(mask == 0, -100)).loss):
        model.zero_grad()
        loss.backward()
        grads.append((loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
    (compact, compact_grad), (own, own_grad) = grads
    assert compact == pytest.approx(own, rel=1e-5)
    assert torch.allclose(compact_grad, own_grad, rtol=1e-4, atol=1e-6)


def test_copy_rows_repeat_a_span_at_a_varying_distance_with_the_loss_on_what_a_copy_predicts():
    ordinary = torch.arange(1000, 3000)
    ids, mask = copy_rows(ordinary, 200, 16, torch.Generator().manual_seed(0), fixed_offset=False)
    assert ids.shape == mask.shape == (200, 32) and bool(((ids >= 1000) & (ids < 3000)).all())
    distances = set()
    for row, marks in zip(ids.tolist(), mask.tolist()):
        learned = [t for t, m in enumerate(marks) if m]
        assert 3 <= len(learned) <= 15 and learned == list(range(learned[0], learned[-1] + 1))
        first = learned[0] - 1  # the repeat's first token: no loss, nothing predicts it
        distance = next(
            d
            for d in range(len(learned) + 1, first + 1)
            if row[first - d : first - d + len(learned) + 1] == row[first : learned[-1] + 1]
        )
        distances.add(distance)
    assert len(distances) > 10  # no single offset solves it
    fixed_ids, fixed_mask = copy_rows(ordinary, 4, 16, torch.Generator().manual_seed(0), fixed_offset=True)
    assert torch.equal(fixed_ids[:, :16], fixed_ids[:, 16:])
    assert fixed_mask[:, 16:].all() and not fixed_mask[:, :16].any()


def _previous_token_attention(model, ids: torch.Tensor) -> float:
    """Share of positions (the first aside) where layer 0's head 0 attends most to the token just before."""
    model.config._attn_implementation = "eager"  # the only implementation that returns attention weights
    with torch.no_grad():
        weights = model(input_ids=ids, output_attentions=True).attentions[0][:, 0]
    return (weights.argmax(-1)[:, 1:] == torch.arange(ids.shape[1] - 1)).float().mean().item()


def test_a_hand_built_previous_token_head_lets_copy_pretraining_form_an_induction_head(calculator_data):
    """The varying-distance copy task on its own forms no induction head in copy pretraining's steps; with the
    head that looks one token back built first (and held while it trains), the model copies by content: a span
    24 and 40 tokens back, distances the task never fixed."""
    tokenizer = build_tokenizer(trajectory_texts(calculator_data), 300)
    ids = copy_rows(ordinary_tokens(tokenizer), 8, 32, torch.Generator().manual_seed(1), fixed_offset=False)[0]
    models = {}
    for wired in (False, True):
        model = build_tiny_model(tokenizer, 0, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128)
        before = _previous_token_attention(model, ids)
        models[wired] = copy_pretrain(model, tokenizer, 600, 0, 32, batch_size=16, previous_token_head=wired,
                                      fixed_offset=False)  # fmt: skip
        if wired:
            assert before < 0.3 and _previous_token_attention(model, ids) > 0.9  # built, and held through training
    accuracy = {
        wired: (copy_accuracy(m, tokenizer, 8, 16), copy_accuracy(m, tokenizer, 16, 24)) for wired, m in models.items()
    }
    assert min(accuracy[True]) > 0.8 and max(accuracy[False]) < 0.2, accuracy


def test_copy_pretraining_runs_more_cycles_until_the_copy_circuit_forms(calculator_data, caplog):
    """A cycle too short for the induction head to form is followed by warm restarts until the held-out copy
    accuracy reaches the target; a model that reaches it in its first cycle is exactly the one-cycle model."""
    tokenizer = build_tokenizer(trajectory_texts(calculator_data), 300)
    ordinary = ordinary_tokens(tokenizer)

    def pretrain(steps, rounds, target):
        model = build_tiny_model(tokenizer, 0, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128)
        return copy_pretrain(model, tokenizer, steps, 0, 32, batch_size=16, previous_token_head=True,
                             fixed_offset=False, rounds=rounds, target=target)  # fmt: skip

    with caplog.at_level("INFO", logger="rl_agents.model"):
        model = pretrain(100, 5, 0.5)
    messages = [r.getMessage() for r in caplog.records]
    checks = [float(m.split()[-4]) for m in messages if "accuracy on held-out rows" in m]
    assert checks[0] < 0.1 and 2 <= len(checks) <= 4 and checks[-1] >= 0.5, checks  # the head formed in a later cycle
    assert all(c < 0.5 for c in checks[:-1])  # no cycle ran after the target was reached
    assert repeat_accuracy(model, ordinary, 32, 0, False) == pytest.approx(checks[-1], abs=5e-4)  # the model returned
    one, reached_at_once = pretrain(20, 1, 0.5), pretrain(20, 3, 1e-6)
    assert all(torch.equal(a, b) for a, b in zip(one.state_dict().values(), reached_at_once.state_dict().values()))


def test_number_values_are_written_in_order_and_held_through_copy_pretraining(calculator_data):
    """model.number_values: a number token's embedding starts with its value (an order feature, then its digits);
    "43" and "043" share those entries and differ in the rest; copy pretraining trains the rest and not them."""
    tokenizer = build_tokenizer(trajectory_texts(calculator_data), 300, number_tokens=True)
    model = build_tiny_model(tokenizer, 0, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128)
    before = model.get_input_embeddings().weight.detach().clone()
    hold = write_number_values(model, tokenizer)
    embed = model.get_input_embeddings().weight
    tokens = ("5", "43", "043", "80", "108", "999")
    row = {t: embed[tokenizer.convert_tokens_to_ids(t)].detach().clone() for t in tokens}
    order = [row[t][1].item() for t in ("5", "43", "80", "108", "999")]
    assert order == sorted(order) and len(set(order)) == 5
    assert torch.equal(row["43"][1:8], row["043"][1:8]) and not torch.equal(row["43"][8:], row["043"][8:])
    assert not torch.equal(row["43"][2:8], row["80"][2:8])  # the digits differ
    ((param, mask),) = hold
    assert param is embed and mask.sum() == 7 * 1110  # every number token of up to 3 digits, 7 entries each
    assert torch.equal(embed[mask == 0], before[mask == 0])  # nothing else written
    written = embed.detach().clone()
    copy_pretrain(model, tokenizer, 30, 0, 16, batch_size=8, previous_token_head=True, fixed_offset=False, hold=hold)
    after = model.get_input_embeddings().weight.detach()
    assert torch.equal(after[mask == 1], written[mask == 1])  # held
    ids = [tokenizer.convert_tokens_to_ids(t) for t in ("43", "80")]
    assert not torch.equal(after[ids, 8:60], written[ids, 8:60])  # the rest of a number's row trains
    larger = build_tiny_model(tokenizer, 0, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128)
    write_number_values(larger, tokenizer, order_scale=12.0)  # model.number_order_scale: the order feature alone, 4x
    grown = larger.get_input_embeddings().weight.detach()
    assert torch.allclose(grown[mask[:, 1] == 1, 1], 4 * written[mask[:, 1] == 1, 1])
    assert torch.equal(grown[:, 2:], written[:, 2:]) and torch.equal(grown[:, 0], written[:, 0])
