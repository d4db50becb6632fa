"""Where in a sample its distance from the judge lies: entropy and KL per position, as `eval --samples` draws them.

    python scripts/kl_by_position.py RUN_DIR JUDGE_DIR [--samples 512] [--length 256] [--seed 0] [--by surprise]

Draws the samples `ladderlm eval --samples N --scorer JUDGE_DIR` draws (same seed, temperature 1)
and prints, per stretch of positions, the samples' entropy (their NLL under the model that drew
them), their NLL under the judge and the difference, KL(model || judge) per token: ln gen_ppl is
their mean over all positions. Stretches follow the sampler: the start, the first window, and each
window after a slide (every block_size // 2 tokens). With --by surprise, tokens are grouped instead
by how surprising the token before them was to the model (its NLL when drawn): a token after a
surprise is where a ladder's lower rungs hold plans made before that surprise.
"""

from __future__ import annotations

import argparse

from ladderlm import checkpoint
from ladderlm.errors import LadderError
from ladderlm.evaluate import sample, token_nll
from ladderlm.sampling import context_keep


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run")
    parser.add_argument("judge")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--by", choices=["position", "surprise"], default="position")
    args = parser.parse_args()
    model, cfg, tokenizer = checkpoint.load(args.run)
    judge = checkpoint.load(args.judge)[0].eval()
    rows, own = sample(model, args.samples, args.length, tokenizer.eot_id, args.seed)  # (N, L) tokens, their NLL
    judged = token_nll(judge, rows, tokenizer.eot_id, args.seed).cpu()  # (N, L)
    if args.by == "surprise":
        print_by_surprise(own, judged)
        return
    window, stride = cfg.model.block_size, cfg.model.block_size - context_keep(cfg.model.block_size)
    edges = sorted({0, 1, 4, 16, *range(window, args.length, stride), args.length} & set(range(args.length + 1)))
    print(f"{'positions':>12} {'entropy':>8} {'judge NLL':>9} {'KL':>6}")
    for a, b in [*zip(edges, edges[1:]), (0, args.length)]:
        h, j = own[:, a:b].mean().item(), judged[:, a:b].mean().item()
        print(f"{f'{a}-{b - 1}':>12} {h:8.3f} {j:9.3f} {j - h:6.3f}")


def print_by_surprise(own, judged) -> None:
    """Entropy and KL of tokens 1.. grouped by the NLL of the token before them under the model."""
    before, h, j = own[:, :-1], own[:, 1:], judged[:, 1:]
    edges = [0.0, 0.1, 0.5, 1.0, 2.0, 3.0, float("inf")]
    print(f"{'NLL of the token before':>24} {'share':>6} {'entropy':>8} {'judge NLL':>9} {'KL':>6}")
    for a, b in zip(edges, edges[1:]):
        group = (before >= a) & (before < b)
        print(f"{f'{a:g}-{b:g}':>24} {group.float().mean().item():6.3f} {h[group].mean().item():8.3f} "
              f"{j[group].mean().item():9.3f} {(j - h)[group].mean().item():6.3f}")  # fmt: skip
    print(f"{'all':>24} {1.0:6.3f} {h.mean().item():8.3f} {j.mean().item():9.3f} {(j - h).mean().item():6.3f}")


if __name__ == "__main__":
    try:
        main()
    except LadderError as e:
        raise SystemExit(f"error: {e}") from None
