"""Figures of runs: loss curves (metrics.jsonl) and evaluation results (eval.json, `ladderlm eval --save`)."""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import numpy as np

from .config import write_whole
from .errors import LadderError


def _number(x) -> bool:
    """A JSON number matplotlib can take: a float, or an integer within a float's range."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return False
    try:
        float(x)
    except OverflowError:
        return False
    return True


def _infinite(x) -> bool:
    return isinstance(x, float) and math.isinf(x)


def _run_file(run_dir: Path, name: str) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise LadderError(f"run dir {run_dir} does not exist")
    if not run_dir.is_dir():
        raise LadderError(f"{run_dir} is not a run dir (the directory `ladderlm train --out` writes)")
    return run_dir / name


def _name(run_dir: Path) -> str:
    return Path(run_dir).absolute().name  # `plot .` gets a legend entry too


def _names(run_dirs: list[Path]) -> list[str]:
    """Legend names: the runs' dir names, or their whole paths where two share one (seed1/gpt, seed2/gpt)."""
    names = [_name(d) for d in run_dirs]
    return names if len(set(names)) == len(names) else [str(Path(d).absolute()) for d in run_dirs]


PLOTTED = ("step", "loss", "val_loss")


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of a run's metrics.jsonl, less a torn last line."""
    path = _run_file(run_dir, "metrics.jsonl")
    if not path.is_file():
        raise LadderError(f"{run_dir} has no metrics.jsonl")
    lines = [(n, line) for n, line in enumerate(path.read_bytes().splitlines(), 1) if line.strip()]
    records = []
    for n, line in lines:
        try:
            record = json.loads(line.decode())
        except ValueError as e:  # not UTF-8, not JSON, or an integer past Python's 4300 digits
            if n == lines[-1][0]:
                break  # a kill in the middle of a write; `train` skips it too
            why = (
                "not UTF-8 text"
                if isinstance(e, UnicodeDecodeError)
                else f"{e.msg} at column {e.colno}"
                if isinstance(e, json.JSONDecodeError)
                else str(e).split(";")[0]
            )
            raise LadderError(f"{path} line {n} is corrupt ({why}); fix or delete that line") from None
        if isinstance(record, dict):  # a non-finite loss (logged as null, strict JSON) is a gap in the curve
            record.update({k: math.nan for k in PLOTTED[1:] if k in record and (record[k] is None or _infinite(record[k]))})
        # "step" is in every record `train` writes; "loss" and "val_loss" only in some
        if not isinstance(record, dict) or "step" not in record or any(k in record and not _number(record[k]) for k in PLOTTED):
            raise LadderError(f"{path} line {n} is not a metrics record (an object with numbers for {', '.join(PLOTTED)})")
        records.append(record)
    return records


def read_eval(run_dir: Path) -> dict:
    path = _run_file(run_dir, "eval.json")
    if not path.is_file():
        raise LadderError(f"{run_dir} has no eval.json; write it with `ladderlm eval --ckpt {run_dir} --data DATA --save`")
    try:
        result = json.loads(path.read_text())
    except ValueError as e:  # not UTF-8, not JSON, or an integer past Python's 4300 digits
        raise LadderError(f"{path} is corrupt: {e}") from None
    if not isinstance(result, dict):
        raise LadderError(f"{path} is not an eval result; rewrite it with `ladderlm eval --ckpt {run_dir} --data DATA --save`")
    return result


def _eval_fields(run_dir: Path, **checks) -> list:
    """The fields of the run's eval.json that `checks` name, each accepted by its check; an old eval.json may lack them."""
    result = read_eval(run_dir)
    for key, ok in checks.items():
        if key not in result or not ok(result[key]):
            what = "lacks" if key not in result else "has a malformed"
            path = Path(run_dir) / "eval.json"
            raise LadderError(f"{path} {what} {key!r}; rewrite it with `ladderlm eval --ckpt {run_dir} --data DATA --save`")
    return [result[key] for key in checks]


def _rungs_ok(rungs) -> bool:
    return (
        isinstance(rungs, list)
        and len(rungs) > 0
        and all(isinstance(r, dict) and _number(r.get("rung")) and _number(r.get("ce")) for r in rungs)
        and all(r.get("denoise_ratio") is None or _number(r["denoise_ratio"]) for r in rungs)
    )


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def check_out(out: Path) -> Path:
    """Refuse an --out that matplotlib would write elsewhere (a dir, no extension) or not at all, before any work."""
    import matplotlib
    from matplotlib.backend_bases import FigureCanvasBase

    out = Path(out)
    if out.is_dir():
        raise LadderError(f"--out {out} is a directory; give a file such as {out / 'loss.png'}")
    if not out.parent.is_dir():
        what = "is not a directory" if out.parent.exists() else "does not exist"
        raise LadderError(f"--out {out}: {out.parent} {what}")
    formats = FigureCanvasBase.get_supported_filetypes()
    ext = out.suffix[1:].lower()
    if ext not in formats:
        # with no extension matplotlib would silently write OUT.png
        what = f"has unsupported extension .{ext}" if ext else "has no extension"
        raise LadderError(f"--out {out} {what}; use one of: {', '.join(sorted(formats))}")
    texsystem = matplotlib.rcParams["pgf.texsystem"]
    if ext == "pgf" and shutil.which(texsystem) is None:
        raise LadderError(f"--out {out}: writing .pgf needs {texsystem}, which is not installed")
    return out


