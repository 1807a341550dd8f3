"""refimpl.hf: a Hugging Face causal LM behind the workbench interface.

Oracles: the HF model's own logits (``hf_model(ids).logits``) and recomputation
from scratch without a cache. Models are GPT-2 and Llama from tiny configs with
random weights (nothing is downloaded), under both eager and sdpa attention.
"""
import pytest
import torch

from refimpl.hf import HFCache, HFCausalLM
from refimpl.lm import additive_mask
from tiny_hf import tiny_hf

V, BLOCK, ATOL = 50, 64, 1e-5


def build(arch, impl="sdpa", seed=0):
    return tiny_hf(arch, vocab=V, positions=BLOCK, seed=seed, attn_implementation=impl)


MODELS = [("gpt2", "sdpa"), ("gpt2", "eager"), ("llama", "sdpa"), ("llama", "eager")]


@pytest.fixture(params=MODELS, ids=lambda p: f"{p[0]}-{p[1]}")
def pair(request):
    hf = build(*request.param)
    return hf, HFCausalLM(hf)


def ids(*shape, seed=1):
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


def recompute(hf, x):
    with torch.no_grad():
        return hf(x).logits


def block_causal(lengths):
    """Additive [1, 1, L, L] mask: causal inside each segment, nothing across."""
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    allowed = (seg[:, None] == seg[None, :]) & torch.ones(len(seg), len(seg), dtype=torch.bool).tril()
    return additive_mask(allowed)[None, None]


@torch.no_grad()
def test_config(pair):
    hf, model = pair
    assert (model.config.vocab_size, model.config.block_size, model.config.n_layer) == (V, BLOCK, 2)
    assert model.empty_cache(3).batch_size == 3 and len(model.empty_cache(3)) == 0


@torch.no_grad()
def test_logits_match_hf_without_and_with_cache(pair):
    hf, model = pair
    x = ids(2, 12)
    full = recompute(hf, x)
    torch.testing.assert_close(model(x), full, atol=ATOL, rtol=0)
    cache = model.empty_cache(2)
    steps = [model(x[:, :5], cache=cache)]
    for t in range(5, 12):
        steps.append(model(x[:, t:t + 1], cache=cache))
        assert len(cache) == t + 1
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)
    last = model(x, cache=model.empty_cache(2), last_only=True)  # HF's logits_to_keep=1
    assert last.shape == (2, 1, V)
    torch.testing.assert_close(last, full[:, -1:], atol=ATOL, rtol=0)


@torch.no_grad()
def test_crop_then_decode_other_tokens(pair):
    hf, model = pair
    prompt, first, second = ids(2, 6, seed=2), ids(2, 5, seed=3), ids(2, 4, seed=4)
    cache = model.empty_cache(2)
    model(prompt, cache=cache)
    for t in range(5):
        model(first[:, t:t + 1], cache=cache)
    cache.crop(len(cache) - 3)  # keep prompt + first[:, :2]
    assert len(cache) == 8
    kept = torch.cat([prompt, first[:, :2]], dim=1)
    got = torch.cat([model(second[:, t:t + 1], cache=cache) for t in range(4)], dim=1)
    want = recompute(hf, torch.cat([kept, second], dim=1))[:, 8:]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@torch.no_grad()
def test_reorder_repeats_rows_and_changes_batch(pair):
    hf, model = pair
    x, index = ids(3, 7, seed=5), torch.tensor([2, 0, 0, 1])
    cache = model.empty_cache(3)
    model(x, cache=cache)
    cache.reorder(index)
    assert cache.batch_size == 4 and len(cache) == 7
    new = ids(4, 3, seed=6)
    got = torch.cat([model(new[:, t:t + 1], cache=cache) for t in range(3)], dim=1)
    want = recompute(hf, torch.cat([x[index], new], dim=1))[:, 7:]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@torch.no_grad()
