"""Beam search and diverse beam search against HF transformers 4.56.2, a brute force and
properties from Vijayakumar et al. 2016."""
import itertools
from collections import Counter

import pytest
import torch
import transformers

from refimpl.hf import PLAIN_HEAD_FAMILIES, HFCausalLM
from refimpl.lm import GPTConfig, TinyGPT, additive_mask
from refimpl.search import (BeamOutput, SharedPrefixStepper, Stepper, beam_search, blockwise_topk,
                            branch_rows,
                            distinct_n, edit_distance, fused_partial_attention, greedy_search,
                            group_candidates,
                            mean_logprob_per_token, mean_pairwise_edit_distance, partial_attention,
                            sample_continuations, sequence_logprobs, share_prefix, shared_prefix_attention,
                            strip_generated)
from tiny_hf import FAMILIES, bias_token, tiny_hf

transformers.logging.set_verbosity_error()
V, EOS, PAD, MAX_NEW = 40, 3, 5, 8


def hf_model(kind, seed=0, eos_bias=1.5):
    """A small random HF causal LM whose lm head favours EOS, so hypotheses do finish."""
    extra = {"bos_token_id": 0, "eos_token_id": EOS} if kind == "gpt2" else {}
    return bias_token(tiny_hf(kind, vocab=V, seed=seed, **extra), EOS, eos_bias)


def prompts():
    """Batch 2 with left padding: row 1 has two padding positions."""
    ids = torch.randint(6, V, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = PAD, 0
    return ids, mask


def hf_generate(model, ids, mask, **kw):
    return model.generate(ids, attention_mask=mask, do_sample=False, return_dict_in_generate=True,
                          output_scores=True, **kw)


def hf_greedy_scores(out, prompt_len, length_penalty):
    """Score of HF's greedy sequences from HF's own per-step logits (output_scores)."""
    logp = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], 1)
    gen = out.sequences[:, prompt_len:]
    tok_logp = logp.gather(2, gen[..., None])[..., 0]
    ends = (gen == EOS).long()
    keep = ends.cumsum(1) - ends == 0
    return (tok_logp * keep).sum(1) / keep.sum(1).float() ** length_penalty


GROUPS = [(1, 1, 0.0), (2, 1, 0.0), (2, 2, 0.5), (3, 1, 0.0), (3, 3, 2.0), (4, 1, 0.0), (4, 2, 1.0),
          (4, 4, 0.3)]


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("num_beams,num_beam_groups,diversity_penalty", GROUPS)
def test_equals_hf_generate(kind, num_beams, num_beam_groups, diversity_penalty):
    # Exact token equality is the point (HF is the reference), though our scores differ from HF's by
    # up to ~2.4e-7 (we encode each prompt once, HF once per beam). Measured margins: the closest
    # competing candidates here are >= 1.9e-4 apart, about 800x that difference, on any CPU.
    model = hf_model(kind)
    ours_model = HFCausalLM(model)
    ids, mask = prompts()
    stopped_early = 0
    for lp, es in itertools.product((-0.5, 0.0, 1.0, 2.0), (True, False, "never")):
        kw = dict(num_beams=num_beams, num_beam_groups=num_beam_groups, diversity_penalty=diversity_penalty,
                  length_penalty=lp, early_stopping=es, max_new_tokens=MAX_NEW, eos_token_id=EOS,
                  pad_token_id=PAD, num_return_sequences=min(num_beams, 2 + (lp > 0)))
        ref = hf_generate(model, ids, mask, **kw)
        ours = beam_search(ours_model, ids, attention_mask=mask, **kw)
        assert torch.equal(ours.sequences, ref.sequences), kw
        if num_beams == 1:  # HF runs greedy search and returns no sequences_scores
            torch.testing.assert_close(ours.sequences_scores, hf_greedy_scores(ref, 6, lp), atol=1e-4, rtol=0)
        else:
            torch.testing.assert_close(ours.sequences_scores, ref.sequences_scores, atol=1e-4, rtol=0)
        generated = ours.sequences[:, 6:]
        assert (generated == EOS).any(1).all(), f"a returned hypothesis never finished: {kw}"
        stopped_early += ours.sequences.shape[1] < 6 + MAX_NEW
    assert stopped_early > 0, "no setting stopped before max_new_tokens: the grid proves little"


