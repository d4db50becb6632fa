"""Corpora, `prepare` (text -> uint16 token files), and batches for training and evaluation."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import sysconfig
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import LadderError
from .tokenizer import BpeTokenizer, CharTokenizer, Tokenizer, load_tokenizer

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idlelib", "turtledemo", "__pycache__"}
DATA_FILES = ("train.bin", "val.bin", "tokenizer.json", "meta.json")


def stdlib_documents() -> list[str]:
    """The standard library's own .py files (tests excluded), in sorted path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not STDLIB_SKIP & set(p.relative_to(root).parts))
    if not files:
        raise LadderError(f"no .py files found in the standard library at {root}")
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def shakespeare_documents(timeout: float = 30.0) -> list[str]:
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=timeout) as response:
            raw = response.read()
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # HTTPException: cut off mid-body
        raise LadderError(
            f"cannot download tiny Shakespeare ({getattr(e, 'reason', e)}); download input.txt yourself and use --source PATH"
        ) from None
    if hashlib.sha256(raw).hexdigest() != SHAKESPEARE_SHA256:
        raise LadderError("downloaded tiny Shakespeare has the wrong sha256; use --source PATH with a good copy")
    return [raw.decode("utf-8")]


def path_documents(path: Path) -> list[str]:
    """A text file is one document; a directory gives its non-hidden files in sorted order."""
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
    elif path.is_file():
        files = [path]
    else:
        raise LadderError(f"source {path} {'is not a regular file or directory' if path.exists() else 'does not exist'}")
    documents = []
    for f in files:
        try:
            documents.append(f.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise LadderError(f"{f} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not any(documents):
        raise LadderError(f"source {path} holds no text")
    return documents


def read_source(source: str) -> list[str]:
    if source == "stdlib":
        return stdlib_documents()
    if source == "shakespeare":
        return shakespeare_documents()
    return path_documents(Path(source))


def check_new_dir(out: Path) -> None:
    """Refuse an --out that is anything but absent or an empty directory: nothing is ever written over."""
    if out.is_dir():
        if entries := sorted(p.name for p in out.iterdir()):
            if all(name.startswith(".prepare.tmp-") for name in entries):  # what a killed prepare leaves behind
                left = ", ".join(entries)
                raise LadderError(f"--out {out} holds {left}, left by an interrupted prepare; delete it or choose another")
            raise LadderError(f"--out {out} is not empty; choose a new or empty directory")
    elif out.exists():
        raise LadderError(f"--out {out} is a file, not a directory")
    elif out.is_symlink():
        raise LadderError(f"--out {out} is a symlink to nothing; remove it or choose another --out")


def check_out(source: str, out: Path) -> None:
    """Refuse an --out that holds anything (never overwrite), or that a directory --source would read back."""
    if not source:
        raise LadderError("--source is empty; give stdlib, shakespeare, a text file or a directory of them")
    check_new_dir(out)
    src = Path(source)
    if source not in ("stdlib", "shakespeare") and src.is_dir() and out.resolve().is_relative_to(src.resolve()):
        raise LadderError(f"--out {out} is inside --source {source}, which would read it back; choose an --out outside it")


def prepare(source: str, tokenizer: str, out: Path, vocab_size: int = 512) -> dict:
    """Tokenize a corpus into `out`: train.bin / val.bin (first 90% / last 10%), tokenizer, meta."""
    out = Path(out)
    check_out(source, out)  # before the slow part: reading and tokenizing can take minutes
    documents = read_source(source)
    if tokenizer == "char":
        tok: Tokenizer = CharTokenizer.train(documents)
    elif tokenizer == "bpe":
        if not 257 <= vocab_size <= 65535:
            raise LadderError(f"--vocab-size must be in [257, 65535] for byte-level BPE, got {vocab_size}")
        tok = BpeTokenizer.train(documents, vocab_size)
    else:
        raise LadderError(f"unknown tokenizer {tokenizer!r}; choose char or bpe")
    if tok.vocab_size > 65536:
        raise LadderError(f"vocabulary of {tok.vocab_size} symbols does not fit uint16 token files")
    pieces = []
    for i, doc in enumerate(documents):
        if i:
            pieces.append(np.array([tok.eot_id], dtype=np.uint16))
        pieces.append(np.asarray(tok.encode(doc), dtype=np.uint16))
    ids = np.concatenate(pieces)
    n_train = int(0.9 * len(ids))
    train, val = ids[:n_train], ids[n_train:]
    if not len(train):  # one token; longer corpora always leave both splits at least one
        raise LadderError(f"source {source} gives only {len(ids)} token; too small to split into train and val")
    val_chars = len(tok.decode(val.tolist()))
    if not val_chars:  # only document boundaries (empty files at the end): nothing to score bits per character on
        raise LadderError(f"source {source}: the validation split (its last 10% of tokens) holds no text; drop its empty files")
    # NUL between documents, so that moving a boundary changes the hash; one document hashes like its file
    sha = hashlib.sha256(b"\0".join(doc.encode("utf-8") for doc in documents))
    meta = {
        "source": source,
        "tokenizer": tok.kind,
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        "sha256": sha.hexdigest(),
        "documents": len(documents),
        "train_tokens": len(train),
        "val_tokens": len(val),
        "val_chars": val_chars,
    }
    # Write a hidden temp dir, then move it into place: a failed write leaves nothing at `out`. A new
    # `out` is the temp dir renamed; an empty one is filled in place, since renaming over it needs its
    # parent writable and detaches it from a shell inside it or a mount on it.
    target = out.resolve()
    fill = target.is_dir()
    tmp = target / f".prepare.tmp-{os.getpid()}" if fill else target.parent / f".{target.name}.tmp-{os.getpid()}"
    moved = []
    try:
        tmp.mkdir(parents=True)
        train.tofile(tmp / "train.bin")
        val.tofile(tmp / "val.bin")
        tok.save(tmp / "tokenizer.json")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if not fill:
            tmp.rename(target)
        elif any(p != tmp for p in target.iterdir()):
            raise LadderError(f"--out {out} filled up meanwhile; nothing was written")
        else:
            for name in DATA_FILES:  # meta.json last: a dir without it is no data dir
                (tmp / name).rename(target / name)
                moved.append(target / name)
    except OSError as e:
        for f in moved:
            f.unlink()
        raise LadderError(f"cannot write {out}: {e.strerror or e}; nothing was written") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # on success: already renamed away, or left empty by the moves
    return meta


@dataclass
class TokenData:
    """A prepared data dir: memory-mapped splits, tokenizer and meta."""

    path: Path
    train: np.ndarray
    val: np.ndarray
    tokenizer: Tokenizer
    meta: dict

    @classmethod
    def open(cls, path: str | Path) -> TokenData:
        path = Path(path)
        if not path.is_dir():
            what = "is not a directory" if path.exists() else "does not exist"
            raise LadderError(f"data dir {path} {what}; create one with `ladderlm prepare`")
        missing = [f for f in DATA_FILES if not (path / f).is_file()]
        if missing:
            raise LadderError(f"data dir {path} lacks {', '.join(missing)}; create it with `ladderlm prepare`")
        try:
            meta = json.loads((path / "meta.json").read_text())
            vocab_size = meta["vocab_size"]  # training builds the model from it: "66" or 66.0 would crash there
            counts = [meta[k] for k in ("val_chars", "train_tokens", "val_tokens")]
            if not (type(vocab_size) is int and isinstance(meta["sha256"], str) and all(type(n) is int for n in counts)):
                raise TypeError("vocab_size, val_chars and the token counts must be integers and sha256 a string")
            if min(counts) < 0:
                raise ValueError("val_chars and the token counts cannot be negative")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise LadderError(f"data dir {path} has a corrupt meta.json ({e})") from None
        tokenizer = load_tokenizer(path / "tokenizer.json")
        if tokenizer.vocab_size != vocab_size:
            raise LadderError(f"data dir {path}: tokenizer has {tokenizer.vocab_size} symbols, meta.json says {vocab_size}")
        splits = {}
        for split in ("train", "val"):
            f = path / f"{split}.bin"
            size = f.stat().st_size
            if size % 2:
                raise LadderError(f"{f} is corrupt: odd number of bytes for uint16 tokens")
            if not size:  # prepare never writes an empty split
                raise LadderError(f"{f} holds no tokens; prepare a larger corpus")
            if size // 2 != meta[f"{split}_tokens"]:  # eval's bits per char rest on val_chars of the whole split
                raise LadderError(f"{f} is corrupt: {size // 2} tokens where meta.json says {meta[f'{split}_tokens']}")
            ids = np.memmap(f, dtype=np.uint16, mode="r")
            top = int(ids.max())  # one pass; an id past the vocabulary would crash training deep inside torch
            if top >= vocab_size:
                raise LadderError(f"{f} is corrupt: token id {top} is not below vocab_size {vocab_size}")
            splits[split] = ids
        return cls(path, splits["train"], splits["val"], tokenizer, meta)

    def batch(
        self, split: str, batch_size: int, block_size: int, generator: torch.Generator, shard: tuple[int, int] = (0, 1)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows: inputs start with <|endoftext|> then block_size-1 tokens; targets are the next tokens.

        shard = (rank, world): draw the global batch of batch_size * world windows and return the
        rank's own batch_size of them, so ranks read disjoint rows of one seeded batch.
        """
        data = self.train if split == "train" else self.val
        if len(data) < block_size:
            raise LadderError(f"{split} split has {len(data)} tokens, fewer than block_size={block_size}")
        rank, world = shard
        starts = torch.randint(len(data) - block_size + 1, (batch_size * world,), generator=generator).numpy()
        starts = starts[rank * batch_size : (rank + 1) * batch_size]
        targets = torch.from_numpy(data[starts[:, None] + np.arange(block_size)].astype(np.int64))
        eot = torch.full((batch_size, 1), self.tokenizer.eot_id, dtype=torch.int64)
        return torch.cat([eot, targets[:, :-1]], dim=1), targets
