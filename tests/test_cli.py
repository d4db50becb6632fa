"""Every bad input: exit non-zero, one line on stderr, no traceback, no file changed."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ladderlm.cli import main
from ladderlm.explain import explain


def snapshot(*dirs: Path) -> dict:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for d in dirs for p in sorted(Path(d).rglob("*")) if p.is_file()}


def run_bad(capsys, argv, *dirs, match):
    before = snapshot(*dirs)
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ladderlm: error:") and "Traceback" not in err, err
    assert match in err, err
    assert snapshot(*dirs) == before


def test_sample_and_eval(run_dir, data_dir, capsys):
    assert main(["sample", "--ckpt", str(run_dir), "--prompt", "The ", "--max-new-tokens", "40", "--num-samples", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("The ") and "\n---\n" in out
    assert main(["sample", "--ckpt", str(run_dir / "ckpt"), "--max-new-tokens", "100", "--stream", "--seed", "3"]) == 0
    streamed = capsys.readouterr().out
    assert main(["sample", "--ckpt", str(run_dir), "--max-new-tokens", "100", "--seed", "3"]) == 0
    assert capsys.readouterr().out == streamed  # empty prompt, past the 16-token window, same seed, same text
    assert main(["eval", "--ckpt", str(run_dir), "--data", str(data_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    val_tokens = json.loads((data_dir / "meta.json").read_text())["val_tokens"]
    assert result["tokens"] == val_tokens and 0 < result["val_loss"] < 5 and result["bits_per_char"] > 0


def test_missing_and_corrupt_checkpoints(tmp_path, run_dir, data_dir, capsys):
    run_bad(capsys, ["sample", "--ckpt", str(tmp_path / "nope")], tmp_path, match="does not exist")
    run_bad(capsys, ["eval", "--ckpt", str(tmp_path), "--data", str(data_dir)], tmp_path, match="lacks model.safetensors")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in (run_dir / "ckpt").iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    run_bad(capsys, ["sample", "--ckpt", str(broken)], tmp_path, match="corrupt")
    (broken / "config.json").write_text((run_dir / "ckpt" / "config.json").read_text().replace('"n_embd": 32', '"n_embd": 16'))
    (broken / "model.safetensors").write_bytes((run_dir / "ckpt" / "model.safetensors").read_bytes())
    run_bad(capsys, ["sample", "--ckpt", str(broken)], tmp_path, match="does not match config.json")  # one line, not one a tensor
    (broken / "config.json").write_text("{not json")
    run_bad(capsys, ["sample", "--ckpt", str(broken)], tmp_path, match="cannot read config")
    (broken / "config.json").write_text('{"model": {"n_layer": 1' + "0" * 5000 + "}}")  # past Python's 4300 digits
    run_bad(capsys, ["sample", "--ckpt", str(broken)], tmp_path, match="cannot read config")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_a_corrupt_checkpoint(tmp_path, run_dir, data_dir, capsys, value):
    """Training never saves them; a damaged file that holds some would fail inside torch.multinomial."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(run_dir / "ckpt", broken)
    weights = load_file(broken / "model.safetensors")
    name = sorted(weights)[0]
    weights[name].view(-1)[0] = value
    save_file(weights, broken / "model.safetensors")
    for argv in (["sample", "--ckpt", str(broken)], ["eval", "--ckpt", str(broken), "--data", str(data_dir)]):
        run_bad(capsys, argv, tmp_path, match=f"model.safetensors is corrupt: {name} holds non-finite weights")
    argv = ["eval", "--ckpt", str(run_dir), "--data", str(data_dir), "--samples", "2", "--scorer", str(broken)]
    run_bad(capsys, argv, tmp_path, match="holds non-finite weights")