def test_equals_hf_generate_random_settings():
    """Random settings, small vocabularies included (junk beams, EOS ranked past B, many finishes)."""
    rng = torch.Generator().manual_seed(0)
    pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=rng))]
    finished_early = 0
    for case in range(60):
        vocab = pick([6, 40])
        model = tiny_hf("gpt2", vocab=vocab, layers=1, seed=case)
        with torch.no_grad():
            model.lm_head.bias = torch.nn.Parameter(torch.zeros(vocab))
            model.lm_head.bias[3] = pick([0.5, 1.5, 2.5])
        N, P = pick([1, 2, 3]), pick([1, 4])
        ids = torch.randint(0, vocab, (N, P), generator=rng)
        mask = torch.ones_like(ids)
        if N > 1 and P > 1:
            mask[1, :2] = 0
        B = pick([2, 3, 4, 6])
        G = pick([g for g in (1, 2, 3) if B % g == 0])
        kw = dict(num_beams=B, num_beam_groups=G, diversity_penalty=pick([0.3, 1.0, 5.0]) if G > 1 else 0.0,
                  length_penalty=pick([-0.5, 0.0, 1.0, 2.0]), early_stopping=pick([True, False, "never"]),
                  num_return_sequences=pick(list(range(1, B + 1))), max_new_tokens=pick([1, 3, 9]),
                  eos_token_id=3, pad_token_id=pick([None, 0, 5]))
        ref = hf_generate(model, ids, mask, **kw)
        ours = beam_search(HFCausalLM(model), ids, attention_mask=mask, **kw)
        assert torch.equal(ours.sequences, ref.sequences), (case, kw)
        torch.testing.assert_close(ours.sequences_scores, ref.sequences_scores, atol=1e-4, rtol=0)
        finished_early += ours.sequences.shape[1] < P + kw["max_new_tokens"]
    assert finished_early >= 10


@pytest.mark.parametrize("pad_token_id", [None, 0])
@pytest.mark.parametrize("num_beam_groups", [1, 2])
def test_padding_filler_matches_hf(pad_token_id, num_beam_groups):
    """HF fills with `pad or eos` in plain beam search (pad 0 becomes EOS) and with pad in group search."""
    model = hf_model("gpt2", seed=3, eos_bias=2.5)
    ids, mask = prompts()
    kw = dict(num_beams=4, num_beam_groups=num_beam_groups, diversity_penalty=0.5 * (num_beam_groups > 1),
              max_new_tokens=MAX_NEW, eos_token_id=EOS, pad_token_id=pad_token_id, num_return_sequences=4)
    ref = hf_generate(model, ids, mask, **kw)
    ours = beam_search(HFCausalLM(model), ids, attention_mask=mask, **kw)
    assert torch.equal(ours.sequences, ref.sequences)
    torch.testing.assert_close(ours.sequences_scores, ref.sequences_scores, atol=1e-4, rtol=0)
    ends = (ours.sequences[:, 6:] == EOS).long()
    assert ((ends.cumsum(1) - ends) > 0).any(), "no hypothesis has a filler after EOS"


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_greedy_equals_hf(kind):
    model = hf_model(kind, eos_bias=2.0)
    ids, mask = prompts()
    for pad in (None, PAD):
        ref = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=MAX_NEW,
                             eos_token_id=EOS, pad_token_id=pad)
        ours = greedy_search(HFCausalLM(model), ids, attention_mask=mask, max_new_tokens=MAX_NEW,
                             eos_token_id=EOS, pad_token_id=pad)
        assert torch.equal(ours, ref)
    assert (ours[:, 6:] == EOS).any()


def tiny_gpt(vocab, seed=0, n_embd=16):
    torch.manual_seed(seed)
    model = TinyGPT(GPTConfig(vocab_size=vocab, block_size=32, n_layer=2, n_head=2, n_embd=n_embd)).eval()
    with torch.no_grad():  # random weights of std 0.02 give nearly uniform, tie-prone distributions
        for p in model.parameters():
            p.mul_(30.0 if p.ndim > 1 else 1.0)
    return model


