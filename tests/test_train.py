import json
from types import SimpleNamespace

import pytest
from safetensors.torch import load_file

from ladderlm import checkpoint, train
from ladderlm.cli import main

from .conftest import train_args
from .test_cli import run_bad


def test_run_dir_contents(run_dir):
    for name in ("config.json", "metrics.jsonl", "loss.png", "ckpt/model.safetensors", "ckpt/config.json",
                 "ckpt/tokenizer.json", "ckpt/trainer.pt"):  # fmt: skip
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tb").iterdir())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    assert [r["step"] for r in logged] == list(range(2, 21, 2))
    assert all({"step", "loss", "lr", "tokens_per_s", "grad_norm", "clipped"} <= r.keys() for r in logged)
    assert all(r["grad_norm"] > 0 and 0 <= r["clipped"] <= 1 for r in logged)
    assert [r["step"] for r in records if "val_loss" in r] == [0, 10, 20]
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["model"]["n_embd"] == 32 and saved["model"]["vocab_size"] > 0 and saved["version"] == 1


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_resume_is_exact(tmp_path, data_dir, dropout):
    common = ["--set", "train.lr_decay_iters=12", "--set", f"model.dropout={dropout}", "--set", "train.eval_interval=4"]
    assert main(train_args(data_dir, tmp_path / "full", *common, "--set", "train.max_iters=12")) == 0
    assert main(train_args(data_dir, tmp_path / "half", *common, "--set", "train.max_iters=6")) == 0
    assert main(["train", "--data", str(data_dir), "--out", str(tmp_path / "half"), "--resume", "--no-progress",
                 "--set", "train.max_iters=12"]) == 0  # fmt: skip
    full = load_file(tmp_path / "full" / "ckpt" / "model.safetensors")
    resumed = load_file(tmp_path / "half" / "ckpt" / "model.safetensors")
    assert full.keys() == resumed.keys()
    assert all((full[k] == resumed[k]).all() for k in full)

    def logged(run):  # the training log; the first half's final eval at step 6 is an extra record
        records = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], round(r["loss"], 6)) for r in records if "loss" in r]

    assert logged("half") == logged("full")


def test_early_passes_equal_a_resume_with_more_passes(tmp_path, data_dir):
    """train.early_passes trains exactly as stopping after early_passes_iters steps and resuming with more passes."""
    ladder = ["--set", "model.n_step=2", "--set", "train.lr_decay_iters=8", "--set", "train.eval_interval=4"]
    early = ["--set", "train.early_passes=1", "--set", "train.early_passes_iters=4"]
    assert main(train_args(data_dir, tmp_path / "scheduled", *ladder, *early, "--set", "train.max_iters=8")) == 0
    first = ["--set", "model.train_passes=1", "--set", "train.max_iters=4"]
    assert main(train_args(data_dir, tmp_path / "resumed", *ladder, *first)) == 0
    assert main(["train", "--data", str(data_dir), "--out", str(tmp_path / "resumed"), "--resume", "--no-progress",
                 "--set", "model.train_passes=0", "--set", "train.max_iters=8"]) == 0  # fmt: skip
    scheduled = load_file(tmp_path / "scheduled" / "ckpt" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "ckpt" / "model.safetensors")
    assert all((scheduled[k] == resumed[k]).all() for k in scheduled)
    # and the schedule does change training
    assert main(train_args(data_dir, tmp_path / "plain", *ladder, "--set", "train.max_iters=8")) == 0
    plain = load_file(tmp_path / "plain" / "ckpt" / "model.safetensors")
    assert any((plain[k] != scheduled[k]).any() for k in scheduled)


def test_refuses_to_overwrite_a_run(run_dir, data_dir, capsys):
    before = (run_dir / "metrics.jsonl").read_bytes()
    assert main(train_args(data_dir, run_dir)) == 1
    assert "already holds a run" in capsys.readouterr().err
    assert (run_dir / "metrics.jsonl").read_bytes() == before


