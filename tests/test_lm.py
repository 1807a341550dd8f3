import pytest
import torch
import torch.nn.functional as F

from refimpl import lm
from refimpl.lm import GPTConfig, KVCache, TinyGPT, additive_mask, causal_mask, generate

ATOL = 1e-5


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TinyGPT(GPTConfig(vocab_size=65, block_size=64, n_layer=2, n_head=4, n_embd=32)).eval()


def ids(*shape, seed=1):
    return torch.randint(65, shape, generator=torch.Generator().manual_seed(seed))


def block_diagonal(lengths, total):
    """Boolean [total, total] mask: causal within each segment, nothing across; padding sees itself."""
    seg = torch.full((total,), -1)
    start = 0
    for i, n in enumerate(lengths):
        seg[start:start + n] = i
        start += n
    same = (seg[:, None] == seg[None, :]) & (seg[:, None] >= 0)
    return (same & torch.ones(total, total, dtype=torch.bool).tril()) | torch.eye(total, dtype=torch.bool)


@torch.no_grad()
def test_attention_matches_pytorch_sdpa():
    q, k, v = torch.randn(3, 2, 4, 7, 8).unbind(0)
    for backend in ("math", "sdpa"):
        torch.testing.assert_close(lm.attention(q, k, v, backend=backend),
                                   F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=ATOL, rtol=0)
    k2, v2 = torch.randn(2, 2, 4, 11, 8).unbind(0)  # 7 new queries after 4 cached keys
    allowed = torch.ones(7, 11, dtype=torch.bool).tril(diagonal=4)
    want = F.scaled_dot_product_attention(q, k2, v2, attn_mask=allowed)
    torch.testing.assert_close(lm.attention(q, k2, v2, backend="math"), want, atol=ATOL, rtol=0)
    assert torch.equal(causal_mask(7, 11) == 0, allowed)


@torch.no_grad()
def test_mask_in_another_dtype_than_the_queries():
    q, k, v = torch.randn(3, 1, 2, 30, 8, dtype=torch.float64).unbind(0)
    mask = causal_mask(20, 30)[None, None]  # float32 mask, float64 queries, > 16 keys
    want = F.scaled_dot_product_attention(q[:, :, :20], k, v, attn_mask=mask.double())
    for backend in ("sdpa", "math"):
        torch.testing.assert_close(lm.attention(q[:, :, :20], k, v, mask, backend), want)


@torch.no_grad()
def test_backends_agree(model):
    x = ids(2, 20)
    want = model(x)
    model.attn_backend = "math"
    try:
        torch.testing.assert_close(model(x), want, atol=ATOL, rtol=0)
    finally:
        model.attn_backend = "sdpa"


@torch.no_grad()
def test_incremental_decoding_equals_full_forward(model):
    x = ids(3, 30)
    full = model(x)
    cache = model.empty_cache(3)
    steps = [model(x[:, :10], cache=cache)]
    for t in range(10, 30):
        steps.append(model(x[:, t:t + 1], cache=cache))
    assert len(cache) == 30
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)


@torch.no_grad()
def test_last_only_is_the_last_position_of_the_full_logits(model):
    x = ids(2, 9)
    cache = model.empty_cache(2)
    got = model(x, cache=cache, last_only=True)
    assert got.shape == (2, 1, model.config.vocab_size) and len(cache) == 9
    torch.testing.assert_close(got, model(x)[:, -1:], atol=ATOL, rtol=0)


@torch.no_grad()
def test_crop_rolls_back_exactly(model):
    x, other = ids(2, 20), ids(2, 6, seed=2)
    cache = model.empty_cache(2)
    model(x, cache=cache)
    model(ids(2, 5, seed=3), cache=cache)  # tokens to be rejected
    cache.crop(20)
    got = model(other, cache=cache)
    want = model(torch.cat([x, other], 1))[:, 20:]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="length"):
        cache.crop(27)


@torch.no_grad()
def test_reorder_gathers_rows(model):
    x, nxt = ids(3, 12), ids(4, 3, seed=4)
    index = torch.tensor([2, 0, 0, 1])  # repeats a row and grows the batch, as beam search does
    cache = model.empty_cache(3)
    model(x, cache=cache)
    cache.reorder(index)
    assert cache.batch_size == 4
    got = model(nxt, cache=cache)
    want = model(torch.cat([x[index], nxt], 1))[:, 12:]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="index"):
        cache.reorder(torch.tensor([0, 4]))


@pytest.mark.parametrize("index", [[0, 1, 2, 3, 4], [1, 0, 3, 4, 2], [4, 4, 0, 0, 1], [0, 0, 0, 2, 2],
                                   [3, 1, 1, 0, 4]])
