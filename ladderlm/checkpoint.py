"""Checkpoint dirs: model.safetensors, config.json, tokenizer.json and trainer.pt, written atomically."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from .config import SAMPLING_KEYS, Config, apply_overrides, load_json, parse_override, save_json
from .errors import LadderError
from .model import LadderLM
from .tokenizer import Tokenizer, load_tokenizer

CKPT_FILES = ("model.safetensors", "config.json", "tokenizer.json")


def resolve(path: str | Path) -> Path:
    """Accept a run dir (holding ckpt/) or a checkpoint dir itself."""
    path = Path(path)
    if (path / "ckpt").is_dir():
        path = path / "ckpt"
    elif (path / "ckpt.old").is_dir():  # a crash between the two renames of `save`
        path = path / "ckpt.old"
    if not path.is_dir():
        raise LadderError(f"checkpoint dir {path} {'is not a directory' if path.exists() else 'does not exist'}")
    missing = [f for f in CKPT_FILES if not (path / f).is_file()]
    if missing:
        raise LadderError(f"{path} is not a checkpoint dir: it lacks {', '.join(missing)}")
    return path


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def recover(path: Path) -> None:
    """Undo a crash inside `save`: the previous checkpoint is back at `path`, no temp dir is left."""
    old = path.with_name(path.name + ".old")
    if not path.exists() and old.exists():
        old.rename(path)
    shutil.rmtree(path.with_name(path.name + ".tmp"), ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def save(
    path: Path,
    model: LadderLM,
    cfg: Config,
    tokenizer: Tokenizer,
    trainer_state: dict[str, Any],
    extras: dict[str, torch.nn.Module] | None = None,
) -> None:
    """Write a sibling temp dir, fsync it, then swap it in; the previous checkpoint stays until then.

    A crash at any moment leaves either `path` or `path.old` complete (see `recover`).
    """
    recover(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    had_previous = path.exists()
    tmp.mkdir(parents=True)
    try:
        save_model(model, str(tmp / "model.safetensors"))
        for name, module in (extras or {}).items():  # trained beside the model, e.g. NextLat's psi
            save_model(module, str(tmp / f"{name}.safetensors"))
        save_json(cfg, tmp / "config.json")
        tokenizer.save(tmp / "tokenizer.json")
        torch.save(trainer_state, tmp / "trainer.pt")
        for f in [*tmp.iterdir(), tmp]:
            _fsync(f)
        if had_previous:
            path.rename(old)
        tmp.rename(path)
    except (OSError, RuntimeError, SafetensorError) as e:  # a full disk (safetensors and torch.save raise their own
        # types) or a dir that refuses renames: the previous checkpoint in place, the temp one's space back
        if had_previous and not path.exists():
            with contextlib.suppress(OSError):  # else `recover` brings it back, as after a crash
                old.rename(path)
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise
        raise OSError(f"writing {tmp}: {str(e).splitlines()[0]}") from None
    _fsync(path.parent)
    if had_previous:
        shutil.rmtree(old)


def load(path: str | Path, device: str | torch.device = "cpu", overrides: list[str] = ()) -> tuple[LadderLM, Config, Tokenizer]:
    """Model (in eval mode), config and tokenizer; `overrides` may change only the sampling keys."""
    path = resolve(path)
    cfg = load_json(path / "config.json")
    for text in overrides:
        if parse_override(text)[0] not in SAMPLING_KEYS:
            raise LadderError(f"only {', '.join(SAMPLING_KEYS)} can be changed on a trained model, not {text!r}")
    cfg = apply_overrides(cfg, list(overrides))
    tokenizer = load_tokenizer(path / "tokenizer.json")
    if tokenizer.vocab_size != cfg.model.vocab_size:
        raise LadderError(f"{path}: tokenizer has {tokenizer.vocab_size} symbols but the model {cfg.model.vocab_size}")
    model = LadderLM(cfg.model)
    try:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False, device=str(device))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        why = " ".join(str(e).split())  # torch lists every mismatched tensor on its own line: one line here
        raise LadderError(f"{path / 'model.safetensors'} is corrupt or does not match config.json: {why}") from None
    if missing or unexpected:
        raise LadderError(
            f"{path / 'model.safetensors'} does not match config.json "
            f"(missing {sorted(missing)}, unexpected {sorted(unexpected)})"
        )
    # Training never saves non-finite weights; damage that makes some would fail deep inside sampling.
    if damaged := [name for name, p in model.named_parameters() if not p.isfinite().all()]:
        raise LadderError(f"{path / 'model.safetensors'} is corrupt: {damaged[0]} holds non-finite weights")
    return model.to(device).eval(), cfg, tokenizer


def load_module(path: Path, name: str, module: torch.nn.Module) -> None:
    """Load `name`.safetensors of a checkpoint dir into `module` (e.g. NextLat's psi on resume)."""
    try:
        load_model(module, str(path / f"{name}.safetensors"))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        why = " ".join(str(e).split())
        raise LadderError(f"{path / (name + '.safetensors')} is missing, corrupt or of another shape: {why}") from None


def load_trainer_state(path: Path) -> dict[str, Any]:
    """trainer.pt, its counts and names checked (a resume acts on them before anything else fails)."""
    try:
        state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types on a damaged file
        raise LadderError(f"{path / 'trainer.pt'} is missing or corrupt: {e}") from None
    if not _trainer_state_ok(state):
        raise LadderError(f"{path / 'trainer.pt'} is corrupt: not the trainer state ladderlm saves")
    return state


def _trainer_state_ok(state: Any) -> bool:
    if not isinstance(state, dict):
        return False
    counts = [state.get("step"), state.get("skipped", 0)]  # older checkpoints hold no skipped count, nor a window
    window = state.get("window", {})
    return (
        all(type(n) is int and n >= 0 for n in counts)
        and all(isinstance(state.get(k), str) for k in ("data_sha256", "tokenizer"))
        and isinstance(state.get("optimizer"), dict)
        and isinstance(state.get("evaluation_due", False), bool)
        and isinstance(window, dict)
        and all(type(v) in (int, float) for v in window.values())
    )
