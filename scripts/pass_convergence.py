"""How many training passes reach the sampler: clean-rung loss after P passes vs free-running, same windows.

    python scripts/pass_convergence.py RUN_DIR DATA_DIR [--windows 64] [--max-passes 12]

Prints the clean rung's cross-entropy on validation windows after P = 1..max passes (blank and
teacher-forced first pass) and the exact free-running sampler's loss on the same windows.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from ladderlm import checkpoint, objectives
from ladderlm.data import TokenData
from ladderlm.errors import LadderError
from ladderlm.sampling import decode


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run")
    parser.add_argument("data")
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--max-passes", type=int, default=12)
    args = parser.parse_args()
    model, cfg, _ = checkpoint.load(args.run)
    data = TokenData.open(args.data)
    idx, targets = data.batch("val", args.windows, cfg.model.block_size, torch.Generator().manual_seed(5))
    S = model.n_step
    slot_tgt, _ = objectives.slot_targets(targets, S)
    x, clean = model.inputs(idx, torch.Generator().manual_seed(1))
    for first in ("blank", "truth"):
        y = torch.zeros_like(x) if first == "blank" else model.run(x, clean, model.empty_state(len(idx)))[0]
        losses = []
        for passes in range(1, args.max_passes + 1):
            if passes > 1 or first == "blank":
                y = model.rollout(x, clean, y, 1)[-1]
            ce = objectives.slot_cross_entropy(model.logits(y), slot_tgt)[:, S - 1 :, -1]
            losses.append(f"P{passes}={ce.mean().item():.3f}")
        print(f"first pass {first}: {' '.join(losses)}")
    nll = torch.zeros(())

    def pick(logits: torch.Tensor, i: int) -> torch.Tensor:
        nll.add_(F.cross_entropy(logits, targets[:, i], reduction="sum"))
        return targets[:, i]

    decode(model, idx[:, :1], targets.shape[1], pick, generator=torch.Generator().manual_seed(0))
    print(f"free-running sampler: {nll.item() / targets.numel():.3f}")


if __name__ == "__main__":
    try:
        main()
    except LadderError as e:
        raise SystemExit(f"error: {e}") from None
