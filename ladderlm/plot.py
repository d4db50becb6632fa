"""Loss curves from runs' metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import LadderError


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise LadderError(f"{run_dir} has no metrics.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(run_dirs: list[Path], out: Path) -> None:
    """Training loss (thin) and validation loss (markers) per run against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run_dir in run_dirs:
        records = read_metrics(run_dir)
        name = Path(run_dir).name
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        if train:
            line = ax.plot(*zip(*train), lw=0.8, alpha=0.7, label=f"{name} train")[0]
        if val:
            ax.plot(*zip(*val), "o-", ms=3, color=line.get_color() if train else None, label=f"{name} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
