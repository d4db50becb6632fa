"""Figures of runs: loss curves (metrics.jsonl) and evaluation results (eval.json, `ladderlm eval --save`)."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import LadderError


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise LadderError(f"{run_dir} has no metrics.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_eval(run_dir: Path) -> dict:
    path = Path(run_dir) / "eval.json"
    if not path.is_file():
        raise LadderError(f"{run_dir} has no eval.json; write it with `ladderlm eval --ckpt {run_dir} --data DATA --save`")
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LadderError(f"{path} is corrupt: {e}") from None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(kind: str, run_dirs: list[Path], out: Path) -> None:
    """Write figure `kind` (losses, rungs or free-vs-tf) of the runs to `out`."""
    {"losses": plot_losses, "rungs": plot_rungs, "free-vs-tf": plot_free_vs_teacher_forced}[kind](run_dirs, out)


def _save(fig, ax, out: Path) -> None:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    fig.clf()


def plot_rungs(run_dirs: list[Path], out: Path) -> None:
    """Per-rung teacher-forced cross-entropy (left) and denoise ratio (right, rungs 1..S-1) per run."""
    plt = _pyplot()
    fig, (ce_ax, dn_ax) = plt.subplots(1, 2, figsize=(10, 4.2))
    for run_dir in run_dirs:
        rungs = read_eval(run_dir)["per_rung"]
        name = Path(run_dir).name
        ce_ax.plot([r["rung"] for r in rungs], [r["ce"] for r in rungs], "o-", label=name)
        ratios = [(r["rung"], r["denoise_ratio"]) for r in rungs if r["denoise_ratio"] is not None]
        if ratios:
            dn_ax.plot(*zip(*ratios), "o-", label=name)
    ce_ax.set(xlabel="rung (0 noisiest, S-1 clean)", ylabel="teacher-forced cross-entropy (nats)")
    dn_ax.set(xlabel="rung", ylabel="denoise ratio |out - next slot|² / |in - next slot|²", yscale="log")
    dn_ax.grid(alpha=0.3)
    _save(fig, ce_ax, out)
    plt.close(fig)


def plot_free_vs_teacher_forced(run_dirs: list[Path], out: Path) -> None:
    """Free-running loss against teacher-forced loss, one point per run; the diagonal is no mismatch."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    points = []
    for run_dir in run_dirs:
        result = read_eval(run_dir)
        points.append((result["teacher_forced_loss"], result["free_running_loss"]))
        ax.plot(*points[-1], "o", label=Path(run_dir).name)
    lo, hi = min(min(p) for p in points), max(max(p) for p in points)
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="free = teacher-forced")
    ax.set(xlabel="teacher-forced clean-rung loss (nats)", ylabel="free-running loss (nats)", xscale="log", yscale="log")
    _save(fig, ax, out)
    plt.close(fig)


def plot_losses(run_dirs: list[Path], out: Path) -> None:
    """Training loss (thin) and validation loss (markers) per run against steps."""
    plt = _pyplot()
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
    ax.set(xlabel="step", ylabel="training objective (nats/token)")
    _save(fig, ax, out)
    plt.close(fig)