def test_reorder_in_place_equals_index_select(index):
    """Same batch: rows move in place, only those that change (swaps, cycles, repeats)."""
    cache = KVCache(2, 5, 2, 3, 6)
    for layer in range(2):
        cache.update(layer, torch.randn(5, 2, 4, 3), torch.randn(5, 2, 4, 3))
    cache.advance(4)
    before = [(k.clone(), v.clone()) for k, v in cache.kv()]
    cache.reorder(torch.tensor(index))
    for (k, v), (k0, v0) in zip(cache.kv(), before):
        assert torch.equal(k, k0[index]) and torch.equal(v, v0[index])


@torch.no_grad()
def test_block_diagonal_mask_gives_each_segment_its_own_logits(model):
    a, b = ids(1, 9), ids(1, 14, seed=5)
    packed = torch.cat([a, b, torch.zeros(1, 3, dtype=torch.long)], 1)  # 3 padding slots
    pos = torch.cat([torch.arange(9), torch.arange(14), torch.zeros(3, dtype=torch.long)])[None]
    mask = additive_mask(block_diagonal([9, 14], 26))[None, None]
    out = model(packed, position_ids=pos, attn_mask=mask)
    torch.testing.assert_close(out[:, :9], model(a), atol=ATOL, rtol=0)
    torch.testing.assert_close(out[:, 9:23], model(b), atol=ATOL, rtol=0)
    # Negative control: restarted positions alone, with a plain causal mask, leak segment a into b.
    leaky = model(packed, position_ids=pos)
    assert (leaky[:, 9:23] - model(b)).abs().max() > 1e-2


@torch.no_grad()
def test_extract_cuts_a_segment_cache_out_of_a_packed_row(model):
    a, b, more = ids(1, 9), ids(1, 14, seed=5), ids(1, 4, seed=6)
    packed = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(9), torch.arange(14)])[None]
    cache = model.empty_cache(1)
    model(packed, position_ids=pos, attn_mask=additive_mask(block_diagonal([9, 14], 23))[None, None],
          cache=cache)
    sub = cache.extract(0, 9, 14)
    assert len(sub) == 14 and sub.batch_size == 1
    torch.testing.assert_close(model(more, cache=sub), model(torch.cat([b, more], 1))[:, 14:],
                               atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="positions"):
        cache.extract(0, 20, 5)


@torch.no_grad()
def test_split_and_stack_round_trip(model):
    x, nxt = ids(3, 10), ids(3, 1, seed=7)
    cache = model.empty_cache(3)
    model(x, cache=cache)
    rows = cache.split()
    assert [c.batch_size for c in rows] == [1, 1, 1]
    row1 = model(nxt[1:2], cache=rows[1])
    rows[1].crop(10)
    restacked = KVCache.stack(rows)
    torch.testing.assert_close(model(nxt, cache=restacked), model(torch.cat([x, nxt], 1))[:, 10:],
                               atol=ATOL, rtol=0)
    torch.testing.assert_close(row1, model(torch.cat([x, nxt], 1))[1:2, 10:], atol=ATOL, rtol=0)
    short = model.empty_cache(1)
    model(x[:1, :4], cache=short)
    with pytest.raises(ValueError, match="length"):
        KVCache.stack([rows[0], short])
    rows[0].crop(0)  # a written cache cropped to 0 stacks with a never-written one
    both = KVCache.stack([rows[0], model.empty_cache(1)])
    torch.testing.assert_close(model(x[:2], cache=both), model(x[:2]), atol=ATOL, rtol=0)


@torch.no_grad()
def test_generate_with_and_without_cache_agree(model):
    x = ids(2, 5)
    assert torch.equal(generate(model, x, 12, temperature=0),
                       generate(model, x, 12, temperature=0, use_cache=False))
    g1, g2 = (torch.Generator().manual_seed(3) for _ in range(2))
    assert torch.equal(generate(model, x, 12, generator=g1),
                       generate(model, x, 12, use_cache=False, generator=g2))