def plot(kind: str, run_dirs: list[Path], out: Path) -> Path:
    """Write figure `kind` (losses, rungs or free-vs-tf) of the runs to `out`; returns the path written."""
    out = check_out(out)
    {"losses": plot_losses, "rungs": plot_rungs, "free-vs-tf": plot_free_vs_teacher_forced}[kind](run_dirs, out)
    return out


LEGEND_ROWS = 24  # entries at fontsize 8 that fit the height of these figures


def _save(fig, ax, out: Path) -> None:
    ax.grid(alpha=0.3)
    entries = len(ax.get_legend_handles_labels()[0])  # none: an empty legend only warns
    if 0 < entries <= LEGEND_ROWS // 2:
        ax.legend(fontsize=8)
    elif entries:  # many runs: beside the plot in columns, the figure widened for them, not over the curves
        columns = -(-entries // LEGEND_ROWS)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1), ncol=columns)
        fig.set_size_inches(fig.get_figwidth() + 1.7 * columns, fig.get_figheight())
    image = io.BytesIO()
    try:
        with np.errstate(all="ignore"):  # values near float64's limits: matplotlib's overflows are its own
            fig.tight_layout()
            fig.savefig(image, format=out.suffix[1:].lower(), dpi=120)
    except (ValueError, OverflowError) as e:
        raise LadderError(f"cannot draw {out}: values too near float64's limits for an axis ({e})") from None
    finally:
        fig.clf()
    write_whole(out, image.getvalue())  # a full disk leaves the old figure, not a truncated one


def plot_rungs(run_dirs: list[Path], out: Path) -> None:
    """Per-rung teacher-forced cross-entropy (left) and denoise ratio (right, rungs 1..S-1) per run."""
    runs = [(name, *_eval_fields(d, per_rung=_rungs_ok)) for name, d in zip(_names(run_dirs), run_dirs)]  # all read first
    plt = _pyplot()
    fig, (ce_ax, dn_ax) = plt.subplots(1, 2, figsize=(10, 4.2))
    for name, rungs in runs:
        ce_ax.plot([r["rung"] for r in rungs], [r["ce"] for r in rungs], "o-", label=name)
        ratios = [(r["rung"], r["denoise_ratio"]) for r in rungs if r.get("denoise_ratio") is not None]
        if ratios:
            dn_ax.plot(*zip(*ratios), "o-", label=name)
    ce_ax.set(xlabel="rung (0 noisiest, S-1 clean)", ylabel="teacher-forced cross-entropy (nats)")
    dn_ax.set(xlabel="rung", ylabel="denoise ratio |out - next slot|² / |in - next slot|²", yscale="log")
    dn_ax.grid(alpha=0.3)
    _save(fig, ce_ax, out)
    plt.close(fig)


def plot_free_vs_teacher_forced(run_dirs: list[Path], out: Path) -> None:
    """Free-running loss against teacher-forced loss, one point per run; the diagonal is no mismatch."""
    points = []
    for name, d in zip(_names(run_dirs), run_dirs):
        tf, free = _eval_fields(d, teacher_forced_loss=_number, free_running_loss=_number)
        if not all(math.isfinite(x) and x > 0 for x in (tf, free)):  # a diverged run: log axes cannot place it
            losses = f"{tf} (teacher-forced), {free} (free-running)"
            raise LadderError(f"{Path(d) / 'eval.json'} has losses {losses} that log axes cannot show")
        points.append((name, tf, free))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    for name, tf, free in points:
        ax.plot(tf, free, "o", label=name)
    lo, hi = min(min(p[1:]) for p in points), max(max(p[1:]) for p in points)
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="free = teacher-forced")
    ax.set(xlabel="teacher-forced clean-rung loss (nats)", ylabel="free-running loss (nats)", xscale="log", yscale="log")
    _save(fig, ax, out)
    plt.close(fig)


def plot_losses(run_dirs: list[Path], out: Path) -> None:
    """Training loss (thin) and validation loss (markers) per run against steps."""
    runs = [(name, read_metrics(d)) for name, d in zip(_names(run_dirs), run_dirs)]  # read all before drawing
    if not any("loss" in r or "val_loss" in r for _, records in runs for r in records):
        raise LadderError(f"no losses logged yet in {', '.join(map(str, run_dirs))}: nothing to plot")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, records in runs:
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        if train:
            line = ax.plot(*zip(*train), lw=0.8, alpha=0.7, label=f"{name} train")[0]
        if val:
            ax.plot(*zip(*val), "o-", ms=3, color=line.get_color() if train else None, label=f"{name} val")
    ax.set(xlabel="step", ylabel="training objective (nats/token)")
    _save(fig, ax, out)
    plt.close(fig)
