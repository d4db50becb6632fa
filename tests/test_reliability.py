"""Crashes, signals, bad numbers and hostile inputs: nothing lost, nothing silent, no traceback."""

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ladderlm import checkpoint, train
from ladderlm.cli import main

from .conftest import train_args
from .test_cli import run_bad


def spawn(argv):
    cmd = [sys.executable, "-m", "ladderlm", *argv]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # same threads as here: same floats


def wait_for_step(proc, run, step, timeout=60.0):
    """Poll the run's metrics until a logged step >= `step`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            lines = (run / "metrics.jsonl").read_text().splitlines()
            if any(json.loads(line).get("step", 0) >= step for line in lines[:-1]):
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.01)
    raise AssertionError("training did not get there in time")


def metrics(run) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in (run / "metrics.jsonl").open()]


def weights(run):
    return load_file(run / "ckpt" / "model.safetensors")


def test_kill_9_then_resume_equals_the_uninterrupted_run(tmp_path, data_dir):
    common = ["--set", "train.max_iters=300", "--set", "train.checkpoint_interval=7", "--set", "train.eval_interval=1000",
              "--set", "model.dropout=0.1"]  # fmt: skip
    assert main(train_args(data_dir, tmp_path / "full", *common)) == 0
    proc = spawn(train_args(data_dir, tmp_path / "crashed", *common))
    wait_for_step(proc, tmp_path / "crashed", 40)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    argv = ["train", "--data", str(data_dir), "--out", str(tmp_path / "crashed"), "--resume", "--no-progress"]
    assert main(argv) == 0
    full, resumed = weights(tmp_path / "full"), weights(tmp_path / "crashed")
    assert full.keys() == resumed.keys() and all((full[k] == resumed[k]).all() for k in full)
    # The same records too, timings aside: checkpoints every 7 steps, records every 2, so the resumed run
    # continues a window the crashed one began (its steps were in no record before).
    records = [metrics(tmp_path / name) for name in ("full", "crashed")]
    assert records[0] == records[1] and len(records[0]) == 150 + 2
    assert not (tmp_path / "crashed" / "ckpt.tmp").exists() and not (tmp_path / "crashed" / "ckpt.old").exists()


def test_sigterm_writes_a_loadable_checkpoint(tmp_path, data_dir):
    run = tmp_path / "run"
    proc = spawn(train_args(data_dir, run, "--set", "train.max_iters=100000", "--set", "train.checkpoint_interval=100000"))
    wait_for_step(proc, run, 10)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ladderlm: SIGTERM: stopped at step") and "Traceback" not in err.decode()
    step = int(lines[0].split("stopped at step ")[1].split(";")[0])
    assert checkpoint.load_trainer_state(run / "ckpt")["step"] == step >= 10
    checkpoint.load(run)
    assert main(["train", "--data", str(data_dir), "--out", str(run), "--resume", "--no-progress",
                 "--set", f"train.max_iters={step + 3}"]) == 0  # fmt: skip


@pytest.mark.parametrize("skips", [0, 2])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_dir, capsys, skips):
    run = tmp_path / "run"
    argv = train_args(data_dir, run, "--set", "train.max_iters=50", "--set", "train.checkpoint_interval=1",
                      "--set", "train.warmup_iters=0", "--set", "train.learning_rate=1e30", "--set", "train.min_lr=0",
                      "--set", f"train.skip_nonfinite={skips}")  # fmt: skip
    assert main(argv) == 1
    captured = capsys.readouterr()
    err = captured.err
    assert err.count("\n") == 1 and err.startswith("ladderlm: error: step ") and ("is nan" in err or "is inf" in err)
    assert "last good checkpoint" in err
    assert captured.out.count("skipped") == skips
    good = checkpoint.load_trainer_state(run / "ckpt")["step"]
    model, _, _ = checkpoint.load(run)
    assert good >= 1 and all(p.isfinite().all() for p in model.parameters())


def test_weights_made_non_finite_by_a_finite_loss_are_never_saved(tmp_path, data_dir, capsys):
    """lr 1e39 is inf in float32: step 1's loss is finite, its update is not."""
    run = tmp_path / "run"
    lr = ["--set", "train.warmup_iters=0", "--set", "train.learning_rate=1e39", "--set", "train.min_lr=0"]
    argv = train_args(data_dir, run, "--set", "train.max_iters=5", "--set", "train.checkpoint_interval=1", *lr)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "weights are not finite" in err and "none written yet" in err
    assert not (run / "ckpt").exists()