def test_a_new_run_needs_an_absent_or_empty_out_dir(tmp_path, data_dir, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"important": 1}')
    run_bad(capsys, train_args(data_dir, mine), tmp_path, match="is not empty")
    run_bad(capsys, train_args(data_dir, mine / "config.json"), tmp_path, match="is a file")
    (tmp_path / "empty").mkdir()
    assert main(train_args(data_dir, tmp_path / "empty", "--set", "train.max_iters=2")) == 0


def test_a_run_that_died_before_its_first_checkpoint_says_what_to_do(tmp_path, data_dir, capsys):
    run = tmp_path / "run"
    nan = ["--set", "train.learning_rate=1e30", "--set", "train.min_lr=0", "--set", "train.warmup_iters=0"]
    assert main(train_args(data_dir, run, *nan, "--set", "train.max_iters=50")) == 1
    capsys.readouterr()
    run_bad(capsys, train_args(data_dir, run), tmp_path, match="stopped before its first checkpoint; remove it")
    run_bad(capsys, ["train", "--data", str(data_dir), "--out", str(run), "--resume"], tmp_path,
            match="stopped before its first checkpoint; remove it")  # fmt: skip
    # A run that failed before its first step (here: out of memory) leaves config.json and tb/ alone.
    (run / "metrics.jsonl").unlink()
    run_bad(capsys, train_args(data_dir, run), tmp_path, match="stopped before its first checkpoint; remove it")
    run_bad(capsys, ["train", "--data", str(data_dir), "--out", str(run), "--resume"], tmp_path,
            match="stopped before its first checkpoint; remove it")  # fmt: skip


def test_resume_refuses_what_cannot_continue(run_dir, data_dir, capsys):
    resume = ["train", "--data", str(data_dir), "--out", str(run_dir), "--resume", "--no-progress"]
    run_bad(capsys, [*resume, "--set", "train.max_iters=5"], run_dir, match="at step 20; train.max_iters=5 is before it")
    for key in ("model.n_layer=1", "model.n_embd=64", "model.block_size=32", "nextlat.horizon=1", "model.n_head=1"):
        run_bad(capsys, [*resume, "--set", key], run_dir, match=f"cannot resume with another {key.split('=')[0]}")


def test_resuming_a_finished_run_logs_its_last_evaluation_once(tmp_path, data_dir, capsys):
    run = tmp_path / "run"
    assert main(train_args(data_dir, run, "--set", "train.max_iters=4", "--set", "train.eval_interval=2")) == 0
    before = (run / "metrics.jsonl").read_text()
    assert main(["train", "--data", str(data_dir), "--out", str(run), "--resume", "--no-progress"]) == 0
    assert (run / "metrics.jsonl").read_text() == before  # the final evaluation is kept, not logged again


def test_a_second_run_starting_in_the_same_dir_stops_at_once(tmp_path):
    from ladderlm.config import Config
    from ladderlm.errors import LadderError
    from ladderlm.train import Run

    run = Run(tmp_path)
    run.check_fresh()  # both processes pass the check before either writes
    run.claim(Config(), fresh=True)
    with pytest.raises(LadderError, match="another run is starting"):
        run.claim(Config(), fresh=True)


def resume_args(data_dir, run, *extra) -> list[str]:
    return ["train", "--data", str(data_dir), "--out", str(run), "--resume", "--no-progress", *extra]


def test_tokens_per_s_counts_the_steps_time_not_an_evaluation_inside_the_window(tmp_path, data_dir, monkeypatch):
    """eval_interval 3, log_interval 2: the eval after step 3 falls inside the window of steps 3-4."""
    clock = [0.0]
    forward, estimate = train.Objective.forward, train.estimate_loss

    def a_step_takes_a_second(self, *args):
        clock[0] += 1.0
        return forward(self, *args)

    def an_eval_takes_100_seconds(*args, **kwargs):
        clock[0] += 100.0
        return estimate(*args, **kwargs)

    monkeypatch.setattr(train, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(train.Objective, "forward", a_step_takes_a_second)
    monkeypatch.setattr(train, "estimate_loss", an_eval_takes_100_seconds)
    run = tmp_path / "run"
    assert main(train_args(data_dir, run, "--set", "train.max_iters=6", "--set", "train.eval_interval=3")) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["tokens_per_s"] for r in records if "loss" in r] == [4 * 16] * 3  # batch_size x block_size a second


