"""The recurrent draft model (refimpl.recurrent): its cached steps are torch.nn.LSTM's numbers,
its state cache rolls back like a KV cache, and speculative decoding with it keeps the target's
greedy output."""
from dataclasses import replace

import pytest
import torch

from refimpl import lm
from refimpl.lm import GPTConfig, TinyGPT
from refimpl.recurrent import LSTMConfig, LSTMDraft, StateCache, lstm_cell
from refimpl.speculative import DraftModel, autoregressive_generate, speculative_generate
from refimpl.train import PRESETS, train


def lstm(seed, V=20, layers=2, width=16, block=64):
    torch.manual_seed(seed)
    return LSTMDraft(LSTMConfig(V, block, layers, width)).double().eval()


def ids(*shape, V=20, seed=1):
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


def test_lstm_cell_is_torch_lstm_cell():
    torch.manual_seed(0)
    cell = torch.nn.LSTMCell(8, 8).double()
    x, h, c = (torch.randn(3, 8, dtype=torch.float64) for _ in range(3))
    want = cell(x, (h, c))
    got = lstm_cell(x, h, c, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("layers", [1, 2])
def test_cached_steps_equal_the_whole_sequence_through_torch_lstm(layers):
    model, x = lstm(0, layers=layers), ids(3, 30)
    with torch.no_grad():
        full = model(x)  # torch.nn.LSTM over the whole sequence
        cache = model.empty_cache(3)
        parts = [model(x[:, :12], cache=cache)] + [model(x[:, t:t + 1], cache=cache)
                                                  for t in range(12, 30)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-12)
    assert len(cache) == 30


def test_crop_rolls_back_to_the_state_after_the_kept_prefix():
    model, x, y = lstm(1), ids(1, 20), ids(1, 6, seed=2)
    with torch.no_grad():
        cache = model.empty_cache(1)
        model(x, cache=cache)
        model(y, cache=cache)  # drafts that get rejected
        cache.crop(15)
        got = model(y, cache=cache, last_only=True)
        want = model(torch.cat([x[:, :15], y], dim=1))[:, -1:]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_greedy_speculative_decoding_with_an_lstm_draft_is_the_targets_greedy_output():
    torch.manual_seed(0)
    target = TinyGPT(GPTConfig(20, 64, 2, 2, 16)).double().eval()
    with torch.no_grad():
        for p in target.parameters():
            p.mul_(4.0)  # logits far from ties
    draft = lstm(3)
    for b in range(3):
        x = ids(1, 7, seed=10 + b)
        want = autoregressive_generate(target, x, max_new_tokens=30, greedy=True)
        for gamma in (1, 4, 8):
            got, stats = speculative_generate(target, DraftModel(draft), x, max_new_tokens=30,
                                              gamma=gamma, greedy=True)
            assert torch.equal(got, want)
            assert sum(stats.drafted) > 0


def test_bad_input():
    model = lstm(0)
    x = ids(2, 5)
    with pytest.raises(ValueError, match="position_ids"):
        model(x, position_ids=torch.arange(5))
    with pytest.raises(ValueError, match="attn_mask"):
        model(x, attn_mask=torch.zeros(2, 1, 5, 5))
    with pytest.raises(TypeError, match="cache"):
        model(x, cache=lm.KVCache(2, 2, 2, 8, 64))
    with pytest.raises(ValueError, match="block_size"):
        model(ids(1, 65))
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.full((1, 3), 20))
    with pytest.raises(ValueError, match="length"):
        model.empty_cache(1).crop(1)
    with pytest.raises(ValueError, match="config.n_embd"):
        LSTMDraft(LSTMConfig(20, 64, 1, 0))
    with pytest.raises(ValueError, match="batch_size"):
        StateCache(1, 0, 8, 64)
    # a ragged batch needs positions and pads, which an LSTM cannot take: refused, not wrong
    with pytest.raises(ValueError, match="position_ids"):
        speculative_generate(lm.load("target"), lm.load("draft_lstm"), ids(2, 8, V=65),
                             max_new_tokens=4, gamma=2, greedy=True)
    with pytest.raises(ValueError, match="arch"):
        train("x", replace(PRESETS["smoke"], arch="rnn"), progress=False)


def test_an_lstm_preset_trains_saves_and_loads_as_lstm(tmp_path):
    result = train("smoke_lstm", replace(PRESETS["smoke"], arch="lstm"), tmp_path, eval_every=10,
                   progress=False)
    assert result["curve"][-1]["val_loss"] < result["curve"][0]["val_loss"]
    model = lm.load(str(tmp_path / "smoke_lstm.pt"))
    assert isinstance(model, LSTMDraft) and model.config.n_embd == PRESETS["smoke"].n_embd


def test_the_committed_lstm_draft_drafts_for_the_target():
    target, draft = lm.load("target"), lm.load("draft_lstm")
    assert isinstance(draft, LSTMDraft)
    from refimpl.data import splits
    _, val = splits()
    prompt = val[7000:7032][None]
    want = autoregressive_generate(target, prompt, max_new_tokens=64, greedy=True)
    got, stats = speculative_generate(target, draft, prompt, max_new_tokens=64, gamma=8,
                                      greedy=True)
    assert torch.equal(got, want)
    assert stats.tokens_per_call > 3  # it agrees with the target far more often than chance
