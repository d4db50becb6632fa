"""Tokenizers: characters, or byte-level BPE trained locally with HF `tokenizers`.

Both reserve one special token, `<|endoftext|>`: it separates documents in the corpus and
starts every context window, in training and in sampling alike.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from .errors import LadderError

EOT = "<|endoftext|>"


class Tokenizer(Protocol):
    kind: str
    vocab_size: int
    eot_id: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def save(self, path: Path) -> None: ...


class CharTokenizer:
    kind = "char"

    def __init__(self, chars: list[str]):
        self.chars = chars
        self.index = {c: i for i, c in enumerate(chars)}
        self.eot_id = len(chars)
        self.vocab_size = len(chars) + 1

    @classmethod
    def train(cls, documents: list[str]) -> CharTokenizer:
        return cls(sorted(set().union(*map(set, documents))))

    def encode(self, text: str) -> list[int]:
        try:
            return [self.index[c] for c in text]
        except KeyError as e:
            raise LadderError(f"character {e.args[0]!r} (U+{ord(e.args[0]):04X}) is not in the tokenizer's vocabulary") from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids if i < self.eot_id)

    def save(self, path: Path) -> None:
        text = json.dumps({"ladderlm_tokenizer": "char", "chars": self.chars}, ensure_ascii=False)
        path.write_text(text, encoding="utf-8")  # what load_tokenizer reads, whatever the locale


class BpeTokenizer:
    kind = "bpe"

    def __init__(self, hf):  # hf: tokenizers.Tokenizer
        self.hf = hf
        # The text "<|endoftext|>" in a corpus or prompt is text, as for CharTokenizer: read as the
        # separator token it would split documents and vanish on decode.
        hf.encode_special_tokens = True
        self.eot_id = hf.token_to_id(EOT)
        self.vocab_size = hf.get_vocab_size()

    @classmethod
    def train(cls, documents: list[str], vocab_size: int) -> BpeTokenizer:
        from tokenizers import Tokenizer as HfTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        hf = HfTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(documents, trainer=trainer)
        return cls(hf)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)

    def save(self, path: Path) -> None:
        self.hf.save(str(path))


def load_tokenizer(path: Path) -> Tokenizer:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a tokenizer file (a JSON object)")
        if data.get("ladderlm_tokenizer") == "char":
            chars = data.get("chars")
            if not (isinstance(chars, list) and all(isinstance(c, str) and len(c) == 1 for c in chars)):
                raise ValueError("its chars must be a list of single characters")
            if len(set(chars)) != len(chars):
                raise ValueError("its chars repeat a character")
            return CharTokenizer(chars)
        from tokenizers import Tokenizer as HfTokenizer

        tok = BpeTokenizer(HfTokenizer.from_str(json.dumps(data)))
    except Exception as e:  # HF raises plain Exception on malformed files
        raise LadderError(f"cannot read tokenizer {path}: {e}") from None
    if tok.eot_id is None:
        raise LadderError(f"tokenizer {path} has no {EOT} token")
    return tok
