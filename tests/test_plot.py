"""`ladderlm plot` on hand-written run dirs: good ones plot, every bad one is one line on stderr and no file written."""

import json
import warnings
from pathlib import Path

import pytest

from ladderlm import plot as plotting
from ladderlm.cli import main
from ladderlm.plot import plot

from .test_cli import run_bad

METRICS = [
    {"step": 0, "train_loss": 4.2, "val_loss": 4.1},
    {"step": 10, "loss": 4.0, "lr": 1e-4},
    {"step": 20, "loss": 3.6, "lr": 2e-4},
    {"step": 20, "train_loss": 3.5, "val_loss": 3.55},
]
EVAL = {
    "free_running_loss": 1.9,
    "teacher_forced_loss": 1.7,
    "per_rung": [{"rung": 0, "ce": 2.5, "denoise_ratio": None}, {"rung": 1, "ce": 1.7, "denoise_ratio": 0.4}],
}


def make_run(tmp_path: Path, metrics: bytes | None = None, result=EVAL, name: str = "run") -> Path:
    run = tmp_path / name
    run.mkdir()
    lines = b"".join(json.dumps(r).encode() + b"\n" for r in METRICS)
    (run / "metrics.jsonl").write_bytes(lines if metrics is None else metrics)
    (run / "eval.json").write_text(json.dumps(result))
    return run