@pytest.mark.parametrize("call, match", [
    (lambda m: m(ids(1, 65)), "block_size"),
    (lambda m: m(ids(2, 4), attn_mask=torch.zeros(2, 1, 4, 5)), "attn_mask"),
    (lambda m: m(ids(2, 4), attn_mask=torch.zeros(2, 1, 4, 4, dtype=torch.bool)), "additive"),
    (lambda m: m(ids(2, 4), position_ids=torch.tensor([[0, 1, 2, 64]] * 2)), "position_ids"),
    (lambda m: m(ids(2, 4), position_ids=torch.tensor([[0, 1, -1, 2]] * 2)), "position_ids"),
    (lambda m: m(ids(2, 4), cache=m.empty_cache(3)), "cache"),
    (lambda m: m(ids(2, 4), position_ids=torch.zeros(2, 4)), "position_ids"),
    (lambda m: m(ids(4).float()), "input_ids"),
    (lambda m: m.empty_cache(2).reorder(torch.tensor([], dtype=torch.long)), "index"),
    (lambda m: generate(m, ids(1, 60), 10), "max_new_tokens"),
    (lambda m: setattr(m, "attn_backend", "flash"), "attn_backend"),
    (lambda m: m(torch.tensor([[-1, 2]])), "input_ids must hold token ids in \\[0, vocab_size=65\\)"),
    (lambda m: m(torch.tensor([[3, 65]])), "input_ids must hold token ids"),
    (lambda m: generate(m, ids(1, 4), 3, temperature=float("nan")), "temperature"),
    (lambda m: generate(m, ids(1, 4), 2.5), "max_new_tokens"),
    (lambda m: generate(m, [[1, 2]], 2), "input_ids"),
    (lambda m: lm.record("no_such_checkpoint"), "no checkpoint record"),
    (lambda m: TinyGPT(GPTConfig(65, 16, 1, 0, 8)), "n_head"),
    (lambda m: TinyGPT(GPTConfig(0, 16, 1, 1, 8)), "vocab_size"),
    (lambda m: TinyGPT(GPTConfig(65, 16, 1, 1, 8, dropout=float("nan"))), "dropout"),
    (lambda m: m.empty_cache(0), "batch_size"),
    (lambda m: filled_cache(m).crop(0.5), "length must be an int"),
    (lambda m: m.empty_cache(1).advance(65), "num_tokens"),
    (lambda m: m.empty_cache(1).update(2, torch.zeros(1, 4, 1, 8), torch.zeros(1, 4, 1, 8)), "layer"),
    (lambda m: m.empty_cache(1).update(0, torch.zeros(1, 4, 1, 7), torch.zeros(1, 4, 1, 7)), "k and v"),
    (lambda m: m.empty_cache(1).update(0, torch.zeros(1, 4, 65, 8), torch.zeros(1, 4, 65, 8)), "new positions"),
    (lambda m: m.empty_cache(2).extract(0, -1, 1), "start"),
    (lambda m: causal_mask(5, 3), "T must be an int in \\[1, 3\\]"),
    (lambda m: causal_mask(2, 0), "S must be"),
    (lambda m: lm.attention(*torch.zeros(3, 1, 1, 2, 4), backend="flash"), "backend"),
    (lambda m: lm.attention(torch.zeros(1, 1, 3, 4), *torch.zeros(2, 1, 1, 2, 4)), "T <= S"),
    (lambda m: lm.attention(torch.zeros(1, 1, 2, 4), *torch.zeros(2, 1, 1, 2, 8)), "q must be"),
])
def test_bad_input_is_a_value_error(model, call, match):
    with pytest.raises(ValueError, match=match):
        call(model)


def test_cache_that_is_full_refuses_more_tokens(model):
    cache = model.empty_cache(1)
    model(ids(1, 64), cache=cache)
    with pytest.raises(ValueError, match="block_size"):
        model(ids(1, 1), cache=cache)


def filled_cache(m):
    cache = m.empty_cache(1)
    m(ids(1, 2), cache=cache)
    return cache


@pytest.mark.parametrize("call, match", [
    (lambda m: m([[1, 2]]), "input_ids must be an integer tensor"),
    (lambda m: m(ids(1, 2), cache=object()), "cache must come from empty_cache"),
    (lambda m: KVCache.stack([m.empty_cache(1), object()]), "KVCache objects"),
    (lambda m: lm.load(7), "name must be a str"),
])
def test_bad_input_types_are_a_type_error(model, call, match):
    with pytest.raises(TypeError, match=match):
        call(model)


def test_check_int_and_check_real_accept_what_they_should():
    import numpy as np
    assert lm.check_int("n", np.int64(3), 1, 3) == 3
    assert lm.check_real("x", 2, 0.0) == 2.0
    for bad in (True, 1.0, "1", 4):
        with pytest.raises(ValueError, match="n must be an int in \\[1, 3\\]"):
            lm.check_int("n", bad, 1, 3)
    for bad in (float("nan"), -1.0, "1", None):
        with pytest.raises(ValueError, match="x must be a real number"):
            lm.check_real("x", bad, 0.0)


def test_token_id_check_lets_an_empty_batch_through(model):
    assert model(torch.zeros(0, 3, dtype=torch.long)).shape == (0, 3, 65)