@pytest.mark.parametrize("vocab,length", [(3, 4), (4, 3), (3, 5)])
@pytest.mark.parametrize("length_penalty", [-0.5, 0.0, 1.0, 2.0])
def test_brute_force_best_sequence(vocab, length, length_penalty):
    """A beam as wide as the number of sequences finds the exact best hypothesis."""
    model, eos = tiny_gpt(vocab, seed=vocab + length), 1
    prompt = torch.tensor([[0, 2]])
    every = torch.tensor(list(itertools.product(range(vocab), repeat=length)))
    seqs = torch.cat([prompt.expand(len(every), -1), every], 1)
    with torch.no_grad():
        logp = torch.log_softmax(model(seqs).float(), -1)[:, 1:-1].gather(2, seqs[:, 2:, None])[..., 0]
    best = {}
    for row, lp_row in zip(every.tolist(), logp):
        end = row.index(eos) + 1 if eos in row else length  # a hypothesis stops at its first EOS
        best[tuple(row[:end])] = float(lp_row[:end].sum()) / end ** length_penalty
    want_seq, want_score = max(best.items(), key=lambda kv: kv[1])
    out = beam_search(model, prompt, num_beams=vocab ** length, max_new_tokens=length, eos_token_id=eos,
                      early_stopping="never", length_penalty=length_penalty)
    got = strip_generated(out.sequences, 2, eos)[0]
    assert tuple(got) == want_seq
    assert abs(float(out.sequences_scores[0]) - want_score) < 1e-5