def test_a_skipped_step_is_not_evaluated_twice_and_a_resume_keeps_the_skip_count(tmp_path, data_dir, capsys, monkeypatch):
    forward = train.Objective.forward
    calls = []

    def nan_at_first_call(self, *args):
        loss = forward(self, *args)
        calls.append(1)
        return loss * float("nan") if len(calls) == 1 else loss

    monkeypatch.setattr(train.Objective, "forward", nan_at_first_call)
    run = tmp_path / "run"
    skip_one = ["--set", "train.skip_nonfinite=1", "--set", "train.checkpoint_interval=1"]
    assert main(train_args(data_dir, run, "--set", "train.max_iters=4", *skip_one)) == 0
    evaluated = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]
    assert evaluated == [0, 4] and capsys.readouterr().out.count("skipped") == 1
    assert checkpoint.load_trainer_state(run / "ckpt")["skipped"] == 1
    calls.clear()  # the resumed run's first step is non-finite too: the one allowed skip is spent
    resume = ["train", "--data", str(data_dir), "--out", str(run), "--resume", "--no-progress", "--set", "train.max_iters=6"]
    assert main(resume) == 1
    assert "step 5: loss is nan, gradient norm is nan; training stopped" in capsys.readouterr().err


def test_a_signal_during_skipped_steps_stops_there(tmp_path, data_dir, capsys, monkeypatch):
    """From the third step on every loss is NaN and SIGTERM arrives: with 100 skips allowed, the run
    stops at step 2 (it went on skipping until the skips ran out); steps 1-2 are logged after the resume."""
    forward = train.Objective.forward
    calls = []

    def nan_and_a_signal_from_the_third_call(self, *args):
        loss = forward(self, *args)
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss * float("nan") if len(calls) >= 3 else loss

    monkeypatch.setattr(train.Objective, "forward", nan_and_a_signal_from_the_third_call)
    run = tmp_path / "run"
    common = ["--set", "train.log_interval=10", "--set", "train.eval_interval=1000"]
    argv = train_args(data_dir, run, "--set", "train.max_iters=50", "--set", "train.skip_nonfinite=100", *common)
    assert main(argv) == 130
    captured = capsys.readouterr()
    assert captured.err.startswith("ladderlm: SIGTERM: stopped at step 2;") and captured.out.count("skipped") == 1
    assert checkpoint.load_trainer_state(run / "ckpt")["step"] == 2
    monkeypatch.setattr(train.Objective, "forward", forward)
    resume = ["train", "--data", str(data_dir), "--out", str(run), "--resume", "--no-progress", "--set", "train.max_iters=12"]
    assert main([*resume, *common]) == 0
    logged = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in logged] == [10, 12]


