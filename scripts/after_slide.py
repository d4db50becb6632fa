"""Free-running loss right after the window slides, where the sampler restarts from a prompt.

    python scripts/after_slide.py DATA_DIR RUN_DIR [RUN_DIR ...] [--rows 64] [--set model.prompt_noise=zero]

`ladderlm eval` reads each validation row as one stream: the first window from the start token,
every later one from a prompt (the start token and the last block_size // 2 known tokens) that
the sampler prefills like any prompt. Per run this prints the free-running loss of the first
window, of the later windows, and of the later windows' new tokens by quarter (the first quarter
comes right after the prompt). A model that reads prompts as it reads its own outputs has no
jump in the first quarter.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from ladderlm import checkpoint
from ladderlm.data import TokenData
from ladderlm.errors import LadderError
from ladderlm.evaluate import split_rows, token_nll
from ladderlm.sampling import context_keep


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--set", action="append", default=[], help="a sampling key, as `ladderlm eval --set`")
    args = parser.parse_args()
    data = TokenData.open(args.data)
    rows, lengths = split_rows(np.asarray(data.val), args.rows)
    index = torch.arange(rows.shape[1])
    scored = index[None] < lengths[:, None]  # (R, n): the last row is padded
    for run in args.runs:
        model, cfg, _ = checkpoint.load(run, overrides=args.set)
        block = cfg.model.block_size
        stride = block - context_keep(block)  # new tokens per window after the first
        nll = token_nll(model.eval(), rows, data.tokenizer.eot_id)
        later = index >= block
        quarter = ((index - block) % stride) * 4 // stride
        parts = [~later, later, *(later & (quarter == q) for q in range(4))]
        first, rest, *quarters = (float((nll * (scored & p)).sum() / (scored & p).sum()) for p in parts)
        by_quarter = " ".join(f"{q:.4f}" for q in quarters)
        print(f"{run}: first window {first:.4f}  later windows {rest:.4f}  by quarter after the prompt {by_quarter}")


if __name__ == "__main__":
    try:
        main()
    except LadderError as e:
        raise SystemExit(f"error: {e}") from None
