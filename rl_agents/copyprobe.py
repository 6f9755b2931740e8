"""Does a model copy by content, at any distance? ``python -m rl_agents.copyprobe <model dir>``.

Rows of uniformly random ordinary tokens: a span, ``gap`` random tokens, the span again. Prints the greedy
accuracy on the repeat (its first two tokens aside) for several span lengths and gaps, so for several distances
back. A model with an induction head copies at every distance; one that learned copy pretraining's fixed-offset
task copies only at that offset (docs/results.md#the-default-recipe-on-each-environment-issue-24-in-progress).
"""

from __future__ import annotations

import argparse

import torch

from rl_agents.model import load_policy, ordinary_tokens

PROBES = ((32, 0), (16, 0), (24, 0), (8, 0), (32, 16), (16, 40), (8, 80))  # (span, gap)


@torch.no_grad()
def copy_accuracy(model, tokenizer, span: int, gap: int, rows: int = 64, seed: int = 0, cue: int = 2) -> float:
    """Greedy accuracy on a repeated span's tokens after its first ``cue``, ``span + gap`` tokens back."""
    ordinary = ordinary_tokens(tokenizer)
    generator = torch.Generator().manual_seed(seed)
    picks = ordinary[torch.randint(len(ordinary), (rows, span), generator=generator)]
    filler = ordinary[torch.randint(len(ordinary), (rows, gap), generator=generator)]
    ids = torch.cat([picks, filler, picks], dim=1)
    start = span + gap
    logits = model(input_ids=ids.to(next(model.parameters()).device)).logits.cpu()
    predicted = logits[:, start + cue - 1 : start + span - 1].argmax(-1)
    return (predicted == ids[:, start + cue : start + span]).float().mean().item()


def main(argv: list[str] | None = None) -> None:

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a saved model directory (e.g. <run>/model/init or <run>/bc/policy)")
    args = parser.parse_args(argv)
    model, tokenizer = load_policy(args.model, "float32", local_files_only=True)
    model.eval()
    for span, gap in PROBES:
        accuracy = copy_accuracy(model, tokenizer, span, gap)
        print(f"span {span:3d} gap {gap:3d} (distance {span + gap:3d}): {accuracy:.3f}")


if __name__ == "__main__":
    main()