def test_a_signal_during_an_evaluation_stops_it_and_the_resume_evaluates_again(tmp_path, data_dir, capsys, monkeypatch):
    """SIGTERM inside the first batch of the evaluation at step 4 (of 50 batches): no further batch is scored,
    the checkpoint is at step 4, and the resumed run's records and weights are the uninterrupted run's."""
    from ladderlm.model import LadderLM

    loss, calls = LadderLM.loss, []

    def a_signal_in_the_first_batch_of_the_second_evaluation(self, *args, **kwargs):
        if not self.training:
            calls.append(1)
            if len(calls) == 2 * 50 + 1:
                os.kill(os.getpid(), signal.SIGTERM)
        return loss(self, *args, **kwargs)

    common = ["--set", "train.max_iters=6", "--set", "train.eval_interval=4", "--set", "train.eval_iters=50",
              "--set", "train.log_interval=2"]  # fmt: skip
    assert main(train_args(data_dir, tmp_path / "full", *common)) == 0
    monkeypatch.setattr(LadderLM, "loss", a_signal_in_the_first_batch_of_the_second_evaluation)
    run = tmp_path / "run"
    assert main(train_args(data_dir, run, *common)) == 130
    assert capsys.readouterr().err.startswith("ladderlm: SIGTERM: stopped at step 4;") and len(calls) == 2 * 50 + 1
    assert checkpoint.load_trainer_state(run / "ckpt")["step"] == 4
    assert [r["step"] for r in metrics(run) if "val_loss" in r] == [0]
    monkeypatch.setattr(LadderLM, "loss", loss)
    assert main(["train", "--data", str(data_dir), "--out", str(run), "--resume", "--no-progress", *common]) == 0
    assert metrics(run) == metrics(tmp_path / "full")
    full, resumed = weights(tmp_path / "full"), weights(run)
    assert all((full[k] == resumed[k]).all() for k in full)


def test_an_evaluation_a_signal_stopped_is_done_by_the_resume_even_off_the_interval(tmp_path, data_dir, monkeypatch):
    """The evaluation at max_iters = 6 (off eval_interval = 4) is stopped, and so is the resume's redoing of it;
    the second resume, for 10 steps, logs and trains as finishing at 6 and then resuming for 10 does."""
    from ladderlm.model import LadderLM

    loss, calls = LadderLM.loss, []

    def a_signal_at_eval_call(n):
        def counted(self, *args, **kwargs):
            if not self.training:
                calls.append(1)
                if len(calls) == n:
                    os.kill(os.getpid(), signal.SIGTERM)
            return loss(self, *args, **kwargs)

        return counted

    common = ["--set", "train.eval_interval=4", "--set", "train.eval_iters=5", "--set", "train.log_interval=2"]
    resume = ["train", "--data", str(data_dir), "--no-progress", "--resume", "--set", "train.max_iters=10", *common]
    full, run = tmp_path / "full", tmp_path / "run"
    assert main(train_args(data_dir, full, "--set", "train.max_iters=6", *common)) == 0
    assert main([*resume, "--out", str(full)]) == 0
    monkeypatch.setattr(LadderLM, "loss", a_signal_at_eval_call(2 * 2 * 5 + 1))  # evaluations at 0 and 4, then 6's first batch
    assert main(train_args(data_dir, run, "--set", "train.max_iters=6", *common)) == 130
    calls.clear()
    monkeypatch.setattr(LadderLM, "loss", a_signal_at_eval_call(1))
    assert main([*resume, "--out", str(run)]) == 130
    assert checkpoint.load_trainer_state(run / "ckpt")["step"] == 6
    monkeypatch.setattr(LadderLM, "loss", loss)
    assert main([*resume, "--out", str(run)]) == 0
    assert [r["step"] for r in metrics(run) if "val_loss" in r] == [0, 4, 6, 8, 10]
    assert metrics(run) == metrics(full)
    a, b = weights(full), weights(run)
    assert all((a[k] == b[k]).all() for k in a)


