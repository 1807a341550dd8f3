"""Tiny Shakespeare, a character-level tokenizer and batches for the workbench model.

The corpus (Karpathy's char-rnn copy, public domain) ships in ``refimpl/assets``;
nothing is downloaded. The split is fixed: the first 90% of characters train,
the last 10% validate.
"""
from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import torch

from refimpl.lm import check_int

ASSETS = Path(__file__).parent / "assets"
CORPUS_PATH = ASSETS / "tinyshakespeare.txt"
CORPUS_MD5 = "6fb458f1232090904fb40fe944165e91"
VAL_FRACTION = 0.1


@lru_cache(maxsize=1)
def load_corpus() -> str:
    """The corpus as one string, after checking its md5."""
    raw = CORPUS_PATH.read_bytes()
    digest = hashlib.md5(raw).hexdigest()
    if digest != CORPUS_MD5:
        raise ValueError(f"{CORPUS_PATH} has md5 {digest}, expected {CORPUS_MD5}")
    return raw.decode("utf-8")


class CharTokenizer:
    """One token per character; the vocabulary is the sorted set of corpus characters."""

    def __init__(self, chars: str):
        if not isinstance(chars, str) or not chars:
            raise TypeError(f"chars must be a non-empty str, got {chars!r:.80}")
        if len(set(chars)) != len(chars):
            raise ValueError("chars must not repeat a character")
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_corpus(cls) -> "CharTokenizer":
        return cls("".join(sorted(set(load_corpus()))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        try:
            return [self.stoi[c] for c in text]
        except KeyError as err:
            raise ValueError(
                f"text contains {err.args[0]!r}, which is not in the vocabulary "
                f"of {self.vocab_size} characters"
            ) from None

    def decode(self, ids) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        bad = [i for i in ids if not 0 <= int(i) < self.vocab_size]
        if bad:
            raise ValueError(f"ids contains {bad[0]}, outside [0, {self.vocab_size})")
        return "".join(self.chars[int(i)] for i in ids)


def splits(tokenizer: CharTokenizer | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(train_ids, val_ids) as int64 tensors: the first 90% and the last 10% of the corpus."""
    tokenizer = tokenizer or CharTokenizer.from_corpus()
    ids = torch.tensor(tokenizer.encode(load_corpus()), dtype=torch.long)
    n_train = int(len(ids) * (1 - VAL_FRACTION))
    return ids[:n_train], ids[n_train:]


def check_batch_args(ids, batch_size: int, block_size: int) -> None:
    """ValueError naming the argument of ``get_batch`` that is out of range."""
    if not isinstance(ids, torch.Tensor) or ids.ndim != 1 or ids.is_floating_point():
        raise ValueError(f"ids must be a 1-D integer tensor of token ids, got {ids!r:.80}")
    check_int("batch_size", batch_size, 1)
    check_int("block_size", block_size, 1, len(ids) - 2)


def get_batch(ids: torch.Tensor, batch_size: int, block_size: int,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows (x, y) of shape [batch_size, block_size]; y is x shifted by one."""
    check_batch_args(ids, batch_size, block_size)
    starts = torch.randint(len(ids) - block_size - 1, (batch_size,), generator=generator)
    offsets = torch.arange(block_size + 1)
    windows = ids[starts[:, None] + offsets]
    return windows[:, :-1], windows[:, 1:]
