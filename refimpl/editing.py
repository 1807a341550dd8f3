"""A copy-heavy editing task: spelling correction of Shakespeare passages.

The input is a passage with a few misspelt words, the output the passage as written. As in
grammatical error correction, for which Ge et al., "Lossless Acceleration for Seq2seq Generation
with Aggressive Decoding" (2022) draft from the input, the output repeats the input almost
everywhere, so prompt lookup can draft nearly all of it. A decoder-only model reads one example as
``misspelt passage + SEP`` and writes ``passage + END``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from refimpl.data import CharTokenizer
from refimpl.lm import check_int
from refimpl.speculative import PromptLookup, speculative_generate

SEP = "$"  # occurs once in the corpus
END = "\n\n"
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def check_text(name, value):
    """ValueError unless ``value`` is a str."""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a str, got {type(value).__name__}")


def _randint(n: int, generator: torch.Generator | None) -> int:
    return int(torch.randint(n, (1,), generator=generator))


def misspell(word: str, generator: torch.Generator | None = None) -> str:
    """One typo in a word of at least 3 letters: swap two neighbours, drop, double or replace a
    letter (the four kinds of Damerau's 1964 study of spelling errors). Always changes the word."""
    if not isinstance(word, str) or len(word) < 3 or not word.isalpha():
        raise ValueError(f"word must be at least 3 letters, got {word!r}")
    kind, i = _randint(4, generator), 1 + _randint(len(word) - 2, generator)  # 1 <= i <= len - 2
    if kind == 0 and word[i] != word[i + 1]:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if kind == 1:
        return word[:i] + word[i + 1:]
    if kind == 2:
        return word[:i] + word[i] + word[i:]
    other = LETTERS.replace(word[i].lower(), "")[_randint(25, generator)]
    return word[:i] + (other.upper() if word[i].isupper() else other) + word[i + 1:]


def corrupt(passage: str, num_typos: int, generator: torch.Generator | None = None) -> str:
    """The passage with ``num_typos`` of its words of 3 or more letters misspelt, once each (all of
    them if it has fewer)."""
    check_text("passage", passage)
    check_int("num_typos", num_typos, 0)
    words = passage.split(" ")
    candidates = [k for k, w in enumerate(words) if len(w) >= 3 and w.isalpha()]
    for k in torch.randperm(len(candidates), generator=generator)[:num_typos].tolist():
        words[candidates[k]] = misspell(words[candidates[k]], generator)
    return " ".join(words)


def sample_passage(text: str, length: int, generator: torch.Generator | None = None,
                   start: int | None = None) -> str:
    """About ``length`` characters of ``text`` from the first word start at or after ``start``
    (random if None), cut at a word end."""
    check_text("text", text)
    check_int("length", length, 1, len(text) // 2 - 1)
    if start is None:
        start = _randint(len(text) - 2 * length, generator)
    check_int("start", start, 0, len(text) - 1)
    while 0 < start < len(text) and text[start - 1] not in " \n":
        start += 1
    end = min(start + length, len(text))
    while end < len(text) and text[end] not in " \n":
        end += 1
    return text[start:end]


def edit_example(passage: str, num_typos: int, generator: torch.Generator | None = None) -> tuple[str, str]:
    """(prompt, answer): the misspelt passage and SEP, then the passage and END."""
    return corrupt(passage, num_typos, generator) + SEP, passage + END


def check_batch_args(batch_size, block_size, lengths, max_typos):
    """ValueError unless batch_size, block_size, max_typos >= 1 and lengths = (lo, hi), 1 <= lo <= hi."""
    check_int("batch_size", batch_size, 1)
    check_int("block_size", block_size, 1)
    check_int("max_typos", max_typos, 1)
    if not isinstance(lengths, (tuple, list)) or len(lengths) != 2:
        raise ValueError(f"lengths must be a pair (lo, hi), got {lengths!r}")
    check_int("lengths[0]", lengths[0], 1)
    check_int("lengths[1]", lengths[1], lengths[0])


def edit_batch(tok: CharTokenizer, text: str, batch_size: int, block_size: int,
               generator: torch.Generator | None = None, lengths=(40, 120), max_typos: int = 4):
    """Windows (x, y) [batch_size, block_size] of examples laid end to end, each window starting
    at an example. y is x shifted by one, set to -100 (ignored by cross-entropy) except where it
    is an answer character: the model learns to write answers, not misspelt passages."""
    check_batch_args(batch_size, block_size, lengths, max_typos)
    xs, ys = [], []
    for _ in range(batch_size):
        ids, is_answer = [], []
        while len(ids) <= block_size:
            length = lengths[0] + _randint(lengths[1] - lengths[0] + 1, generator)
            prompt, answer = edit_example(sample_passage(text, length, generator), 1 + _randint(max_typos, generator),
                                          generator)
            ids += tok.encode(prompt) + tok.encode(answer)
            is_answer += [False] * len(prompt) + [True] * len(answer)
        window = torch.tensor(ids[:block_size + 1])
        xs.append(window[:-1])
        ys.append(window[1:].masked_fill(~torch.tensor(is_answer[1:block_size + 1]), -100))
    return torch.stack(xs), torch.stack(ys)


@torch.no_grad()
def edit_loss(model, tok: CharTokenizer, text: str, block_size: int, num_windows: int = 64,
              seed: int = 0) -> float:
    """Mean cross-entropy (nats/char) on the answers of ``num_windows`` fixed windows of ``text``."""
    check_int("num_windows", num_windows, 1)
    was_training = model.training
    model.eval()
    x, y = edit_batch(tok, text, num_windows, block_size, torch.Generator().manual_seed(seed))
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100).item()
    model.train(was_training)
    return loss


def damerau_distance(a: str, b: str) -> int:
    """Edits (insert, delete, replace, swap of neighbours) between two strings: the optimal string
    alignment distance, by dynamic programming."""
    check_text("a", a)
    check_text("b", b)
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[-1][-1]


def correction_score(misspelt: str, written: str, answer: str) -> dict:
    """How a model's ``written`` answer (``len(answer)`` characters) corrects the ``misspelt``
    passage whose correct ``answer`` (passage and END) is given: the edit distances to the correct
    passage of the input and of the answer, the typos (words of the input that differ from the
    truth's) and how many of them the answer has right (its word at the typo's place)."""
    truth, written = answer[:-len(END)], written[:-len(END)]
    words = written.split(" ")
    typos = [k < len(words) and words[k] == w_true
             for k, (w_in, w_true) in enumerate(zip(misspelt.split(" "), truth.split(" "))) if w_in != w_true]
    return {"distance_input": damerau_distance(misspelt, truth),
            "distance_answer": damerau_distance(written, truth), "typos": len(typos), "fixed": sum(typos)}


def correction_stats(model, tok: CharTokenizer, text: str, num: int, length: int = 80, num_typos: int = 2,
                     seed: int = 4, gamma: int = 8) -> dict:
    """Greedy answers of ``model`` to ``num`` passages of ``text``, decoded with prompt lookup
    (exact: the model's own greedy answers). Returns the summed ``correction_score`` of the answers
    and the mean tokens per target call."""
    check_int("num", num, 1)
    g = torch.Generator().manual_seed(seed)
    stats = {"passages": num, "distance_input": 0, "distance_answer": 0, "typos": 0, "fixed": 0,
             "tokens_per_call": 0.0}
    for _ in range(num):
        prompt, answer = edit_example(sample_passage(text, length, g), num_typos, g)
        x = torch.tensor([tok.encode(prompt)])
        out, run = speculative_generate(model, PromptLookup(), x, max_new_tokens=len(answer), gamma=gamma,
                                        greedy=True)
        score = correction_score(prompt[:-len(SEP)], tok.decode(out[0, x.shape[1]:]), answer)
        for key, value in score.items():
            stats[key] += value
        stats["tokens_per_call"] += run.tokens_per_call / num
    return stats