def test_a_resume_that_ends_at_its_checkpoint_logs_the_steps_it_holds(tmp_path, data_dir, monkeypatch):
    """Stopped after step 7 (log_interval 4: steps 5-7 not logged), resumed with max_iters=7: the record at 7
    is written, as a run straight to 7 writes it (the same learning-rate schedule: lr_decay_iters fixed)."""
    forward, calls = train.Objective.forward, []

    def a_signal_in_the_seventh_step(self, *args):
        calls.append(1)
        if len(calls) == 7:
            os.kill(os.getpid(), signal.SIGTERM)
        return forward(self, *args)

    common = ["--set", "train.log_interval=4", "--set", "train.eval_interval=100", "--set", "train.lr_decay_iters=100"]
    straight, run = tmp_path / "straight", tmp_path / "run"
    assert main(train_args(data_dir, straight, "--set", "train.max_iters=7", *common)) == 0
    monkeypatch.setattr(train.Objective, "forward", a_signal_in_the_seventh_step)
    assert main(train_args(data_dir, run, "--set", "train.max_iters=100", *common)) == 130
    monkeypatch.setattr(train.Objective, "forward", forward)
    resume = ["train", "--data", str(data_dir), "--out", str(run), "--resume", "--no-progress", "--set", "train.max_iters=7"]
    assert main(resume) == 0
    assert [r["step"] for r in metrics(run)] == [0, 4, 7, 7] and metrics(run) == metrics(straight)
    assert main(resume) == 0  # resuming the finished run again logs nothing twice
    assert metrics(run) == metrics(straight)


@pytest.mark.parametrize(
    "line, match",
    [
        (b'{"step": "4", "loss": 3.0}', "line 2 is not a metrics record"),
        (b'{"step": 4, "loss": 3.\xff}', "line 2 is corrupt (not UTF-8 text)"),
        (b'{"step": 4, "loss": 3.0', "line 2 is corrupt"),
    ],
)
def test_a_resume_stops_at_a_corrupt_metrics_line_and_keeps_it(tmp_path, run_dir, data_dir, capsys, line, match):
    """Only a torn last line is what a crash leaves; a bad line before it is refused, not silently dropped."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    text = b'{"step": 2, "loss": 4.0}\n' + line + b'\n{"step": 6, "loss": 3.6}\n'
    (run / "metrics.jsonl").write_bytes(text)
    run_bad(capsys, ["train", "--data", str(data_dir), "--out", str(run), "--resume", "--no-progress"], tmp_path, match=match)
    assert (run / "metrics.jsonl").read_bytes() == text


@pytest.mark.parametrize(
    "damage",
    [
        lambda s: {**s, "step": 1.5},
        lambda s: {**s, "step": -5},
        lambda s: {**s, "step": "x"},
        lambda s: {**s, "skipped": None},
        lambda s: {},
        lambda s: [s],
        lambda s: {k: v for k, v in s.items() if k != "optimizer"},
        lambda s: {**s, "optimizer": {}},
        lambda s: {**s, "data_rng": torch.zeros(3)},
        lambda s: {**s, "rank_rng": []},
        lambda s: {**s, "rank_rng": [{"bogus": 1}]},
        lambda s: {**s, "window": {"bogus": 1}},
        lambda s: {**s, "window": {"steps": "x"}},
        lambda s: {**s, "window": 5},
    ],
)
def test_a_well_formed_but_wrong_trainer_state_is_one_line_and_changes_nothing(tmp_path, run_dir, data_dir, capsys, damage):
    """A trainer.pt that torch reads but that is not what ladderlm saves: refused before metrics.jsonl is rewritten."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    state = torch.load(run / "ckpt" / "trainer.pt", weights_only=True)
    torch.save(damage(state), run / "ckpt" / "trainer.pt")
    argv = ["train", "--data", str(data_dir), "--out", str(run), "--resume", "--no-progress", "--set", "train.max_iters=30"]
    run_bad(capsys, argv, tmp_path, match="is corrupt")