def test_tiny_penalty_groups_are_independent_beams():
    """Diversity penalty -> 0: each of the G groups is a plain beam search of width B/G."""
    model, prompt = tiny_gpt(12, seed=1), torch.tensor([[4, 7, 2]])
    for B, G in [(4, 2), (6, 3), (6, 2)]:
        plain = beam_search(model, prompt, num_beams=B // G, max_new_tokens=6, num_return_sequences=B // G)
        diverse = beam_search(model, prompt, num_beams=B, num_beam_groups=G, diversity_penalty=1e-6,
                              max_new_tokens=6, num_return_sequences=B)
        want = Counter(tuple(s) for s in plain.sequences.tolist() for _ in range(G))
        assert Counter(tuple(s) for s in diverse.sequences.tolist()) == want
        torch.testing.assert_close(diverse.sequences_scores, plain.sequences_scores.repeat_interleave(G),
                                   atol=1e-4, rtol=0)


def test_large_penalty_groups_start_differently():
    model, prompt = tiny_gpt(12, seed=2), torch.tensor([[4, 7, 2], [1, 1, 9]])
    out = beam_search(model, prompt, num_beams=6, num_beam_groups=6, diversity_penalty=100.0,
                      max_new_tokens=5, num_return_sequences=6)
    first = out.sequences[:, 3].view(2, 6)
    assert all(len(set(row.tolist())) == 6 for row in first)
    plain = beam_search(model, prompt, num_beams=6, max_new_tokens=5, num_return_sequences=6)
    assert any(len(set(row.tolist())) < 6 for row in plain.sequences[:, 3].view(2, 6))  # not free


def test_scores_sorted_and_return_prefix():
    model, prompt = tiny_gpt(12, seed=3), torch.tensor([[4, 7, 2]])
    for G, dp in [(1, 0.0), (2, 0.8)]:
        full = beam_search(model, prompt, num_beams=4, num_beam_groups=G, diversity_penalty=dp,
                           max_new_tokens=6, eos_token_id=1, num_return_sequences=4)
        assert (full.sequences_scores.diff() <= 0).all()
        two = beam_search(model, prompt, num_beams=4, num_beam_groups=G, diversity_penalty=dp,
                          max_new_tokens=6, eos_token_id=1, num_return_sequences=2)
        assert torch.equal(two.sequences, full.sequences[:2, :two.sequences.shape[1]])


def test_left_padding_equals_unpadded_prompt():
    """A left-padded prompt decodes exactly as the same prompt alone (positions and mask as HF)."""
    model = tiny_gpt(12, seed=4)
    short, long_ = torch.tensor([[4, 7, 2]]), torch.tensor([[9, 8, 4, 7, 2]])
    ids = torch.cat([torch.cat([torch.tensor([[0, 0]]), short], 1), long_])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    for G, dp in [(1, 0.0), (2, 0.7)]:
        kw = dict(num_beams=4, num_beam_groups=G, diversity_penalty=dp, max_new_tokens=6, eos_token_id=1,
                  pad_token_id=0, num_return_sequences=2)
        batch = beam_search(model, ids, attention_mask=mask, **kw)
        alone = beam_search(model, short, **kw)
        width = alone.sequences.shape[1] - 3
        assert torch.equal(batch.sequences[:2, 2:2 + 3 + width], alone.sequences)
        torch.testing.assert_close(batch.sequences_scores[:2], alone.sequences_scores, atol=1e-5, rtol=0)
    greedy = greedy_search(model, ids, attention_mask=mask, max_new_tokens=6)
    assert torch.equal(greedy[0, 2:], greedy_search(model, short, max_new_tokens=6)[0])


class CountingModel(torch.nn.Module):
    """Records how many tokens each forward pass receives."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.fed = model, model.config, []

    def empty_cache(self, batch_size):
        return self.model.empty_cache(batch_size)

    def forward(self, input_ids, position_ids=None, attn_mask=None, cache=None, last_only=False):
        self.fed.append(tuple(input_ids.shape))
        return self.model(input_ids, position_ids, attn_mask, cache, last_only)


def test_uses_kv_cache_never_recomputes_prefix():
    model = CountingModel(tiny_gpt(12, seed=5))
    prompt = torch.tensor([[4, 7, 2, 3], [1, 2, 3, 4]])
    beam_search(model, prompt, num_beams=4, num_beam_groups=2, diversity_penalty=0.5, max_new_tokens=5)
    assert model.fed == [(2, 4)] + [(8, 1)] * 4  # prompt once per prompt, then one token per beam


def test_metrics():
    assert edit_distance("kitten", "sitting") == 3 and edit_distance([], [1, 2]) == 2
    hyps = [[1, 2, 3], [1, 2, 4], [5, 6, 7]]
    assert distinct_n(hyps, 1) == 7 / 9 and distinct_n(hyps, 2) == 5 / 6 and distinct_n(hyps, 4) == 0.0
    assert mean_pairwise_edit_distance(hyps) == (1 + 3 + 3) / 3
    model = tiny_gpt(12, seed=6)
    seqs = torch.tensor([[4, 7, 2, 9, 1, 0], [4, 7, 2, 5, 6, 8]])
    got = mean_logprob_per_token(model, seqs, 3, eos_token_id=1)
    with torch.no_grad():  # one uncached forward per prefix
        lp = [[float(torch.log_softmax(model(s[None, :i]).float()[0, -1], -1)[s[i]]) for i in range(3, 6)]
              for s in seqs]
    want = torch.tensor([sum(lp[0][:2]) / 2, sum(lp[1]) / 3])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kwargs,name", [
    (dict(num_beams=0), "num_beams"),
    (dict(num_beams=4, num_beam_groups=3), "num_beam_groups"),
    (dict(num_beams=4, num_beam_groups=2, diversity_penalty=-1.0), "diversity_penalty"),
    (dict(num_beams=4, diversity_penalty=0.5), "diversity_penalty"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(num_beams=2, max_new_tokens=0), "max_new_tokens"),
    (dict(num_beams=2, max_new_tokens=40), "max_new_tokens"),
    (dict(num_beams=2, eos_token_id=12), "eos_token_id"),
    (dict(num_beams=2, pad_token_id=-1), "pad_token_id"),
    (dict(num_beams=2, early_stopping="always"), "early_stopping"),
])
def test_bad_input(kwargs, name):
    model = tiny_gpt(12)
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=name):
        beam_search(model, torch.tensor([[1, 2, 3]]), **kwargs)


def test_bad_prompts():
    model = tiny_gpt(12)
    ragged = torch.tensor([[0, 1, 2], [3, 4, 5]])
    with pytest.raises(ValueError, match="attention_mask"):  # right padding is not left padding
        beam_search(model, ragged, num_beams=2, max_new_tokens=3, attention_mask=torch.tensor([[1, 1, 0],
                                                                                                [1, 1, 1]]))
    with pytest.raises(ValueError, match="attention_mask"):
        greedy_search(model, ragged, max_new_tokens=3, attention_mask=torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids"):
        greedy_search(model, torch.tensor([[1, 12]]), max_new_tokens=3)
    with pytest.raises(ValueError, match="input_ids"):
        beam_search(model, [[1, 2]], num_beams=2, max_new_tokens=3)
    with pytest.raises(ValueError, match="different lengths"):
        beam_search(model, [[1, 2], [3]], num_beams=2, max_new_tokens=3)
    with pytest.raises(ValueError, match="attention_mask"):  # padded but no mask
        beam_search(model, torch.tensor([[0, 0, 2], [3, 4, 5]]), num_beams=2, max_new_tokens=3, pad_token_id=0)
    with pytest.raises(ValueError, match="n must be"):
        distinct_n([[1]], 0)
    assert isinstance(beam_search(model, ragged, num_beams=2, max_new_tokens=2), BeamOutput)


@pytest.mark.parametrize("args, match", [
    ((torch.randn(1, 2, 5), torch.zeros(1, 2), None, 0.0, 11), "k must be an int in \\[1, 10\\]"),
    ((torch.randn(1, 2, 5), torch.zeros(1, 2), None, 0.0, 0), "k must be"),
    ((torch.randn(1, 2, 5), torch.zeros(2, 1), None, 0.0, 2), "running must be \\[N, Bg\\]"),
    ((torch.randn(1, 2, 5), torch.zeros(1, 2), torch.zeros(1, 4), 1.0, 2), "counts must be"),
    ((torch.randn(1, 2, 5), torch.zeros(1, 2), torch.zeros(1, 5), float("nan"), 2), "diversity_penalty"),
    ((torch.randn(1, 2, 5), torch.zeros(1, 2), torch.zeros(1, 5), -1.0, 2), "diversity_penalty"),
    ((torch.randn(2, 5), torch.zeros(2), None, 0.0, 2), "logits must be a float tensor \\[N, Bg, V\\]"),
    ((torch.randn(1, 2, 5), torch.zeros(1, 2), None, 0.0, 2, torch.zeros(2, 1, dtype=torch.long)),
     "rows must be None or an integer tensor \\[N, Bg\\] = \\[1, 2\\]"),
    ((torch.randn(1, 2, 5), torch.zeros(1, 2), None, 0.0, 2, torch.zeros(1, 2)), "rows must be"),
])
def test_group_candidates_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        group_candidates(*args)


def test_prompt_len_and_mask_are_checked():
    model, seqs = tiny_gpt(12), torch.tensor([[1, 2, 3, 4, 5]])
    for prompt_len in (0, 5, 2.0):  # sequence_logprobs needs at least one generated token
        with pytest.raises(ValueError, match="prompt_len must be an int in \\[1, 4\\]"):
            sequence_logprobs(model, seqs, prompt_len)
        with pytest.raises(ValueError, match="prompt_len"):
            mean_logprob_per_token(model, seqs, prompt_len)
    with pytest.raises(ValueError, match="attention_mask"):
        sequence_logprobs(model, seqs, 2, torch.ones(1, 3))
    with pytest.raises(ValueError, match="sequences must be"):
        sequence_logprobs(model, seqs[0], 2)
    for prompt_len in (-1, 0, 6):
        with pytest.raises(ValueError, match="prompt_len must be an int in \\[1, 5\\]"):
            strip_generated(seqs, prompt_len)
    assert strip_generated(seqs, 5) == [[]]


# ---- stage 9: the shared-prefix cache ----

def test_shared_prefix_attention_equals_attention_over_all_keys():
    # 3 prompts x 4 beams, 2 query heads per key head (GQA), 2 new queries per beam, and left
    # padding on prompt 1; the oracle is torch's attention over each beam's full key sequence
    g = torch.Generator().manual_seed(0)
    N, B, Hkv, G, P, S, T, D = 3, 4, 2, 2, 11, 5, 2, 8
    q = torch.randn(N * B, Hkv * G, T, D, generator=g)
    pk, pv = torch.randn(2, N, Hkv, P, D, generator=g)
    sk, sv = torch.randn(2, N * B, Hkv, S, D, generator=g)
    keep = torch.ones(N * B, 1, T, P + S, dtype=torch.bool)
    keep[B:2 * B, ..., :3] = False
    keep[..., P:] &= torch.ones(T, S, dtype=torch.bool).tril(S - T)
    full_k, full_v = (torch.cat([p.repeat_interleave(B, 0), s], 2).repeat_interleave(G, 1)
                      for p, s in ((pk, sk), (pv, sv)))
    for mask in (additive_mask(keep), None):
        ref = torch.nn.functional.scaled_dot_product_attention(
            q, full_k, full_v, attn_mask=mask, is_causal=False) if mask is not None else \
            torch.nn.functional.scaled_dot_product_attention(
                q, full_k, full_v, attn_mask=additive_mask(torch.ones(T, P + S, dtype=torch.bool)
                                                           .tril(P + S - T)))
        out = shared_prefix_attention(q, pk, pv, sk, sv, mask)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_partial_attention_lse_is_the_logsumexp_of_the_scores():
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 3, 4, 1, 8, generator=g), *torch.randn(2, 2, 3, 9, 8, generator=g)
    out, lse = partial_attention(q, k, v, scale=0.3)
    scores = torch.einsum("nhmtd,nhsd->nhmts", q, k) * 0.3
    torch.testing.assert_close(lse, scores.logsumexp(-1))
    torch.testing.assert_close(out, torch.einsum("nhmts,nhsd->nhmtd", scores.softmax(-1), v))


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_prefix_equals_hf_generate_on_every_family(family):
    extra = {"bos_token_id": 0, "eos_token_id": EOS} if family == "gpt2" else {}
    model = bias_token(tiny_hf(family, vocab=V, **extra), EOS, 1.5)
    ids, mask = prompts()
    for B, G, dp in ((4, 1, 0.0), (4, 2, 0.5)):
        kw = dict(num_beams=B, num_beam_groups=G, diversity_penalty=dp, max_new_tokens=MAX_NEW,
                  eos_token_id=EOS, pad_token_id=PAD, num_return_sequences=B)
        ref = hf_generate(model, ids, mask, **kw)
        for vocab_major in (False, True):
            ours = beam_search(HFCausalLM(model, vocab_major_head=vocab_major) if family in
                               PLAIN_HEAD_FAMILIES else HFCausalLM(model), ids, attention_mask=mask,
                               shared_prefix=True, **kw)
            assert torch.equal(ours.sequences, ref.sequences), (family, kw)
            torch.testing.assert_close(ours.sequences_scores, ref.sequences_scores, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("prompt_len", [512, 1024])
@pytest.mark.parametrize("num_beams,num_beam_groups,diversity_penalty", [(4, 1, 0.0), (8, 1, 0.0),
                                                                         (8, 4, 0.5)])
def test_long_prompts_equal_hf_generate(kind, prompt_len, num_beams, num_beam_groups,
                                        diversity_penalty):
    extra = {"bos_token_id": 0, "eos_token_id": EOS} if kind == "gpt2" else {}
    model = bias_token(tiny_hf(kind, vocab=V, positions=prompt_len + MAX_NEW, **extra), EOS, 0.5)
    ids = torch.randint(6, V, (2, prompt_len), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    ids[1, :100], mask[1, :100] = PAD, 0
    kw = dict(num_beams=num_beams, num_beam_groups=num_beam_groups,
              diversity_penalty=diversity_penalty, max_new_tokens=MAX_NEW, eos_token_id=EOS,
              pad_token_id=PAD, num_return_sequences=num_beams)
    ref = hf_generate(model, ids, mask, **kw)
    for shared_prefix in (True, False):
        ours = beam_search(HFCausalLM(model), ids, attention_mask=mask, shared_prefix=shared_prefix,
                           **kw)
        assert torch.equal(ours.sequences, ref.sequences), (shared_prefix, kw)
        torch.testing.assert_close(ours.sequences_scores, ref.sequences_scores, atol=1e-4, rtol=0)


@pytest.mark.parametrize("num_beams,num_beam_groups,diversity_penalty", [(4, 1, 0.0), (8, 1, 0.0),
                                                                         (8, 4, 0.5)])
def test_equals_hf_generate_at_gpt2_vocabulary(num_beams, num_beam_groups, diversity_penalty):
    """At 50257 tokens each beam's top 2 Bg is taken block-wise (``blockwise_topk``)."""
    vocab, eos = 50257, 50256
    model = bias_token(tiny_hf("gpt2", vocab=vocab, eos_token_id=eos), eos, 2.0)
    ids = torch.randint(0, eos, (2, 6), generator=torch.Generator().manual_seed(4))
    kw = dict(num_beams=num_beams, num_beam_groups=num_beam_groups, max_new_tokens=MAX_NEW,
              diversity_penalty=diversity_penalty, eos_token_id=eos, pad_token_id=eos,
              num_return_sequences=num_beams)
    ref = hf_generate(model, ids, torch.ones_like(ids), **kw)
    ours = beam_search(HFCausalLM(model), ids, **kw)
    assert (ours.sequences == eos).any(), "no hypothesis finished: the test would miss EOS handling"
    assert torch.equal(ours.sequences, ref.sequences)
    torch.testing.assert_close(ours.sequences_scores, ref.sequences_scores, atol=1e-4, rtol=0)


@pytest.mark.parametrize("V,k", [(50257, 8), (40000, 16), (256 * 128, 8), (8192, 4), (300, 4)])
def test_blockwise_topk_equals_topk(V, k):
    g = torch.Generator().manual_seed(V)
    x = torch.randn(3, 5, V, generator=g)
    x[0, 0, -1] = 9.0  # a row whose best entry is in the columns after the last whole block
    x[1, 2, :k] = 9.0 + torch.arange(k)  # a row whose k best share one block
    values, columns = blockwise_topk(x, k)
    want = x.topk(k)
    assert torch.equal(values, want.values) and torch.equal(columns, want.indices)


def workbench_model(seed=0):
    """A random workbench model, its logits sharpened 6x so that its next-token laws are far
    from uniform."""
    torch.manual_seed(seed)
    model = TinyGPT(GPTConfig(vocab_size=V, block_size=64, n_layer=2, n_head=4, n_embd=32)).eval()
    with torch.no_grad():
        model.ln_f.weight *= 6
    return model


def test_shared_prefix_cache_stores_the_prompt_once_and_moves_only_suffixes():
    model, (ids, mask) = workbench_model(), prompts()
    plain, shared = Stepper(model, ids, mask, 10), SharedPrefixStepper(model, ids, mask, 10)
    torch.testing.assert_close(shared.prompt(4), plain.prompt(4))
    rows = torch.tensor([1, 1, 0, 3, 6, 4, 4, 5])  # beams move within their prompt
    for step in range(3):
        tokens = torch.arange(8) + step
        logits = shared.step(tokens, rows)  # of the cache's rows: beam b's in beam_rows[b]
        torch.testing.assert_close(logits[shared.beam_rows], plain.step(tokens, rows),
                                   atol=1e-5, rtol=1e-5)
    cache = shared.cache
    assert cache.prefix[0][0].shape[0] == 2 and cache.batch_size == 8 and len(cache) == 6 + 3
    prompt_bytes = sum(k.nbytes + v.nbytes for k, v in cache.prefix)
    plain_prompt_bytes = sum(k[:, :, :6].nbytes + v[:, :, :6].nbytes for k, v in plain.cache.kv())
    assert prompt_bytes * 4 == plain_prompt_bytes
    before = cache.suffix.k[:, :, :, :3].clone()
    beams_before = before[:, cache.rows]
    cache.reorder(rows)
    assert all(r // 4 == b // 4 for b, r in enumerate(cache.rows))  # rows of its own prompt
    assert torch.equal(cache.suffix.k[:, cache.rows, :, :3], beams_before[:, rows])
    # copy on branch: rows 1 and 4 have two children each, so two rows are copied, none else
    changed = (cache.suffix.k[:, :, :, :3] != before).flatten(2).any(2).any(0)
    assert changed.sum() == 2
    with pytest.raises(ValueError, match="each a beam of its own prompt"):
        cache.reorder(torch.tensor([4, 1, 2, 3, 4, 5, 6, 7]))  # row 0 takes a beam of prompt 1
    with pytest.raises(ValueError, match="index must hold 8 rows"):
        cache.reorder(torch.arange(4))
    with pytest.raises(ValueError, match="cache holds 8 rows but input_ids has 4"):
        model(torch.zeros(4, 1, dtype=torch.long), cache=cache)  # another batch layout
    with pytest.raises(ValueError, match="length must be an int in"):
        cache.crop(5)  # into the shared prompt
    with pytest.raises(ValueError, match="must hold the encoded prompts"):
        share_prefix(model.empty_cache(2), 4, 10)
    with pytest.raises(ValueError, match="beams must be an int"):
        share_prefix(plain.cache, 0, 10)


def test_branch_rows_copies_once_per_further_child():
    """Brute force over random reorders: every beam ends in a row of its own prompt holding its
    parent's suffix, the rows stay a permutation, and the copies are one per child after a
    parent's first (the fewest any row assignment can make)."""
    g = torch.Generator().manual_seed(0)
    N, B = 3, 4
    rows, content = list(range(N * B)), [(r,) for r in range(N * B)]  # content[r]: row r's suffix
    for step in range(50):
        index = (torch.randint(0, B, (N, B), generator=g) + B * torch.arange(N)[:, None]).flatten()
        index = index.tolist()
        want = [content[rows[s]] + (step,) for s in index]  # each beam's suffix, one token longer
        new_rows, copies = branch_rows(rows, index, B)
        assert sorted(new_rows) == list(range(N * B))
        assert all(r // B == b // B for b, r in enumerate(new_rows))
        assert len(copies) == N * B - len(set(index))
        written = [d for d, _ in copies]
        assert len(set(written)) == len(written) and not set(written) & {s for _, s in copies}
        for d, s in copies:
            content[d] = content[s]
        for b, r in enumerate(new_rows):
            content[r] = content[r] + (step,)
        assert [content[r] for r in new_rows] == want
        rows = new_rows


def test_shared_prefix_runs_out_of_room_with_a_clear_error():
    model, (ids, _) = workbench_model(), prompts()
    stepper = SharedPrefixStepper(model, ids, None, 1)
    stepper.prompt(2)
    stepper.step(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"T \(new positions\) must be an int in \[0, 0\]"):
        stepper.step(torch.zeros(4, dtype=torch.long))


def test_beam_search_shared_prefix_on_the_workbench_model():
    model, (ids, mask) = workbench_model(), prompts()
    for G, dp in ((1, 0.0), (2, 0.7)):
        kw = dict(num_beams=4, num_beam_groups=G, diversity_penalty=dp, max_new_tokens=10,
                  eos_token_id=EOS, pad_token_id=PAD, attention_mask=mask, num_return_sequences=4)
        a, b = beam_search(model, ids, shared_prefix=True, **kw), beam_search(model, ids, **{
            **kw, "attention_mask": mask}, shared_prefix=False)
        assert torch.equal(a.sequences, b.sequences)
        torch.testing.assert_close(a.sequences_scores, b.sequences_scores, atol=1e-5, rtol=0)


def test_sample_shares_the_prefix_and_keeps_the_law():
    model, (ids, mask) = workbench_model(), prompts()
    kw = dict(max_new_tokens=6, num_return_sequences=5, attention_mask=mask)
    a = sample_continuations(model, ids, generator=torch.Generator().manual_seed(3), **kw)
    b = sample_continuations(model, ids, generator=torch.Generator().manual_seed(3), shared_prefix=False, **kw)
    assert a.shape == (10, 12) and torch.equal(a[:, :6], ids.repeat_interleave(5, 0))
    assert torch.equal(a, b)  # same draws from logits equal to ~1e-6
    # the first token's law: 4000 draws of prompt 0 against its exact probabilities (chi-square,
    # 39 degrees of freedom: the 0.999 quantile is 72.1), and a negative control at temperature 2
    p = torch.softmax(model(ids[:1])[0, -1].float(), -1).detach()
    draws = sample_continuations(model, ids[:1], max_new_tokens=1, num_return_sequences=4000,
                   generator=torch.Generator().manual_seed(4))[:, -1]
    hot = sample_continuations(model, ids[:1], max_new_tokens=1, num_return_sequences=4000, temperature=2.0,
                 generator=torch.Generator().manual_seed(4))[:, -1]

    def chi2(tokens):
        counts = torch.bincount(tokens, minlength=V).float()
        return float(((counts - 4000 * p) ** 2 / (4000 * p)).sum())
    assert chi2(draws) < 72.1 < chi2(hot)
    for bad, name in ((dict(num_return_sequences=0), "num_return_sequences"),
                      (dict(temperature=0.0), "temperature"), (dict(max_new_tokens=0), "max_new_tokens")):
        with pytest.raises(ValueError, match=name):
            sample_continuations(model, ids, **{"max_new_tokens": 2, **bad})


def test_fused_partial_attention_equals_the_math():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 2, 6, 3, 16, generator=g)  # N, Hkv, M, T, D
    k, v = torch.randn(2, 2, 2, 29, 16, generator=g)
    keep = torch.rand(2, 1, 1, 3, 29, generator=g) > 0.3
    keep[..., 0] = True  # every query sees a key
    for mask in (None, additive_mask(keep)):
        (out, lse), (ref, ref_lse) = (fn(q, k, v, mask, 0.2) for fn in (fused_partial_attention,
                                                                        partial_attention))
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_vocab_major_head_gives_the_same_logits_and_refuses_other_heads():
    model = tiny_hf("gpt2", vocab=V)
    ids = torch.randint(0, V, (3, 7), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(HFCausalLM(model, vocab_major_head=True)(ids), HFCausalLM(model)(ids),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="vocab_major_head"):
        HFCausalLM(tiny_hf("gemma", vocab=V), vocab_major_head=True)