@pytest.mark.parametrize("chars", [[5] * 65, ["ab", "c"], ["a", "a"], "abc"])
def test_a_corrupt_char_tokenizer_is_refused_when_read(tmp_path, run_dir, capsys, chars):
    """Accepted at load time, it crashed later, when decoding (TypeError: expected str instance, int found)."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "ckpt" / "tokenizer.json").write_text(json.dumps({"ladderlm_tokenizer": "char", "chars": chars}))
    run_bad(capsys, ["sample", "--ckpt", str(run), "--max-new-tokens", "3"], tmp_path, match="cannot read tokenizer")


@pytest.mark.parametrize("text, match", [("[]", "not a tokenizer file"), ('{"ladderlm_tokenizer": "char"}', "its chars must be")])
def test_a_tokenizer_file_of_another_shape_says_so(tmp_path, run_dir, capsys, text, match):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "ckpt" / "tokenizer.json").write_text(text)
    run_bad(capsys, ["sample", "--ckpt", str(run), "--max-new-tokens", "3"], tmp_path, match=match)


def test_bad_set_keys(tmp_path, data_dir, capsys):
    argv = ["train", "--preset", "demo", "--data", str(data_dir), "--out", str(tmp_path / "run")]
    run_bad(capsys, [*argv, "--set", "train.max_iter=3"], tmp_path, match="valid keys: model.n_layer")
    run_bad(capsys, [*argv, "--set", "train.max_iters=3.5"], tmp_path, match="train.max_iters must be int")
    run_bad(capsys, [*argv, "--set", "model.n_embd=130"], tmp_path, match="divisible")
    assert not (tmp_path / "run").exists()


def test_bad_prompts(run_dir, capsys):
    run_bad(capsys, ["sample", "--ckpt", str(run_dir), "--prompt", "The cat 🦊"], run_dir, match="'🦊'")
    run_bad(capsys, ["sample", "--ckpt", str(run_dir), "--top-p", "0"], run_dir, match="--top-p")


def test_bad_data_dirs(tmp_path, run_dir, capsys):
    run_bad(capsys, ["eval", "--ckpt", str(run_dir), "--data", str(tmp_path)], tmp_path, match="lacks train.bin")
    argv = ["train", "--preset", "demo", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "run")]
    run_bad(capsys, argv, tmp_path, match="nope does not exist")


def test_other_tokenizer_is_refused(tmp_path, run_dir, capsys):
    (tmp_path / "other.txt").write_text("completely different characters: 0123456789 xyz" * 50)
    assert main(["prepare", "--source", str(tmp_path / "other.txt"), "--out", str(tmp_path / "other")]) == 0
    capsys.readouterr()
    run_bad(capsys, ["eval", "--ckpt", str(run_dir), "--data", str(tmp_path / "other")], tmp_path, match="another tokenizer")


def test_argparse_errors_are_one_line(capsys):
    run_bad(capsys, ["sample"], Path(__file__).parent, match="--ckpt")
    run_bad(capsys, ["frobnicate"], Path(__file__).parent, match="invalid choice")


def test_invalid_utf8_prompt_in_a_real_process(run_dir):
    result = subprocess.run(
        [sys.executable.encode(), b"-m", b"ladderlm", b"sample", b"--ckpt", str(run_dir).encode(), b"--prompt", b"ab\xffcd"],
        capture_output=True,
    )
    assert result.returncode == 1
    assert result.stderr.decode() == "ladderlm: error: the prompt is not valid UTF-8\n"


def test_out_of_range_options_are_one_line(tmp_path, run_dir, data_dir, capsys):
    sample = ["sample", "--ckpt", str(run_dir), "--max-new-tokens", "4"]
    run_bad(capsys, [*sample, "--seed", str(2**64)], run_dir, match="--seed is out of range")
    run_bad(capsys, ["eval", "--ckpt", str(run_dir), "--data", str(data_dir), "--seed", "-1"], run_dir, match="--seed")
    run_bad(capsys, [*sample, "--stop", ""], run_dir, match="--stop must not be empty")
    run_bad(capsys, [*sample, "--temperature", "inf"], run_dir, match="--temperature is out of range")
    run_bad(capsys, ["eval", "--ckpt", str(run_dir), "--data", str(data_dir), "--scorer", str(run_dir)], run_dir,
            match="give --samples N too")  # fmt: skip
    run_bad(capsys, [*sample, "--device", "bogus"], run_dir, match="--device=bogus is not a device")
    run_bad(capsys, [*sample, "--device", "cuda:7"], run_dir, match="--device=cuda:7")
    run_bad(capsys, ["sample", "--ckpt", str(run_dir / "metrics.jsonl")], run_dir, match="is not a directory")
    run_bad(capsys, ["train", "--config", str(tmp_path), "--data", str(data_dir), "--out", str(tmp_path / "r")], tmp_path,
            match="is not a file")  # fmt: skip
    run_bad(capsys, ["bench", "--repeats", "0"], tmp_path, match="--repeats must be >= 1")
    run_bad(capsys, ["prepare", "--vocab-size", "300", "--out", str(tmp_path / "d")], tmp_path, match="sizes a BPE vocabulary")
    run_bad(capsys, ["bench", "--set", "model.n_embd=16"], tmp_path, match="bench also runs an SSM pair")
    run_bad(capsys, ["explain", "--prompt", "x" * 65], tmp_path, match="at most 64 characters")
    for bad in ("inf", "nan"):
        run_bad(capsys, ["train", "--preset", "demo", "--data", str(data_dir), "--out", str(tmp_path / "r"),
                         "--set", f"train.learning_rate={bad}"], tmp_path, match="must be a finite number")  # fmt: skip


def test_argparse_errors_name_the_command_once(capsys):
    run_bad(capsys, ["sample", "--ckpt", "x", "--temperature", "hot"], Path(__file__).parent, match="error: sample: argument")


def test_a_tiny_temperature_is_nearly_greedy(run_dir, capsys):
    greedy = ["sample", "--ckpt", str(run_dir), "--prompt", "The", "--max-new-tokens", "30"]
    texts = []
    for temperature in ("0", "1e-45"):
        assert main([*greedy, "--temperature", temperature]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and len(texts[0]) > 10


def test_explain_draws_spaces_and_control_characters_in_one_cell(capsys):
    assert main(["explain", "--n-step", "2", "--prompt", "a b\tc"]) == 0
    grid = [line for line in capsys.readouterr().out.splitlines() if line.startswith("rung 0")][0]
    assert "␣" in grid and "\\t" in grid and "\t" not in grid


def test_explain_tells_a_prompts_dot_and_caret_from_pads_and_the_start_token():
    """`ladderlm explain` draws a diagram too: "Hi." must not show its '.' as a pad."""
    grid = {line[:10].strip(): line[10:].split() for line in explain(3, ".^", 0).splitlines() if line.startswith("rung ")}
    assert grid["rung 1"] == [".", "^", "\\."] and grid["rung 0"] == ["^", "\\.", "\\^"]


@pytest.mark.parametrize(
    "message",
    [
        "[enforce fail at alloc_cpu.cpp:119] DefaultCPUAllocator: can't allocate memory: 8 TB\nmore",
        "Storage size calculation overflowed with sizes=[4611686018427387904, 128]",  # e.g. --set train.batch_size=2**62
    ],
)
def test_running_out_of_memory_is_one_line(monkeypatch, capsys, message):
    def allocate(_args):
        raise RuntimeError(message)

    monkeypatch.setattr("ladderlm.cli.cmd_explain", allocate)
    run_bad(capsys, ["explain"], Path(__file__).parent, match="out of memory")


def test_out_of_memory_names_what_to_lower(run_dir, capsys):
    run_bad(capsys, ["sample", "--ckpt", str(run_dir), "--max-new-tokens", str(10**14)], run_dir, match="--max-new-tokens")


def ladderlm_process(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ladderlm", *args], stderr=subprocess.PIPE, text=True, **kwargs)


def test_a_reader_that_left_ends_the_command_quietly():
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to the pipe fails: the reader of `ladderlm ... | head` has gone
    result = ladderlm_process(["explain"], stdout=write_end)
    os.close(write_end)
    assert (result.returncode, result.stderr) == (141, "")


def test_a_closed_stdout_is_an_error_not_silence():
    result = ladderlm_process(["explain"], preexec_fn=lambda: os.close(1))
    assert (result.returncode, result.stderr) == (1, "ladderlm: error: standard output is closed\n")


def test_text_the_output_encoding_lacks_is_shown_as_question_marks():
    """An ASCII terminal and a prompt with an accent: a "?" where the "é" would go, not a UnicodeEncodeError."""
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    argv = [sys.executable, "-m", "ladderlm", "explain", "--n-step", "2", "--prompt", "é"]
    proc = subprocess.run(argv, capture_output=True, env=env, timeout=120)
    assert proc.returncode == 0 and not proc.stderr and b"?" in proc.stdout


def test_paths_of_the_wrong_kind_are_named_as_such(tmp_path, run_dir, data_dir, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    cases = [
        (["prepare", "--source", "", "--out", str(tmp_path / "p")], "--source is empty"),
        (["prepare", "--out", str(tmp_path / "dangling")], "is a symlink to nothing"),
        (["train", "--preset", "demo", "--data", str(afile), "--out", str(tmp_path / "r")], f"{afile} is not a directory"),
        (["train", "--preset", "demo", "--data", str(tmp_path / "no"), "--out", str(tmp_path / "r")], "no does not exist"),
        (["plot", str(run_dir), "--out", str(afile / "loss.png")], f"{afile} is not a directory"),
    ]
    for argv, match in cases:
        run_bad(capsys, argv, tmp_path, match=match)
    resume = ["train", "--data", str(data_dir), "--out", str(run_dir), "--resume", "--set", "model.n_layer=3"]
    run_bad(capsys, resume, run_dir, match="another model.n_layer (2 in the checkpoint, 3 now)")