@pytest.mark.parametrize("kind", ["losses", "rungs", "free-vs-tf"])
def test_plot_writes_the_path_it_reports(tmp_path, capsys, kind):
    runs = [make_run(tmp_path, name="a"), make_run(tmp_path, name="b")]
    out = tmp_path / "fig.png"
    assert main(["plot", *map(str, runs), "--kind", kind, "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert capsys.readouterr().out == f"wrote {out}\n"
    assert plot(kind, runs, tmp_path / "fig.PDF") == tmp_path / "fig.PDF"  # the extension's case does not matter
    assert (tmp_path / "fig.PDF").read_bytes()[:4] == b"%PDF"


@pytest.mark.parametrize("kind", ["losses", "rungs", "free-vs-tf"])
def test_many_runs_get_a_legend_beside_the_plot(tmp_path, kind):
    """Sixty runs' legend does not fit over the axes: it goes beside them, and no layout warning is printed."""
    runs = [make_run(tmp_path, name=f"run{i}") for i in range(60)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot(kind, runs, tmp_path / "many.png")
    assert (tmp_path / "many.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("torn", [b'{"step": 30, "lo', b'{"step": 30, "lo\n', b'{"step": 30, "loss": 3.\xe2\x80'])
def test_torn_last_line_is_skipped(tmp_path, torn):
    """What a kill in the middle of a write leaves; `train` skips it too."""
    good = (make_run(tmp_path, name="good") / "metrics.jsonl").read_bytes()
    run = make_run(tmp_path, good + torn)
    assert main(["plot", str(run), "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "line, match",
    [
        (b'{"step": 30, "lo', "line 2 is corrupt (Unterminated string"),
        (b'{"step": 30, "loss": 3.\xff}', "line 2 is corrupt (not UTF-8 text)"),
        (b'{"loss": 3.0}', "line 2 is not a metrics record"),
        (b'{"step": "30", "loss": 3.0}', "line 2 is not a metrics record"),
        (b'{"step": 30, "loss": "3.0"}', "line 2 is not a metrics record"),
        (b"[30, 3.0]", "line 2 is not a metrics record"),
        (b'{"step": 1' + b"0" * 400 + b', "loss": 3.0}', "line 2 is not a metrics record"),  # past a float's range
        (b'{"step": 1' + b"0" * 5000 + b', "loss": 3.0}', "line 2 is corrupt (Exceeds the limit (4300 digits)"),
    ],
)
def test_bad_metrics_line(tmp_path, capsys, line, match):
    run = make_run(tmp_path, b'{"step": 10, "loss": 4.0}\n' + line + b'\n{"step": 20, "loss": 3.6}\n')
    run_bad(capsys, ["plot", str(run), "--out", str(tmp_path / "p.png")], tmp_path, match=f"metrics.jsonl {match}")


@pytest.mark.parametrize("bad", [b"null", b"Infinity"])
def test_a_non_finite_loss_is_a_gap(tmp_path, bad):
    """`train` logs a non-finite loss as null (strict JSON); the curve has a gap there. An older log's
    Infinity beside 1e308 made matplotlib's axis fail ("arange: cannot compute length")."""
    run = make_run(
        tmp_path,
        b'{"step": 10, "loss": 1e308}\n{"step": 20, "loss": %s, "val_loss": %s}\n{"step": 30, "loss": 3.6}\n' % (bad, bad),
    )
    assert main(["plot", str(run), "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("text", [b"", b'{"step": 0, "lr": 0.001}\n'])
def test_a_run_without_losses_yet_has_nothing_to_plot(tmp_path, capsys, text):
    run = make_run(tmp_path, text)
    run_bad(capsys, ["plot", str(run), "--out", str(tmp_path / "p.png")], tmp_path, match="no losses logged yet")


def test_bad_last_record_is_not_torn(tmp_path, capsys):
    """A last line that parses was written whole: a bad record there is an error, not skipped."""
    run = make_run(tmp_path, b'{"step": 10, "loss": 4.0}\n{"loss": 3.0}\n')
    run_bad(capsys, ["plot", str(run), "--out", str(tmp_path / "p.png")], tmp_path, match="line 2 is not a metrics record")


@pytest.mark.parametrize(
    "out, match",
    [
        ("p.xyz", "--out {out} has unsupported extension .xyz; use one of: "),
        ("p", "--out {out} has no extension; use one of: "),
        ("data", "--out {out} is a directory"),
        ("missing/p.png", "{tmp}/missing does not exist"),
        ("run/metrics.jsonl", "has unsupported extension .jsonl"),  # never overwrites an input
    ],
)
def test_bad_out_is_refused_before_any_work(tmp_path, capsys, out, match):
    (tmp_path / "data").mkdir()
    make_run(tmp_path)
    out = tmp_path / out
    # the run dirs do not exist either: --out is checked first
    argv = ["plot", str(tmp_path / "nope"), "--out", str(out)]
    run_bad(capsys, argv, tmp_path, match=match.format(out=out, tmp=tmp_path))
    if "use one of" in match:
        run_bad(capsys, argv, tmp_path, match="png, ")


@pytest.mark.parametrize(
    "kind, result, match",
    [
        ("rungs", {}, "eval.json lacks 'per_rung'"),
        ("free-vs-tf", {}, "eval.json lacks 'teacher_forced_loss'"),
        ("free-vs-tf", {"teacher_forced_loss": 1.0}, "eval.json lacks 'free_running_loss'"),
        ("rungs", [], "eval.json is not an eval result"),
        ("free-vs-tf", [], "eval.json is not an eval result"),
        ("rungs", {"per_rung": [{"rung": 0}]}, "eval.json has a malformed 'per_rung'"),
        ("rungs", {"per_rung": []}, "eval.json has a malformed 'per_rung'"),
        ("free-vs-tf", {"teacher_forced_loss": "1.7", "free_running_loss": 1.9}, "malformed 'teacher_forced_loss'"),
        ("free-vs-tf", {"teacher_forced_loss": 1.7, "free_running_loss": float("nan")}, "that log axes cannot show"),
        ("free-vs-tf", {"teacher_forced_loss": 10**400, "free_running_loss": 1.9}, "malformed 'teacher_forced_loss'"),
        ("rungs", {"per_rung": [{"rung": 10**400, "ce": 1.0}]}, "eval.json has a malformed 'per_rung'"),
    ],
)
def test_bad_eval(tmp_path, capsys, kind, result, match):
    run = make_run(tmp_path, result=result)
    argv = ["plot", str(run), "--kind", kind, "--out", str(tmp_path / "p.png")]
    run_bad(capsys, argv, tmp_path, match=match)
    if "log axes" not in match:  # a diverged run: a new eval.json would say the same
        run_bad(capsys, argv, tmp_path, match=f"rewrite it with `ladderlm eval --ckpt {run} --data DATA --save`")


def test_corrupt_eval(tmp_path, capsys):
    run = make_run(tmp_path)
    (run / "eval.json").write_bytes(b'{"per_rung": \xff')
    run_bad(capsys, ["plot", str(run), "--kind", "rungs", "--out", str(tmp_path / "p.png")], tmp_path, match="is corrupt")


@pytest.mark.parametrize("kind", ["losses", "rungs"])
def test_bad_run_dir(tmp_path, capsys, kind):
    run = make_run(tmp_path)
    out = str(tmp_path / "p.png")
    run_bad(capsys, ["plot", str(tmp_path / "nope"), "--kind", kind, "--out", out], tmp_path, match="does not exist")
    run_bad(capsys, ["plot", str(run / "eval.json"), "--kind", kind, "--out", out], tmp_path, match="is not a run dir")
    # a good run first: nothing is written when a later one is bad
    run_bad(capsys, ["plot", str(run), str(tmp_path / "nope"), "--kind", kind, "--out", out], tmp_path, match="does not exist")


@pytest.mark.parametrize("kind", ["losses", "rungs", "free-vs-tf"])
def test_runs_of_the_same_name_get_legend_entries_apart(tmp_path, monkeypatch, kind):
    """seed1/gpt and seed2/gpt: each curve must say which run it is."""
    runs = []
    for seed in ("seed1", "seed2"):
        (tmp_path / seed).mkdir()
        runs.append(make_run(tmp_path / seed, name="gpt"))
    labels = []
    save = plotting._save

    def labelled(fig, ax, out):
        labels.extend(ax.get_legend_handles_labels()[1])
        save(fig, ax, out)

    monkeypatch.setattr(plotting, "_save", labelled)
    plot(kind, runs, tmp_path / "p.png")
    run_labels = [label for label in labels if "=" not in label]  # not free-vs-tf's diagonal
    assert len(run_labels) == len(set(run_labels)) >= 2


def test_a_full_disk_keeps_the_old_figure_and_names_the_file(tmp_path, capsys, monkeypatch):
    import errno
    import os

    run, out = make_run(tmp_path), tmp_path / "fig.png"
    out.write_bytes(b"the old figure")
    write_bytes = Path.write_bytes

    def disk_full(self, data):
        self.open("w").close()  # a full disk: the file opened, so emptied, and the write refused, naming no file
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    assert main(["plot", str(run), "--out", str(out)]) == 1
    assert capsys.readouterr().err == f"ladderlm: error: No space left on device: {out}\n"
    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    assert out.read_bytes() == b"the old figure" and sorted(p.name for p in tmp_path.iterdir()) == ["fig.png", "run"]


def test_values_near_float64s_limits_are_one_line(tmp_path, capsys):
    """Hand-written, not logged by `train` (float32 losses end at 3.4e38): matplotlib cannot lay out the axis."""
    run = make_run(tmp_path, b'{"step": 0, "loss": 1e308}\n{"step": 1, "loss": -1e308}\n')
    run_bad(capsys, ["plot", str(run), "--out", str(tmp_path / "p.png")], tmp_path, match="values too near float64's limits")
