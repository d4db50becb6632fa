"""Peak memory and time of one training step (forward, backward), with and without recomputed passes.

    python scripts/train_memory.py PRESET [PRESET ...] [--batch 12] [--steps 5] [--device cpu] [--set KEY=VALUE ...]

Each preset runs twice, with model.recompute_passes false and true, each in a fresh process so
the peaks do not mix: peak memory above what the process held before the first step (CUDA:
the allocator's peak; CPU: the peak resident set) and the median step time. Random tokens.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import time

import torch

from ladderlm.config import load_config
from ladderlm.errors import LadderError
from ladderlm.model import LadderLM

VOCAB = 66


def resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(preset: str, overrides: list[str], batch: int, steps: int, device: str) -> tuple[float, float]:
    """(peak MiB of a training step above the memory held before it, median step ms)."""
    cfg = load_config(preset, overrides=overrides)
    cfg.model.vocab_size = VOCAB
    torch.manual_seed(0)
    model = LadderLM(cfg.model).to(device).train()
    idx = torch.randint(VOCAB, (batch, cfg.model.block_size), device=device)
    cuda = device.startswith("cuda")
    before = torch.cuda.memory_allocated(device) / 2**20 if cuda else resident_mib()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model.loss(idx, idx).backward()  # what a training step computes
        model.zero_grad(set_to_none=False)  # gradients stay allocated, as in training
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return peak - before, sorted(times)[len(times) // 2] * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("presets", nargs="+")
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    spawn = multiprocessing.get_context("spawn")
    for preset in args.presets:
        for recompute in ("false", "true"):
            overrides = [*args.overrides, f"model.recompute_passes={recompute}"]
            with spawn.Pool(1) as pool:
                try:
                    peak, ms = pool.apply(measure, (preset, overrides, args.batch, args.steps, args.device))
                except LadderError as e:
                    raise SystemExit(f"error: {e}") from None
            print(f"{preset} recompute_passes={recompute}: peak {peak:.0f} MiB, step {ms:.0f} ms", flush=True)


if __name__ == "__main__":
    main()
