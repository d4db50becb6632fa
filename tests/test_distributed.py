"""DistributedDataParallel on CPU: two gloo processes started by torchrun on loopback."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ladderlm import checkpoint
from ladderlm.cli import main

from .conftest import train_args
from .test_cli import run_bad

COMMON = ["--set", "train.max_iters=20", "--set", "train.lr_decay_iters=20", "--set", "train.log_interval=1",
          "--set", "train.eval_interval=10", "--set", "train.checkpoint_interval=5"]  # fmt: skip


def torchrun(argv, n=2, program=("-m", "ladderlm"), ok=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *program, *argv]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert (result.returncode == 0) == ok, result.stderr[-3000:]
    return result


def losses(run):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def evals(run):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]


def test_two_gloo_processes_match_one_process(tmp_path, data_dir):
    assert main(train_args(data_dir, tmp_path / "one", *COMMON, "--set", "train.batch_size=8")) == 0
    result = torchrun(train_args(data_dir, tmp_path / "two", *COMMON, "--set", "train.batch_size=4"))
    assert result.stdout.count("done:") == 1  # rank 0 speaks for the job
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [s for s, _ in two] == list(range(1, 21))  # every step logged once, by rank 0 alone
    assert max(abs(a - b) for (_, a), (_, b) in zip(one, two, strict=True)) < 1e-4
    # the in-training eval: each rank scores its rows of the global batches, as one process scores them all
    one_eval, two_eval = evals(tmp_path / "one"), evals(tmp_path / "two")
    assert [s for s, _ in two_eval] == [0, 10, 20]
    assert max(abs(a - b) for (_, a), (_, b) in zip(one_eval, two_eval, strict=True)) < 1e-4
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["ckpt", "config.json", "loss.png", "metrics.jsonl", "tb"]

    # resume under DDP: 10 steps, then 10 more, equals the 20 steps above
    half = tmp_path / "half"
    torchrun(train_args(data_dir, half, *COMMON, "--set", "train.batch_size=4", "--set", "train.max_iters=10"))
    torchrun(["train", "--data", str(data_dir), "--out", str(half), "--resume", "--no-progress", "--set", "train.max_iters=20"])
    full, resumed = load_file(tmp_path / "two" / "ckpt" / "model.safetensors"), load_file(half / "ckpt" / "model.safetensors")
    assert all((full[k] - resumed[k]).abs().max() < 1e-6 for k in full)
    assert losses(half) == losses(tmp_path / "two")


def test_a_ladder_under_two_processes_draws_noise_per_rank_and_resumes_exactly(tmp_path, data_dir):
    ladder = ["--set", "model.n_step=2", "--set", "model.first_pass=truth", "--set", "model.train_passes=1",
              "--set", "model.dropout=0.1", "--set", "train.batch_size=4"]  # fmt: skip
    full, half = tmp_path / "full", tmp_path / "half"
    torchrun(train_args(data_dir, full, *COMMON, *ladder))
    streams = checkpoint.load_trainer_state(full / "ckpt")["rank_rng"]
    assert len(streams) == 2 and not torch.equal(streams[0]["torch_rng"], streams[1]["torch_rng"])
    torchrun(train_args(data_dir, half, *COMMON, *ladder, "--set", "train.max_iters=10"))
    torchrun(["train", "--data", str(data_dir), "--out", str(half), "--resume", "--no-progress", "--set", "train.max_iters=20"])
    a, b = load_file(full / "ckpt" / "model.safetensors"), load_file(half / "ckpt" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(half) == losses(full)


DISK_FULL_ON_RANK_0 = """
import errno, os, sys
from ladderlm import checkpoint
from ladderlm.cli import main

save, saves = checkpoint.save, []

def second_save_fails(*args, **kwargs):
    saves.append(1)
    if len(saves) == 2:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return save(*args, **kwargs)

checkpoint.save = second_save_fails  # rank 0 alone saves
sys.exit(main(sys.argv[1:]))
"""


def test_a_failure_on_rank_0_stops_every_rank_with_its_line(tmp_path, data_dir):
    """Rank 0 alone writes files: when that fails the others stop with it, not at a collective's timeout."""
    script = tmp_path / "disk_full.py"
    script.write_text(DISK_FULL_ON_RANK_0)
    run = tmp_path / "run"
    result = torchrun(train_args(data_dir, run, *COMMON, "--set", "train.batch_size=4"), program=(str(script),), ok=False)
    lines = [line for line in result.stderr.splitlines() if line.startswith("ladderlm: error:")]
    assert len(lines) == 2, result.stderr
    assert all("cannot write a checkpoint" in line and "No space left" in line for line in lines)
    assert "Traceback" not in result.stderr.split("ladderlm: error:")[0]
    assert checkpoint.load_trainer_state(run / "ckpt")["step"] == 5  # the first one stays


SIGTERM_ON_RANK_1_IN_AN_EVALUATION = """
import os, signal, sys
from ladderlm.cli import main
from ladderlm.model import LadderLM

loss, trained = LadderLM.loss, []

def a_signal_in_the_first_evaluation_after_training(self, *args, **kwargs):
    if self.training:
        trained.append(1)
    elif trained and os.environ["RANK"] == "1":
        trained.clear()
        os.kill(os.getpid(), signal.SIGTERM)
    return loss(self, *args, **kwargs)

LadderLM.loss = a_signal_in_the_first_evaluation_after_training
sys.exit(main(sys.argv[1:]))
"""


def test_a_signal_to_one_rank_during_an_evaluation_stops_every_rank_there(tmp_path, data_dir):
    """Rank 1 alone is signalled, inside the evaluation at step 10: both ranks leave it at the next batch."""
    script = tmp_path / "sigterm.py"
    script.write_text(SIGTERM_ON_RANK_1_IN_AN_EVALUATION)
    run = tmp_path / "run"
    argv = train_args(data_dir, run, *COMMON, "--set", "train.batch_size=4", "--set", "train.eval_iters=50")
    result = torchrun(argv, program=(str(script),), ok=False)
    lines = sorted(line for line in result.stderr.splitlines() if line.startswith("ladderlm: "))
    assert [line.split(": stopped at step 10;")[0] for line in lines] == [
        "ladderlm: SIGTERM",
        "ladderlm: a signal on another rank",
    ], result.stderr
    assert checkpoint.load_trainer_state(run / "ckpt")["step"] == 10
    assert [step for step, _ in evals(run)] == [0]


@pytest.mark.parametrize("command", ["prepare", "sample", "eval", "bench", "explain", "plot"])
def test_only_train_runs_under_torchrun(command, monkeypatch, capsys, run_dir, data_dir, tmp_path):
    """Under torchrun every process would run the whole command (and one `prepare` would trip on another's files)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = {
        "prepare": ["prepare", "--source", str(tmp_path / "none.txt"), "--out", str(tmp_path / "data")],
        "sample": ["sample", "--ckpt", str(run_dir)],
        "eval": ["eval", "--ckpt", str(run_dir), "--data", str(data_dir)],
        "bench": ["bench"],
        "explain": ["explain", "--prompt", "ab"],
        "plot": ["plot", str(run_dir), "--out", str(tmp_path / "p.png")],
    }[command]
    run_bad(capsys, argv, run_dir, data_dir, tmp_path, match=f"{command} runs in one process")


def test_a_malformed_world_size_is_one_line(monkeypatch, capsys, data_dir, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "two")
    run_bad(capsys, train_args(data_dir, tmp_path / "run"), data_dir, tmp_path, match="WORLD_SIZE must be a positive integer")
    assert not (tmp_path / "run").exists()
