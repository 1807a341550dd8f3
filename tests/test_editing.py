import pytest
import torch

from refimpl import lm
from refimpl.data import CharTokenizer, splits
from refimpl.editing import (END, SEP, corrupt, correction_score, correction_stats, damerau_distance, edit_batch,
                             edit_example, edit_loss, misspell, sample_passage)
from refimpl.speculative import PromptLookup, autoregressive_generate, speculative_generate


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer.from_corpus()


@pytest.fixture(scope="module")
def val_text(tok):
    return tok.decode(splits(tok)[1])


def test_a_typo_is_one_edit_away_and_keeps_the_first_letter():
    g = torch.Generator().manual_seed(0)
    seen = set()
    for word in ["the", "loving", "Hortensio", "sleep", "aaa"] * 40:
        typo = misspell(word, g)
        assert damerau_distance(word, typo) == 1, (word, typo)
        assert typo[0] == word[0]
        seen.add(len(typo) - len(word))
    assert seen == {-1, 0, 1}  # drops, swaps or replacements, doubles
    with pytest.raises(ValueError, match="word"):
        misspell("to", g)


def test_corrupt_misspells_the_requested_number_of_words(val_text):
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        passage = sample_passage(val_text, 80, g)
        words = passage.split(" ")
        eligible = sum(len(w) >= 3 and w.isalpha() for w in words)
        changed = [(a, b) for a, b in zip(words, corrupt(passage, 3, g).split(" ")) if a != b]
        assert len(changed) == min(3, eligible)
        assert all(len(a) >= 3 and a.isalpha() for a, _ in changed)


def test_passages_are_whole_words(val_text):
    g = torch.Generator().manual_seed(2)
    for _ in range(50):
        p = sample_passage(val_text, 60, g)
        start = val_text.index(p)
        assert len(p) >= 60
        assert start == 0 or val_text[start - 1] in " \n"
        assert val_text[start + len(p)] in " \n"
    assert sample_passage("to be or not to be", 5, start=13) == "to be"  # stops at the end of the text
    with pytest.raises(ValueError, match="length"):
        sample_passage(val_text, 0, g)


def test_edit_batch_labels_exactly_the_answers(tok, val_text):
    x, y = edit_batch(tok, val_text, 8, 512, torch.Generator().manual_seed(3))
    assert x.shape == y.shape == (8, 512)
    for row_x, row_y in zip(x, y):
        text = tok.decode(row_x)
        labelled = row_y != -100
        assert torch.equal(row_y[:-1][labelled[:-1]], row_x[1:][labelled[:-1]])  # y is x shifted
        # every window starts with an example: a misspelt passage, SEP, then the labelled answer
        first = int(labelled.nonzero()[0])
        end = first + int((~labelled[first:]).nonzero()[0])
        prompt, answer = text[:first], text[first + 1:end + 1]
        assert text[first] == SEP and answer.endswith(END)
        assert damerau_distance(prompt, answer[:-len(END)]) <= 4  # at most 4 typos


@pytest.fixture(scope="module")
def editor():
    return lm.load("editor")


def test_editor_reproduces_its_recorded_answer_loss_and_beats_the_target(tok, val_text, editor):
    rec = lm.record("editor")
    loss = edit_loss(editor, tok, val_text, 256, 256)
    assert loss == pytest.approx(rec["final_edit_val_loss"], abs=2e-3)
    assert loss < 0.25 * edit_loss(lm.load("target"), tok, val_text, 256, 64)


def test_damerau_distance_on_small_cases():
    assert damerau_distance("", "abc") == damerau_distance("abc", "") == 3
    assert damerau_distance("thou", "thou") == 0
    assert damerau_distance("thou", "tohu") == 1  # one swap
    assert damerau_distance("thou", "thu") == damerau_distance("thou", "thoou") == damerau_distance("thou", "thau") == 1
    assert damerau_distance("ca", "abc") == 3  # optimal string alignment: no edit of a swapped pair