def test_reorder_empty_cache_sets_batch(pair):
    _, model = pair
    cache = model.empty_cache(2)
    cache.reorder(torch.tensor([0, 0, 1]))
    x = ids(3, 4, seed=7)
    torch.testing.assert_close(model(x, cache=cache), model(x), atol=ATOL, rtol=0)
    cache.crop(0)
    cache.reorder([1])  # zero-length tensors keep their old batch in DynamicCache
    torch.testing.assert_close(model(x[1:2], cache=cache), model(x[1:2]), atol=ATOL, rtol=0)


@torch.no_grad()
def test_packed_segments_and_extract(pair):
    hf, model = pair
    seg1, seg2, cont = ids(1, 5, seed=8), ids(1, 7, seed=9), ids(1, 3, seed=10)
    packed = torch.cat([seg1, seg2], dim=1)
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None]
    cache = model.empty_cache(1)
    out = model(packed, position_ids=pos, attn_mask=block_causal([5, 7]), cache=cache)
    torch.testing.assert_close(out[:, :5], recompute(hf, seg1), atol=ATOL, rtol=0)
    torch.testing.assert_close(out[:, 5:], recompute(hf, seg2), atol=ATOL, rtol=0)
    alone = model.empty_cache(1)
    model(seg2, cache=alone)
    piece = cache.extract(row=0, start=5, length=7)
    assert len(piece) == 7 and piece.batch_size == 1
    for t in range(3):
        step = cont[:, t:t + 1]
        torch.testing.assert_close(model(step, cache=piece), model(step, cache=alone), atol=ATOL, rtol=0)
    torch.testing.assert_close(
        piece.extract(0, 0, 10).dynamic.layers[1].keys, alone.dynamic.layers[1].keys, atol=ATOL, rtol=0)


@torch.no_grad()
def test_restarting_positions_without_mask_stay_causal(pair):
    """Workbench semantics: positions alone do not separate segments (HF's packed-sequence
    detection must not kick in); the oracle is HF with an explicit full causal mask."""
    hf, model = pair
    x = ids(1, 10, seed=11)
    pos = torch.cat([torch.arange(4), torch.arange(6)])[None]
    causal = additive_mask(torch.ones(10, 10, dtype=torch.bool).tril())[None, None]
    want = hf(x, position_ids=pos, attention_mask=causal).logits
    torch.testing.assert_close(model(x, position_ids=pos), want, atol=ATOL, rtol=0)
    packed = hf(x, position_ids=pos, use_cache=False).logits  # HF without a cache: segments apart
    assert (packed - want).abs().max() > 1e-4


@torch.no_grad()
def test_split_stack_round_trip(pair):
    _, model = pair
    x, nxt = ids(3, 6, seed=12), ids(3, 1, seed=13)
    cache = model.empty_cache(3)
    model(x, cache=cache)
    parts = cache.split()
    assert [(p.batch_size, len(p)) for p in parts] == [(1, 6)] * 3
    again = HFCache.stack(parts)
    assert (again.batch_size, len(again)) == (3, 6)
    want = model(nxt, cache=cache)
    torch.testing.assert_close(model(nxt, cache=again), want, atol=ATOL, rtol=0)
    torch.testing.assert_close(model(nxt[1:2], cache=parts[1]), want[1:2], atol=ATOL, rtol=0)


@torch.no_grad()
def test_non_causal_mask_applied_as_given():
    """A prefix-LM mask (first 4 tokens see each other) through sdpa equals GPT-2 eager with
    its causal buffer opened up; GPT-2 eager through the adapter refuses the mask."""
    x = ids(1, 8, seed=14)
    allowed = torch.ones(8, 8, dtype=torch.bool).tril()
    allowed[:4, :4] = True
    mask = additive_mask(allowed)[None, None]
    sdpa, eager = HFCausalLM(build("gpt2", "sdpa")), build("gpt2", "eager")
    for block in eager.transformer.h:
        block.attn.bias.fill_(True)
    torch.testing.assert_close(sdpa(x, attn_mask=mask), eager(x, attention_mask=mask).logits,
                               atol=ATOL, rtol=0)
    assert (sdpa(x, attn_mask=mask) - sdpa(x)).abs().max() > 1e-4  # the mask did something
    with pytest.raises(ValueError, match="attn_mask"):
        HFCausalLM(build("gpt2", "eager"))(x, attn_mask=mask)
    llama_sdpa, llama_eager = HFCausalLM(build("llama", "sdpa")), HFCausalLM(build("llama", "eager"))
    torch.testing.assert_close(llama_sdpa(x, attn_mask=mask), llama_eager(x, attn_mask=mask),
                               atol=ATOL, rtol=0)


