import json
import os
import shutil
import socket
import subprocess
import sys
import threading

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


def test_bpe_reads_the_eot_text_as_text(tmp_path):
    """The literal string `<|endoftext|>` in a corpus or prompt is text, as for the char tokenizer:
    not the separator token, which decoding would drop."""
    tok = BpeTokenizer.train([CORPUS], vocab_size=300)
    text = "a <|endoftext|> b"
    tok.save(tmp_path / "t.json")
    for t in (tok, load_tokenizer(tmp_path / "t.json")):
        assert tok.eot_id not in t.encode(text) and t.decode(t.encode(text)) == text
    (tmp_path / "doc.txt").write_text(CORPUS + text)
    prepare(str(tmp_path / "doc.txt"), "bpe", tmp_path / "out", vocab_size=300)
    d = TokenData.open(tmp_path / "out")
    assert d.tokenizer.decode(np.concatenate([d.train, d.val]).tolist()) == CORPUS + text


def test_char_tokenizer_file_is_utf8_in_any_locale(tmp_path):
    """An ASCII locale must neither crash the save nor write bytes that the UTF-8 load cannot read."""
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    code = "import sys; from pathlib import Path; from ladderlm.tokenizer import CharTokenizer; "
    code += "CharTokenizer(['a', '\\u00e9', '\\u2713']).save(Path(sys.argv[1]))"
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "t.json")], env=env, check=True)
    assert load_tokenizer(tmp_path / "t.json").chars == ["a", "\u00e9", "\u2713"]


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


def test_shakespeare_download_cut_off_fails_clearly(monkeypatch):
    """A connection that drops mid-body raises http.client.IncompleteRead, which is no OSError."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = server.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nonly a part")
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    monkeypatch.setattr(data_mod, "SHAKESPEARE_URL", f"http://127.0.0.1:{server.getsockname()[1]}/input.txt")
    with server, pytest.raises(LadderError, match="cannot download tiny Shakespeare.*--source PATH"):
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


def test_prepare_never_overwrites(tmp_path, corpus_file):
    out = tmp_path / "out"
    prepare(str(corpus_file), "char", out)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    (tmp_path / "other.txt").write_text("other text")
    with pytest.raises(LadderError, match="not empty"):
        prepare(str(tmp_path / "other.txt"), "char", out)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    with pytest.raises(LadderError, match="not a directory"):
        prepare(str(corpus_file), "char", tmp_path / "other.txt")
    (tmp_path / "killed" / ".prepare.tmp-123").mkdir(parents=True)  # what a kill -9 inside an empty --out leaves
    with pytest.raises(LadderError, match="holds .prepare.tmp-123, left by an interrupted prepare"):
        prepare(str(corpus_file), "char", tmp_path / "killed")
    (tmp_path / "empty").mkdir()
    assert prepare(str(tmp_path / "other.txt"), "char", tmp_path / "empty")["documents"] == 1


def test_failed_prepare_leaves_nothing(tmp_path, corpus_file, monkeypatch):
    def disk_full(self, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(CharTokenizer, "save", disk_full)  # after train.bin and val.bin are written
    with pytest.raises(LadderError, match="cannot write .*No space left"):
        prepare(str(corpus_file), "char", tmp_path / "sub" / "out")
    assert list((tmp_path / "sub").iterdir()) == []  # neither `out` nor the hidden temp dir


def test_prepare_fills_an_empty_out_in_place(tmp_path, corpus_file, monkeypatch):
    """An empty --out is filled, not replaced: it may be a shell's cwd, a mount point, or writable
    under a parent that is not."""
    out = tmp_path / "empty"
    out.mkdir()
    inode = out.stat().st_ino

    def disk_full(self, path):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(CharTokenizer, "save", disk_full)
        with pytest.raises(LadderError, match="nothing was written"):
            prepare(str(corpus_file), "char", out)
    assert list(out.iterdir()) == [] and list(tmp_path.iterdir()) == [out]
    prepare(str(corpus_file), "char", out)
    assert out.stat().st_ino == inode and sorted(f.name for f in out.iterdir()) == sorted(data_mod.DATA_FILES)
    d = TokenData.open(out)
    assert d.tokenizer.decode(np.concatenate([d.train, d.val]).tolist()) == CORPUS


def test_prepare_refuses_out_inside_source(tmp_path):
    src = tmp_path / "docs"
    src.mkdir()
    (src / "a.txt").write_text("some text")
    with pytest.raises(LadderError, match="inside --source"):
        prepare(str(src), "char", src / "data")
    assert [f.name for f in src.iterdir()] == ["a.txt"]


def test_prepare_refuses_a_corpus_too_small_to_split(tmp_path):
    (tmp_path / "one.txt").write_text("a")
    with pytest.raises(LadderError, match="too small"):
        prepare(str(tmp_path / "one.txt"), "char", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "five.txt").write_text("hello")
    meta = prepare(str(tmp_path / "five.txt"), "char", tmp_path / "out")
    assert (meta["train_tokens"], meta["val_tokens"]) == (4, 1)
    assert len(TokenData.open(tmp_path / "out").val) == 1


def test_prepare_refuses_a_validation_split_without_text(tmp_path):
    """Empty files at the end of a source dir give a validation split of document boundaries only."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("some text for training, " * 4)
    for i in range(12):
        (src / f"b{i:02}.txt").write_text("")
    with pytest.raises(LadderError, match="the validation split .* holds no text"):
        prepare(str(src), "char", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("split", ["train", "val"])
def test_bad_token_files(tmp_path, data_dir, split):
    d = tmp_path / "d"
    shutil.copytree(data_dir, d)
    f = d / f"{split}.bin"
    ids = np.fromfile(f, dtype=np.uint16)
    vocab_size = TokenData.open(d).tokenizer.vocab_size
    ids[len(ids) // 2] = vocab_size  # one past the last id
    ids.tofile(f)
    with pytest.raises(LadderError, match=f"{split}.bin is corrupt: token id {vocab_size} is not below vocab_size"):
        TokenData.open(d)
    f.write_bytes(b"")
    with pytest.raises(LadderError, match=f"{split}.bin holds no tokens"):
        TokenData.open(d)
    ids[:-2].tofile(f)  # truncated: eval would divide the loss of what is left by the whole split's characters
    with pytest.raises(LadderError, match=f"{split}.bin is corrupt: {len(ids) - 2} tokens where meta.json says {len(ids)}"):
        TokenData.open(d)


@pytest.mark.parametrize(
    "edit",
    [{"sha256": None}, {"val_chars": "x"}, {"val_chars": -1}, {"val_chars": 1e23}, {"train_tokens": None}, {"val_tokens": -5},
     {"vocab_size": "VOCAB"}, {"vocab_size": 1.0}],
)  # fmt: skip
def test_meta_fields_that_training_and_eval_read_are_checked(tmp_path, data_dir, edit):
    d = tmp_path / "d"
    shutil.copytree(data_dir, d)
    meta = json.loads((d / "meta.json").read_text())
    if "vocab_size" in edit:  # the right number, of the wrong type: training would build the model from it
        edit = {"vocab_size": type(edit["vocab_size"])(meta["vocab_size"])}
    (d / "meta.json").write_text(json.dumps({**meta, **edit}))
    with pytest.raises(LadderError, match="corrupt meta.json"):
        TokenData.open(d)
