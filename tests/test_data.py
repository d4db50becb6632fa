import json

import numpy as np
import pytest
import torch

from ladderlm import data as data_mod
from ladderlm.data import TokenData, prepare
from ladderlm.errors import LadderError
from ladderlm.tokenizer import BpeTokenizer, CharTokenizer, load_tokenizer

from .conftest import CORPUS


def test_char_round_trip(tmp_path):
    tok = CharTokenizer.train([CORPUS])
    assert tok.decode(tok.encode(CORPUS)) == CORPUS
    tok.save(tmp_path / "t.json")
    again = load_tokenizer(tmp_path / "t.json")
    assert again.encode("The cat") == tok.encode("The cat") and again.eot_id == tok.vocab_size - 1
    assert tok.decode([*tok.encode("ab"), tok.eot_id]) == "ab"
    with pytest.raises(LadderError, match="'Z'"):
        tok.encode("Zebra")


def test_bpe_round_trip(tmp_path):
    tok = BpeTokenizer.train([CORPUS], vocab_size=300)
    text = "The fox says 'héllo' ✓ 🦊 over the moon.\n"
    assert tok.decode(tok.encode(text)) == text  # byte level: any text, even unseen characters
    assert len(tok.encode(CORPUS)) < len(CORPUS) / 2
    tok.save(tmp_path / "t.json")
    assert load_tokenizer(tmp_path / "t.json").encode(text) == tok.encode(text)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_prepare_is_deterministic(tmp_path, corpus_file, kind):
    a = prepare(str(corpus_file), kind, tmp_path / "a", vocab_size=300)
    b = prepare(str(corpus_file), kind, tmp_path / "b", vocab_size=300)
    assert a == b
    for name in ("train.bin", "val.bin", "tokenizer.json", "meta.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    d = TokenData.open(tmp_path / "a")
    ids = np.concatenate([d.train, d.val])
    assert len(d.train) == int(0.9 * len(ids))
    assert d.tokenizer.decode(ids.tolist()) == CORPUS
    assert a["vocab_size"] == d.tokenizer.vocab_size and a["source"] == str(corpus_file)


def test_directory_source_separates_documents(tmp_path):
    src = tmp_path / "docs"
    src.mkdir()
    (src / "b.txt").write_text("second")
    (src / "a.txt").write_text("first")
    (src / ".hidden").write_text("skip me")
    meta = prepare(str(src), "char", tmp_path / "out")
    d = TokenData.open(tmp_path / "out")
    ids = np.concatenate([d.train, d.val]).tolist()
    assert meta["documents"] == 2
    assert ids.count(d.tokenizer.eot_id) == 1 and d.tokenizer.decode(ids) == "firstsecond"
    (src / "a.txt").write_text("firsts")  # the same characters, the boundary moved
    (src / "b.txt").write_text("econd")
    assert prepare(str(src), "char", tmp_path / "moved")["sha256"] != meta["sha256"]


def test_stdlib_source_is_fixed_order():
    docs = data_mod.stdlib_documents()
    assert len(docs) > 100 and docs == data_mod.stdlib_documents()


def test_shakespeare_download_fails_clearly(monkeypatch):
    monkeypatch.setattr(data_mod, "SHAKESPEARE_URL", "http://127.0.0.1:9/input.txt")
    with pytest.raises(LadderError, match="--source PATH"):
        data_mod.read_source("shakespeare")


def test_bad_sources(tmp_path):
    with pytest.raises(LadderError, match="does not exist"):
        prepare(str(tmp_path / "missing.txt"), "char", tmp_path / "out")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(LadderError, match="not UTF-8"):
        prepare(str(tmp_path / "bin.txt"), "char", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_batches(data_dir):
    d = TokenData.open(data_dir)
    g = torch.Generator().manual_seed(0)
    x, y = d.batch("train", 3, 10, g)
    assert x.shape == y.shape == (3, 10)
    assert (x[:, 0] == d.tokenizer.eot_id).all() and torch.equal(x[:, 1:], y[:, :-1])
    g2 = torch.Generator().manual_seed(0)
    assert torch.equal(d.batch("train", 3, 10, g2)[1], y)


def test_data_dir_errors(tmp_path, data_dir):
    with pytest.raises(LadderError, match="lacks train.bin"):
        TokenData.open(tmp_path)
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        (tmp_path / name).write_bytes((data_dir / name).read_bytes())
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": "lots"}))
    with pytest.raises(LadderError, match="corrupt meta.json"):
        TokenData.open(tmp_path)
