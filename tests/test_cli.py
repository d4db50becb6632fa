"""Every bad input: exit non-zero, one line on stderr, no traceback, no file changed."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from ladderlm.cli import main


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
    (broken / "config.json").write_text("{not json")
    run_bad(capsys, ["sample", "--ckpt", str(broken)], tmp_path, match="cannot read config")


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
    run_bad(capsys, argv, tmp_path, match="lacks train.bin")


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