def test_editor_copies_and_corrects_held_out_passages_and_prompt_lookup_drafts_them(tok, val_text, editor):
    """Greedy answers to new passages of the validation split. The editor copies (its answers are
    about as close to the truth as its inputs; the plain target's are not: the control) and fixes
    most typos; prompt lookup accepts long runs of the input."""
    ed, plain = (correction_stats(m, tok, val_text, 8) for m in (editor, lm.load("target")))
    print(ed, plain)
    assert ed["distance_input"] == plain["distance_input"] == ed["typos"] == plain["typos"] == 16  # 8 x 2 typos
    assert ed["distance_answer"] <= 2 * ed["distance_input"] and plain["distance_answer"] >= 10 * 16
    assert ed["fixed"] >= ed["typos"] / 2 and plain["fixed"] <= 2
    assert ed["tokens_per_call"] > 4 > 2 > plain["tokens_per_call"]


def test_correction_score_counts_by_hand():
    """Two typos (two swaps, edit distance 2 from the truth); the answer fixes one and keeps the
    other, and a dropped word end counts against it too."""
    score = correction_score("teh cat sta on", "the cat sta o" + END, "the cat sat on" + END)
    assert score == {"distance_input": 2, "distance_answer": 2, "typos": 2, "fixed": 1}
    assert correction_score("a bb", "a bb" + END, "a bb" + END) == {
        "distance_input": 0, "distance_answer": 0, "typos": 0, "fixed": 0}


def test_prompt_lookup_answers_are_the_editors_greedy_answers(tok, val_text, editor):
    prompt, answer = edit_example(sample_passage(val_text, 80, torch.Generator().manual_seed(5)), 2)
    x = torch.tensor([tok.encode(prompt)])
    want = autoregressive_generate(editor, x, max_new_tokens=len(answer), greedy=True)
    got, _ = speculative_generate(editor, PromptLookup(), x, max_new_tokens=len(answer), gamma=8, greedy=True)
    assert torch.equal(got, want)


TEXT = "to be or not to be that is the question whether tis nobler in the mind to suffer " * 4
BAD_CALLS = {
    "misspell word not str": (lambda tok: misspell(12345), "word"),
    "corrupt num_typos < 0": (lambda tok: corrupt("the cat sat on the mat", -1), "num_typos"),
    "corrupt passage not str": (lambda tok: corrupt(["the", "cat"], 1), "passage"),
    "sample_passage start past the end": (lambda tok: sample_passage(TEXT, 10, start=len(TEXT)), "start"),
    "sample_passage start < 0": (lambda tok: sample_passage(TEXT, 10, start=-5), "start"),
    "sample_passage length float": (lambda tok: sample_passage(TEXT, 10.5), "length"),
    "sample_passage text": (lambda tok: sample_passage(None, 10), "text"),
    "edit_batch batch_size 0": (lambda tok: edit_batch(tok, TEXT, 0, 64), "batch_size"),
    "edit_batch block_size 0": (lambda tok: edit_batch(tok, TEXT, 2, 0), "block_size"),
    "edit_batch lengths reversed": (lambda tok: edit_batch(tok, TEXT, 2, 64, lengths=(40, 20)), r"lengths\[1\]"),
    "edit_batch lengths one": (lambda tok: edit_batch(tok, TEXT, 2, 64, lengths=(40,)), "lengths"),
    "edit_batch max_typos 0": (lambda tok: edit_batch(tok, TEXT, 2, 64, max_typos=0), "max_typos"),
    "edit_loss num_windows 0": (lambda tok: edit_loss(None, tok, TEXT, 64, num_windows=0), "num_windows"),
    "damerau b not str": (lambda tok: damerau_distance("abc", None), "b must"),
    "correction_stats num 0": (lambda tok: correction_stats(None, tok, TEXT, 0), "num must"),
}


@pytest.mark.parametrize("case", BAD_CALLS, ids=str)
def test_check_functions_name_the_argument(case, tok):
    call, match = BAD_CALLS[case]
    with pytest.raises(ValueError, match=match):
        call(tok)