def test_a_damaged_optimizer_state_is_corruption_even_with_keys_changed(tmp_path, run_dir, data_dir, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    state = torch.load(run / "ckpt" / "trainer.pt", weights_only=True)
    torch.save({**state, "optimizer": {"state": {}}}, run / "ckpt" / "trainer.pt")
    argv = ["train", "--data", str(data_dir), "--out", str(run), "--resume", "--no-progress", "--set", "model.dropout=0.05"]
    run_bad(capsys, argv, tmp_path, match="trainer.pt is corrupt: its optimizer state is not torch's (no 'param_groups')")


@pytest.mark.parametrize("writer", ["save_model", "torch"])
def test_a_full_disk_inside_a_checkpoint_write_is_one_line_and_keeps_the_last_one(
    tmp_path, data_dir, capsys, monkeypatch, writer
):
    """safetensors and torch.save report a full disk as their own errors (seen on a 600k tmpfs), not OSError."""
    from safetensors import SafetensorError

    calls = []
    real = checkpoint.save_model if writer == "save_model" else checkpoint.torch.save

    def full_at_the_second_checkpoint(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            if writer == "save_model":
                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 100352 vs 100244")
        return real(*args, **kwargs)

    if writer == "save_model":
        monkeypatch.setattr(checkpoint, "save_model", full_at_the_second_checkpoint)
    else:
        monkeypatch.setattr(checkpoint.torch, "save", full_at_the_second_checkpoint)
    run = tmp_path / "run"
    assert main(train_args(data_dir, run, "--set", "train.max_iters=4", "--set", "train.checkpoint_interval=2")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write a checkpoint" in err and "the last one stays" in err, err
    assert checkpoint.load_trainer_state(run / "ckpt")["step"] == 2 and not (run / "ckpt.tmp").exists()


@pytest.mark.parametrize("refused", [("ckpt", "ckpt.old"), ("ckpt.tmp", "ckpt")])
def test_a_refused_rename_of_a_checkpoint_keeps_the_last_one_and_no_temp_dir(tmp_path, data_dir, capsys, monkeypatch, refused):
    """The second checkpoint's swap fails: moving the first aside (ckpt -> ckpt.old), or moving the new one in."""
    rename, run = Path.rename, tmp_path / "run"

    def refuse(self, target):
        second_save = (run / "ckpt").exists() or (run / "ckpt.old").exists()
        if (self.name, Path(target).name) == refused and second_save:
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", refuse)
    assert main(train_args(data_dir, run, "--set", "train.max_iters=4", "--set", "train.checkpoint_interval=2")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write a checkpoint" in err and "the last one stays" in err, err
    assert checkpoint.load_trainer_state(run / "ckpt")["step"] == 2
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("ckpt")) == ["ckpt"]


def test_a_crash_between_the_checkpoint_renames_is_recovered(tmp_path, run_dir, data_dir):
    run = tmp_path / "run"
    (run / "ckpt.tmp").mkdir(parents=True)  # half-written next checkpoint
    (run / "ckpt.tmp" / "model.safetensors").write_bytes(b"partial")
    for f in run_dir.iterdir():
        if f.is_file():
            (run / f.name).write_bytes(f.read_bytes())
    (run / "ckpt.old").mkdir()  # the previous checkpoint, already renamed away
    for f in (run_dir / "ckpt").iterdir():
        (run / "ckpt.old" / f.name).write_bytes(f.read_bytes())
    checkpoint.load(run)  # readers find it where the crash left it
    step = checkpoint.load_trainer_state(run / "ckpt.old")["step"]
    argv = [
        "train",
        "--data",
        str(data_dir),
        "--out",
        str(run),
        "--resume",
        "--no-progress",
        "--set",
        f"train.max_iters={step + 2}",
    ]
    assert main(argv) == 0
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("ckpt")) == ["ckpt"]
    assert checkpoint.load_trainer_state(run / "ckpt")["step"] == step + 2


def test_no_slide_refuses_a_prompt_longer_than_the_window(run_dir, capsys):
    assert main(["sample", "--ckpt", str(run_dir), "--prompt", "The cat " * 3, "--no-slide"]) == 1
    assert "window holds 15" in capsys.readouterr().err
    assert main(["sample", "--ckpt", str(run_dir), "--prompt", "The", "--no-slide", "--max-new-tokens", "100"]) == 0
    assert len(capsys.readouterr().out) <= len("The") + 13 + 1  # stops when the 16-token window is full


def fuzz_strings(rng: random.Random, n: int) -> list[str]:
    keys = ["model.n_layer", "train.max_iters", "model.noise", "train.learning_rate", "model.bias", "x", ""]
    pieces = ["=", ".", "-1", "1e999", "nan", "true", "0x10", " ", "\x00", "é", "🦊", "\udcff", "[model]", "'", '"']
    out = []
    for _ in range(n):
        if rng.random() < 0.5:
            out.append(rng.choice(keys) + rng.choice(["=", "", "=="]) + "".join(rng.choices(pieces, k=rng.randint(0, 3))))
        else:
            out.append("".join(chr(rng.randint(1, 0x2FFF)) for _ in range(rng.randint(0, 12))))
    return out


def test_fuzzed_set_strings_and_prompts_never_traceback(tmp_path, run_dir, data_dir, capsys):
    rng = random.Random(0)
    for text in fuzz_strings(rng, 150):
        # the trailing invalid key guarantees no training starts whatever the fuzzed one says
        code = main(["train", "--preset", "demo", "--data", str(data_dir), "--out", str(tmp_path / "r"), "--set", text,
                     "--set", "train.max_iters=0"])  # fmt: skip
        err = capsys.readouterr().err
        assert code == 1 and err.count("\n") == 1 and err.startswith("ladderlm: error:"), (text, err)
    assert not (tmp_path / "r").exists()
    for _ in range(60):
        prompt = bytes(rng.randint(0, 255) for _ in range(rng.randint(0, 20))).decode("utf-8", "surrogateescape")
        code = main(["sample", "--ckpt", str(run_dir), "--prompt", prompt, "--max-new-tokens", "3"])
        err = capsys.readouterr().err
        assert code in (0, 1) and (code == 0 or (err.count("\n") == 1 and err.startswith("ladderlm: error:"))), (prompt, err)


@pytest.mark.parametrize("name", ["metrics.jsonl", "config.json"])
def test_a_full_disk_at_resume_leaves_the_run_files_whole(tmp_path, run_dir, data_dir, capsys, monkeypatch, name):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    before = (run / name).read_bytes()
    write_bytes = Path.write_bytes

    def disk_full(self, *args, **kwargs):
        if self.name.startswith(name):
            self.open("w").close()  # what a full disk leaves: the file opened, so emptied, and the write refused
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as write() raises it: naming no file
        return write_bytes(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    argv = ["train", "--data", str(data_dir), "--out", str(run), "--resume", "--no-progress", "--set", "train.max_iters=22"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    expected = {
        "metrics.jsonl": f"ladderlm: error: No space left on device: {run / name}\n",
        "config.json": f"ladderlm: error: cannot write in {run} (No space left on device); choose a writable --out\n",
    }
    assert err == expected[name]
    assert (run / name).read_bytes() == before
    assert not (run / f"{name}.tmp").exists()


def test_sigterm_during_prepare_leaves_no_temp_dir(tmp_path, monkeypatch, capsys):
    """The default SIGTERM kills without cleanup (a 58 MB hidden dir was left beside --out); now it is an interrupt."""
    from ladderlm.tokenizer import CharTokenizer

    save = CharTokenizer.save

    def a_signal_while_writing(self, path):
        os.kill(os.getpid(), signal.SIGTERM)
        return save(self, path)

    monkeypatch.setattr(CharTokenizer, "save", a_signal_while_writing)
    (tmp_path / "src.txt").write_text("some text to prepare, " * 20)
    out = tmp_path / "out"
    assert main(["prepare", "--source", str(tmp_path / "src.txt"), "--out", str(out)]) == 130
    assert capsys.readouterr().err == "ladderlm: interrupted\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.txt"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # main() leaves the handler as it found it