@torch.no_grad()
def test_fp32_mask_on_bf16_model_with_padding_row():
    """A fully masked padding query: fp32's minimum turns into -inf in bf16, which would make
    eager softmax NaN and spread through the next layer's values; the adapter clamps."""
    hf = build("llama", "eager").to(torch.bfloat16)
    model = HFCausalLM(hf)
    x = ids(1, 6, seed=15)
    padded = torch.cat([torch.zeros(1, 1, dtype=torch.long), x], dim=1)
    allowed = torch.ones(7, 7, dtype=torch.bool).tril()
    allowed[:, 0] = False  # nobody looks at the pad, the pad looks at nothing
    out = model(padded, position_ids=torch.arange(-1, 6).clamp_min(0), attn_mask=additive_mask(allowed)[None, None])
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 1:].float(), hf(x).logits.float(), atol=2e-2, rtol=0)


@torch.no_grad()
def test_bad_input_raises(pair):
    _, model = pair
    x = ids(2, 4)
    cache = model.empty_cache(2)
    model(x, cache=cache)
    bad = [
        dict(input_ids=x.float()),
        dict(input_ids=x[0]),
        dict(input_ids=x[:, :0]),
        dict(input_ids=ids(2, BLOCK + 1)),
        dict(input_ids=ids(2, BLOCK - 3), cache=cache),  # 4 cached + 61 new > 64
        dict(input_ids=x[:1], cache=cache),
        dict(input_ids=x, position_ids=torch.arange(5)),
        dict(input_ids=x, position_ids=torch.full((2, 4), BLOCK)),
        dict(input_ids=x, position_ids=torch.arange(-1, 3)),
        dict(input_ids=x, attn_mask=torch.zeros(2, 1, 4, 5)),
        dict(input_ids=x, attn_mask=torch.zeros(2, 4, 4)),
        dict(input_ids=x, attn_mask=torch.zeros(3, 1, 4, 4)),
        dict(input_ids=x, attn_mask=torch.zeros(2, 1, 4, 4), cache=cache),  # S = 8
        dict(input_ids=x, attn_mask=torch.ones(1, 1, 4, 4, dtype=torch.bool)),
    ]
    for kwargs in bad:
        with pytest.raises(ValueError):
            model(**kwargs)
    assert len(cache) == 4  # nothing was written by the refused calls
    for call in (lambda: cache.crop(5), lambda: cache.crop(-1), lambda: cache.reorder([0, 2]),
                 lambda: cache.reorder(torch.tensor([[0]])), lambda: cache.extract(2, 0, 1),
                 lambda: cache.extract(0, 2, 3), lambda: HFCache.stack([]),
                 lambda: HFCache.stack([cache, model.empty_cache(1)]), lambda: model.empty_cache(0)):
        with pytest.raises(ValueError):
            call()
    with pytest.raises(TypeError):
        model(x, cache=object())


@torch.no_grad()
def test_bad_token_ids_and_sizes_name_the_argument(pair):
    _, model = pair
    for bad in (torch.tensor([[-1, 2]]), torch.tensor([[2, V]])):
        with pytest.raises(ValueError, match=f"input_ids must hold token ids in \\[0, vocab_size={V}\\)"):
            model(bad)
    cache = model.empty_cache(1)
    model(ids(1, 3), cache=cache)
    for call, match in ((lambda: HFCache(1.5), "batch_size"), (lambda: cache.crop(1.5), "length"),
                        (lambda: cache.extract(0, -1, 1), "start"), (lambda: cache.extract(0, 0, -1), "length must be")):
        with pytest.raises(ValueError, match=match):
            call()
    with pytest.raises(TypeError, match="hf_model"):
        HFCausalLM(object())