def test_resuming_a_finished_run_for_more_steps_keeps_its_last_evaluation(tmp_path, data_dir):
    """The final evaluation at a step off eval_interval stays, in metrics.jsonl and TensorBoard, as does the log at that step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert main(train_args(data_dir, run, "--set", "train.max_iters=6", "--set", "train.eval_interval=4")) == 0
    assert main(resume_args(data_dir, run, "--set", "train.max_iters=8")) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_loss" in r] == [0, 4, 6, 8]
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6, 8]
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("val_loss")] == [0, 4, 6, 8]
    assert [e.step for e in events.Scalars("loss")] == [2, 4, 6, 8]


def test_resuming_with_other_evaluation_settings_evaluates_again(tmp_path, data_dir):
    """The final evaluation was of 2 batches a split; the resumed run asks for 3: it is replaced, not reused."""
    run = tmp_path / "run"
    assert main(train_args(data_dir, run, "--set", "train.max_iters=4", "--set", "train.eval_interval=2",
                           "--set", "train.eval_iters=2")) == 0  # fmt: skip
    before = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert main(resume_args(data_dir, run, "--set", "train.eval_iters=3")) == 0
    after = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert after[:-1] == [r for r in before if not (r["step"] == 4 and "val_loss" in r)]
    assert after[-1]["step"] == 4 and after[-1]["val_loss"] != before[-1]["val_loss"]


def test_resume_trains_with_a_changed_weight_decay_and_betas(tmp_path, data_dir):
    run = tmp_path / "run"
    assert main(train_args(data_dir, run, "--set", "train.max_iters=2")) == 0
    changed = ["--set", "train.max_iters=3", "--set", "train.weight_decay=0.0", "--set", "train.beta1=0.5"]
    assert main(resume_args(data_dir, run, *changed)) == 0
    groups = checkpoint.load_trainer_state(run / "ckpt")["optimizer"]["param_groups"]
    assert [(g["weight_decay"], tuple(g["betas"])) for g in groups] == [(0.0, (0.5, 0.99))] * 2


def test_each_rank_evaluates_with_its_own_noise(run_dir, data_dir, monkeypatch):
    """Ranks score different rows; their ladders' noise must differ too (it was one stream, alike on every rank)."""
    import torch

    from ladderlm.data import TokenData
    from ladderlm.distributed import Dist

    model, cfg, _ = checkpoint.load(run_dir)
    first_draws = []

    def record_first_draw(x, y, noise):
        first_draws.append(torch.randn(4, generator=noise))
        return torch.zeros(())

    monkeypatch.setattr(model, "loss", record_first_draw)
    monkeypatch.setattr(Dist, "mean", lambda self, t: t)  # no process group here: each rank alone
    for rank in (0, 1):
        train.estimate_loss(model, TokenData.open(data_dir), cfg, Dist(rank, 2, torch.device("cpu")))
    per_rank = first_draws[: cfg.train.eval_iters * 2], first_draws[cfg.train.eval_iters * 2 :]
    assert not torch.equal(per_rank[0][0], per_rank[1][0])


def test_nextlat_with_both_weights_zero_trains_under_ddp(tmp_path, data_dir):
    """psi is made but nothing trains it: DDP must not wait for its gradients (it raised at the second step)."""
    from .test_distributed import torchrun

    idle = ["--set", "nextlat.horizon=2", "--set", "nextlat.lambda_h=0", "--set", "nextlat.lambda_kl=0",
            "--set", "train.max_iters=3"]  # fmt: skip
    torchrun(train_args(data_dir, tmp_path / "two", *idle, "--set", "train.batch_size=2"))
    assert main(train_args(data_dir, tmp_path / "one", *idle)) == 0
    two, one = (load_file(tmp_path / run / "ckpt" / "psi.safetensors") for run in ("two", "one"))
    assert all((two[k] == one[k]).all() for k in one)  # untouched, as in one process
    two, one = (load_file(tmp_path / run / "ckpt" / "model.safetensors") for run in ("two", "one"))
    assert all((two[k] - one[k]).abs().max() < 1e-4 for k in one)  # the ranks' sums round differently
