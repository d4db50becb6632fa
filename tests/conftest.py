from pathlib import Path

import pytest
import torch

from ladderlm.cli import main
from ladderlm.config import ModelConfig
from ladderlm.data import prepare
from ladderlm.model import LadderLM

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"

CORPUS = "".join(
    f"The {animal} number {i} jumps over the {thing}; it says {word!r}.\n"
    for i in range(400)
    for animal, thing, word in [(["cat", "dog", "fox"][i % 3], ["moon", "fence", "log", "river"][i % 4], f"w{i % 7}")]
)

TINY = [
    "--set", "model.n_layer=2", "--set", "model.n_head=2", "--set", "model.n_embd=32",
    "--set", "model.block_size=16", "--set", "train.batch_size=4", "--set", "train.eval_iters=2",
    "--set", "train.warmup_iters=2", "--set", "train.log_interval=2",
]  # fmt: skip


def train_args(data_dir, out, *extra) -> list[str]:
    """`ladderlm train` of the tiny model on the test corpus."""
    return [
        "train",
        "--preset",
        "shakespeare-char-cpu",
        "--data",
        str(data_dir),
        "--out",
        str(out),
        "--no-progress",
        *TINY,
        *extra,
    ]


def tiny_model(n_step: int = 1, vocab_size: int = 11, block_size: int = 12, seed: int = 0, **kw) -> LadderLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=8 * n_step, block_size=block_size, n_step=n_step, **kw)
    return LadderLM(cfg).eval()


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(CORPUS)
    return path


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, corpus_file) -> Path:
    out = tmp_path_factory.mktemp("data") / "char"
    prepare(str(corpus_file), "char", out)
    return out


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, data_dir) -> Path:
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(train_args(data_dir, out, "--set", "train.max_iters=20", "--set", "train.eval_interval=10")) == 0
    return out
