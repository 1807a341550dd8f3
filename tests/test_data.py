import hashlib

import pytest
import torch

from refimpl.data import CORPUS_PATH, CharTokenizer, get_batch, load_corpus, splits

SHARED_MD5 = "6fb458f1232090904fb40fe944165e91"  # DESIGN.md's md5 of ../shared/data/tinyshakespeare.txt


def test_corpus_md5_matches_the_shared_copy():
    assert hashlib.md5(CORPUS_PATH.read_bytes()).hexdigest() == SHARED_MD5
    assert load_corpus().startswith("First Citizen:")


def test_tokenizer_round_trip_and_vocab():
    tok = CharTokenizer.from_corpus()
    assert tok.vocab_size == len(set(load_corpus())) == 65
    text = "ROMEO:\nBut soft! what light through yonder window breaks?"
    ids = tok.encode(text)
    assert len(ids) == len(text) and all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids)) == text


def test_tokenizer_errors_name_the_character():
    tok = CharTokenizer.from_corpus()
    with pytest.raises(ValueError, match="'é'"):
        tok.encode("café")
    with pytest.raises(ValueError, match="65"):
        tok.decode([3, 65])
    with pytest.raises(ValueError, match="repeat"):
        CharTokenizer("abca")


def test_split_is_the_last_tenth():
    train, val = splits()
    text = load_corpus()
    assert len(train) + len(val) == len(text)
    assert len(val) == len(text) - int(len(text) * 0.9)
    tok = CharTokenizer.from_corpus()
    assert tok.decode(val[:50]) == text[len(train):len(train) + 50]


def test_get_batch_targets_are_shifted_inputs():
    train, _ = splits()
    x, y = get_batch(train, 4, 32, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 32)
    assert torch.equal(x[:, 1:], y[:, :-1])


@pytest.mark.parametrize("args, match", [
    ((torch.arange(10), 2, 9), "block_size must be an int in \\[1, 8\\]"),
    ((torch.arange(10), 2, 0), "block_size"),
    ((torch.arange(100), 0, 4), "batch_size"),
    ((torch.zeros(3, 40, dtype=torch.long), 2, 4), "ids must be a 1-D integer tensor"),
    ((torch.rand(40), 2, 4), "ids must be a 1-D integer tensor"),
])
def test_get_batch_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        get_batch(*args)


def test_tokenizer_bad_types():
    with pytest.raises(TypeError, match="text"):
        CharTokenizer("ab").encode(["a"])
    with pytest.raises(TypeError, match="chars"):
        CharTokenizer(["a", "b"])
