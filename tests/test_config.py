from dataclasses import replace

import pytest

from ladderlm.config import json_line, load_config, parse_override, preset_names
from ladderlm.errors import LadderError
from ladderlm.model import LadderLM


def test_presets_load():
    assert {"shakespeare-char-cpu", "demo"} <= set(preset_names())
    cfg = load_config("shakespeare-char-cpu")
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.block_size) == (4, 4, 128, 64)
    assert (cfg.train.batch_size, cfg.train.max_iters, cfg.train.warmup_iters) == (12, 2000, 400)


@pytest.mark.parametrize(
    "gpt, ladder",
    [
        ("shakespeare-char-cpu", "shakespeare-char-cpu-ladder4"),
        ("shakespeare-char-cpu", "shakespeare-char-cpu-ladder4-fast"),
        ("shakespeare-char-cpu-ssm", "shakespeare-char-cpu-ssm-ladder4"),
    ],
)
def test_ladder_presets_match_their_gpt(gpt, ladder):
    """Same tokens and size as the GPT they are measured against; the learning rate is each model's own."""
    g, lad = load_config(gpt), load_config(ladder)
    tokens = ("max_iters", "batch_size", "grad_accum", "seed")
    assert [getattr(g.train, k) for k in tokens] == [getattr(lad.train, k) for k in tokens]
    shape = ("block_size", "n_layer", "n_embd")
    assert [getattr(g.model, k) for k in shape] == [getattr(lad.model, k) for k in shape]
    assert (g.model.n_step, lad.model.n_step) == (1, 4)
    sizes = [LadderLM(replace(c.model, vocab_size=66)).num_params() for c in (g, lad)]
    assert abs(sizes[1] / sizes[0] - 1) < 0.05


def test_the_fast_ladder_preset_differs_only_in_its_passes_and_the_bench_times_its_recipe():
    full, fast, bench = (load_config(p) for p in ("shakespeare-char-cpu-ladder4", "shakespeare-char-cpu-ladder4-fast", "bench"))
    for section, key in (("model", "train_passes"), ("train", "early_passes"), ("train", "early_passes_iters")):
        setattr(getattr(full, section), key, getattr(getattr(fast, section), key))
    assert full == fast
    assert [fast.model.train_passes, fast.train.max_iters, fast.train.early_passes, fast.train.early_passes_iters] == [
        bench.model.train_passes, bench.train.max_iters, bench.train.early_passes, bench.train.early_passes_iters
    ]  # fmt: skip


def test_override_types():
    assert parse_override("train.max_iters=7") == ("train.max_iters", 7)
    assert parse_override("train.learning_rate=3") == ("train.learning_rate", 3.0)
    assert parse_override("model.bias=true") == ("model.bias", True)
    cfg = load_config("demo", overrides=["model.n_layer=2"])
    assert cfg.model.n_layer == 2


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.n_layers=2", "valid keys: model.n_layer"),
        ("train.max_iters=ten", "must be int"),
        ("model.bias=maybe", "must be bool"),
        ("model.vocab_size=5", "unknown config key"),
        ("max_iters", "expects key=value"),
        ("model.n_head=3", "divisible by model.n_head"),
        ("model.n_step=3", "divisible by model.n_step"),
        ("train.device=tpu", "must be one of"),
        ("model.dropout=1.5", "dropout"),
        ("train.early_passes=2", "go together"),
        ("train.early_passes=-1", "must be >= 0"),
        ("model.n_embd=4", "each rung needs at least 2 features"),  # n_step 4 in the ladder preset below
        ("model.n_layer=100000", "at most 1024"),
        ("train.learning_rate=inf", "finite"),
        ("train.seed=9223372036854775808", "below 2\\*\\*63|too large"),
        ("train.batch_size=99999999999999999999", "too large, got an integer of 67 bits"),
        ("model.n_embd=99999999999999999998", "too large"),
        ("nextlat.width=" + "9" * 5000, "nextlat.width must be int"),  # past Python's 4300-digit int-from-str limit
    ],
)
def test_bad_overrides(override, message):
    with pytest.raises(LadderError, match=message):
        load_config("shakespeare-char-cpu-ladder4", overrides=[override])


def test_early_passes_need_a_ladder_without_nextlat():
    early = ["train.early_passes=2", "train.early_passes_iters=100"]
    with pytest.raises(LadderError, match="needs a ladder"):
        load_config("shakespeare-char-cpu", overrides=early)
    with pytest.raises(LadderError, match="use one of them"):
        load_config("shakespeare-char-cpu-ladder4-kl", overrides=early)
    assert load_config("shakespeare-char-cpu-ladder4", overrides=early).train.early_passes == 2


@pytest.mark.parametrize("preset", ["shakespeare-char-cpu", "shakespeare-char-cpu-ladder4-kl"])
def test_nextlat_refuses_training_prompts(preset):
    with pytest.raises(LadderError, match="does not read training prompts"):
        load_config(preset, overrides=["nextlat.horizon=1", "model.train_prompts=0.5"])


def test_bad_config_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[model]\nn_layer = 'four'\n")
    with pytest.raises(LadderError, match="model.n_layer must be int"):
        load_config(path=path)
    path.write_text("[modle]\n")
    with pytest.raises(LadderError, match="unknown config key 'modle'"):
        load_config(path=path)
    path.write_text("[model\n")
    with pytest.raises(LadderError, match="invalid TOML"):
        load_config(path=path)
    for text, message in (
        ("model = 3\n", "model must be a table"),
        ("version = true\n", "version True is not supported"),
        ("[train]\nlearning_rate = 1" + "0" * 400 + "\n", "train.learning_rate is too large"),
        ("[train]\nmax_iters = 1" + "0" * 5000 + "\n", "invalid TOML"),
        ("[train]\nbatch_size = 99999999999999999999\n", "train.batch_size is too large"),
    ):
        path.write_text(text)
        with pytest.raises(LadderError, match=message):
            load_config(path=path)
    with pytest.raises(LadderError, match="unknown preset"):
        load_config("nope")


def test_config_file_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "c.toml"
    path.write_bytes(b"\xef\xbb\xbf[train]\nmax_iters = 5\n")
    assert load_config(path=path).train.max_iters == 5


def test_json_line_is_strict_json():
    """A diverged model's NaN loss is written as null, which every JSON parser reads, not as NaN."""
    record = {"loss": float("nan"), "per_rung": [{"ce": float("inf")}, {"ce": 1.5}], "step": 3}
    assert json_line(record) == '{"loss": null, "per_rung": [{"ce": null}, {"ce": 1.5}], "step": 3}'
