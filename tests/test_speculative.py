"""refimpl.speculative: speculative decoding is exact in distribution and, greedy, in output.

Oracles: the target's exact law (enumerated with plain forward passes, float64), a chi-square
test with two negative controls that must fail it, the target's own greedy decoding
(autoregressive, row by row), uncached recomputation after every rollback, the closed form
(1 - a^(g+1)) / (1 - a) against a brute-force sum and against simulation, brute-force counting
and search for the drafters, and Hugging Face's assisted generation (transformers 4.56.2).
"""
import math
from collections import Counter

import pytest
import torch

from refimpl.hf import HFCausalLM
from refimpl.lm import GPTConfig, KVCache, TinyGPT
from refimpl.recurrent import LSTMConfig, LSTMDraft
from refimpl.speculative import (AdaptiveGamma, DraftModel, LeanDecoder, NGramTable, PromptLookup, SpecStats,
                                 acceptance_rate, autoregressive_generate, batch_inputs, expected_speedup,
                                 expected_tokens_per_call, greedy_accept, lookup_continuation, realign,
                                 rollback_cache, speculative_accept, speculative_generate)
from tiny_hf import tiny_hf


def tiny(seed, V=20, layers=2, block=64, emb=16, scale=4.0):
    """A random TinyGPT in float64; weights scaled up so that logits are far from ties."""
    torch.manual_seed(seed)
    model = TinyGPT(GPTConfig(V, block, layers, 2, emb)).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model


def ids(*shape, V=20, seed=1):
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


def gen(seed):
    return torch.Generator().manual_seed(seed)


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square test of counts against probs (categories with E < 5 pooled)."""
    n = counts.sum()
    expected = probs * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    df = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


# ------------------------------------------------------------------ theory

@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.8, 0.999, 1.0])
@pytest.mark.parametrize("gamma", [0, 1, 4, 9])
def test_expected_tokens_per_call_is_the_mean_of_the_truncated_geometric(alpha, gamma):
    # a call yields k + 1 tokens when the first k drafts pass and the next fails (or k = gamma)
    brute = sum((k + 1) * alpha ** k * (1 - alpha) for k in range(gamma)) + (gamma + 1) * alpha ** gamma
    assert expected_tokens_per_call(alpha, gamma) == pytest.approx(brute, rel=1e-9)
    assert expected_speedup(alpha, gamma, 0.1) == pytest.approx(brute / (0.1 * gamma + 1), rel=1e-9)


def test_acceptance_rate_is_one_minus_total_variation():
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.2, 0.6])
    assert float(acceptance_rate(p, q)) == pytest.approx(1 - 0.5 * float((p - q).abs().sum()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("V", [5, 65, 1000, 50257])
def test_acceptance_rate_at_its_bounds_stays_a_probability(V, dtype):
    """At the bounds themselves (p == q: 1; disjoint supports: 0; one-hot p: q at that token) the float
    sum may land an ulp outside [0, 1] on some CPUs; the rate must still be a valid input to the theory."""
    g = torch.Generator().manual_seed(V)
    p = (4 * torch.randn(64, V, generator=g, dtype=torch.float64)).softmax(-1).to(dtype)
    q = (4 * torch.randn(64, V, generator=g, dtype=torch.float64)).softmax(-1).to(dtype)
    half = torch.arange(V) < V // 2
    disjoint_p = torch.where(half, p, 0) / torch.where(half, p, 0).sum(-1, keepdim=True)
    disjoint_q = torch.where(half, 0, q) / torch.where(half, 0, q).sum(-1, keepdim=True)
    one_hot = torch.nn.functional.one_hot(torch.arange(64) % V, V).to(dtype)
    eps = 8 * V * torch.finfo(dtype).eps  # the rounding of a V-term sum
    for (a, b), want in [((p, p.clone()), torch.ones(64, dtype=dtype)),
                         ((disjoint_p, disjoint_q), torch.zeros(64, dtype=dtype)),
                         ((one_hot, q), q[torch.arange(64), torch.arange(64) % V])]:
        alpha = acceptance_rate(a, b)
        assert ((alpha >= 0) & (alpha <= 1)).all()
        assert (alpha - want).abs().max() <= eps
        for x in alpha.tolist():
            assert 1 <= expected_tokens_per_call(x, 4) <= 5


# ------------------------------------------------------------------ one step, exact law

def one_step_cases(V=6):
    g = torch.Generator().manual_seed(0)
    rand = lambda: torch.rand(V, generator=g, dtype=torch.float64)  # noqa: E731
    p = rand().softmax(0)
    near = (p + 1e-3 * rand()).clamp_min(0)
    disjoint_p = torch.tensor([0.5, 0.5, 0, 0, 0, 0], dtype=torch.float64)
    disjoint_q = torch.tensor([0, 0, 0.25, 0.25, 0.25, 0.25], dtype=torch.float64)
    return {
        "p_equals_q": (p, p.clone()),
        "disjoint_supports": (disjoint_p, disjoint_q),
        "one_hot_q": (p, torch.nn.functional.one_hot(torch.tensor(2), V).double()),
        "near_equal": (p, near / near.sum()),
        "random": (p, (3 * rand()).softmax(0)),
    }


@pytest.mark.parametrize("case", list(one_step_cases()))
@pytest.mark.parametrize("gamma", [1, 3])
def test_first_emitted_token_has_law_p(case, gamma):
    """Monte Carlo over 400k independent rows, float64: every frequency within 5 standard errors of p."""
    p, q = one_step_cases()[case]
    N, V = 400_000, len(p)
    g = gen(1)
    draft = torch.multinomial(q.expand(N, V), gamma, replacement=True, generator=g)  # i.i.d. from q
    n, nxt = speculative_accept(draft, q.expand(N, gamma, V), p.expand(N, gamma + 1, V), generator=g)
    first = torch.where(n > 0, draft[:, 0], nxt)
    freq = torch.bincount(first, minlength=V).double() / N
    tolerance = 5 * (p * (1 - p) / N).sqrt() + 1e-12
    assert ((freq - p).abs() <= tolerance).all(), (freq, p)
    # and the number accepted is truncated-geometric with the acceptance rate sum(min(p, q))
    alpha = float(acceptance_rate(p, q))
    assert float((n + 1).double().mean()) == pytest.approx(expected_tokens_per_call(alpha, gamma), abs=0.01)


def test_zero_mass_residual_is_safe():
    # p = q one-hot: the residual max(0, p - q) is all zero; the step must still emit a valid token
    p = torch.nn.functional.one_hot(torch.tensor([[1, 1], [3, 3]]), 5).double()
    q = p[:, :1]
    n, nxt = speculative_accept(torch.tensor([[1], [3]]), q, p, generator=gen(0))
    assert n.tolist() == [1, 1] and nxt.tolist() == [1, 3]
    # forced rejection where p - q has no mass left except through rounding
    q = torch.tensor([[[0.5, 0.5]]], dtype=torch.float64)
    p = torch.tensor([[[0.5, 0.5], [0.5, 0.5]]], dtype=torch.float64)
    for seed in range(20):
        n, nxt = speculative_accept(torch.tensor([[0]]), q, p, generator=gen(seed))
        assert n.item() == 1 and nxt.item() in (0, 1)


def test_greedy_accept_matches_argmax_prefix():
    logits = torch.randn(4, 5, 7, generator=gen(0))
    target = logits.argmax(-1)
    draft = target[:, :4].clone()
    draft[1, 2] = (draft[1, 2] + 1) % 7
    draft[2, 0] = (draft[2, 0] + 1) % 7
    n, nxt = greedy_accept(draft, logits)
    assert n.tolist() == [4, 2, 0, 4]
    assert nxt.tolist() == [target[0, 4], target[1, 2], target[2, 0], target[3, 4]]


# ------------------------------------------------------------------ whole sequences: chi-square

V_SMALL, PROMPT = 4, [1, 0, 3, 1, 0]


@pytest.fixture(scope="module")
def small_pair():
    return tiny(10, V=V_SMALL, scale=3.0), tiny(11, V=V_SMALL, layers=1, scale=3.0)


def exact_law(model, prompt, length):
    """P(x_1 .. x_length | prompt) for every continuation, by plain (uncached) forward passes."""
    seqs = torch.cartesian_prod(*[torch.arange(V_SMALL)] * length).reshape(-1, length)
    x = torch.cat([torch.tensor(prompt).expand(len(seqs), -1), seqs], dim=1)
    with torch.no_grad():
        logp = model(x).log_softmax(-1)[:, len(prompt) - 1:-1]
    return logp.gather(2, seqs[..., None]).squeeze(2).sum(1).exp()


def continuation_counts(out, length):
    tail = out[:, len(PROMPT):len(PROMPT) + length]
    code = sum(tail[:, i] * V_SMALL ** (length - 1 - i) for i in range(length))
    return torch.bincount(code, minlength=V_SMALL ** length).double()


class GreedyDraftSoftmaxQ(DraftModel):
    """A broken drafter: proposes the argmax but claims q = softmax (q is not what it sampled from)."""

    def propose(self, seq, length, pad, g, greedy, temperature, generator):
        tokens, _ = super().propose(seq, length, pad, g, True, temperature, generator)
        x = torch.cat([seq[:, :length], tokens], dim=1)
        with torch.no_grad():
            q = self.model(x)[:, length - 1:length - 1 + tokens.shape[1]].softmax(-1)  # (no pads: one round)
        return tokens, q


N_SAMPLES = 10_000


def drafters(draft):
    corpus = ids(3000, V=V_SMALL, seed=5)
    return {
        "draft_model": lambda: DraftModel(draft),
        "bild_fallback": lambda: DraftModel(draft, stop_below=0.6),
        "ngram_table": lambda: NGramTable.from_tokens(corpus, V_SMALL, order=3),
        "prompt_lookup": lambda: PromptLookup(max_ngram=2),
        "adaptive": lambda: AdaptiveGamma(DraftModel(draft), start=1, max_gamma=3),
    }


@pytest.mark.parametrize("name,length,gamma", [
    ("draft_model", 2, 2), ("draft_model", 3, 3), ("bild_fallback", 3, 3), ("ngram_table", 2, 2),
    ("prompt_lookup", 2, 2), ("adaptive", 3, 3)])
def test_chi_square_continuations_follow_the_target(small_pair, name, length, gamma):
    """20k rows decoded as one ragged batch: the law of the first two tokens is the target's."""
    target, draft = small_pair
    rows = N_SAMPLES // 4 if name == "prompt_lookup" else N_SAMPLES  # its batch path loops over rows
    prompt = torch.tensor(PROMPT).expand(rows, -1)
    out, stats = speculative_generate(target, drafters(draft)[name](), prompt, max_new_tokens=length,
                                      gamma=gamma, temperature=1.0, generator=gen(2))
    counts = continuation_counts(out, 2)
    assert chi2_pvalue(counts, exact_law(target, PROMPT, 2)) > 1e-3
    assert 0 < stats.acceptance_rate < 1  # both branches (accept, reject) were exercised


@pytest.mark.parametrize("drafter", ["transformer", "lstm"])
def test_chi_square_batch_one_path(small_pair, drafter):
    """The batch-1 path (plain crop, no realignment), 1000 independent runs; also with the
    recurrent draft (refimpl.recurrent), whose state cache rolls back by crop."""
    target, draft = small_pair
    if drafter == "lstm":
        torch.manual_seed(12)
        draft = LSTMDraft(LSTMConfig(V_SMALL, 64, 1, 16)).double().eval()
    g = gen(3)
    prompt = torch.tensor([PROMPT])
    outs = torch.cat([speculative_generate(target, draft, prompt, max_new_tokens=2, gamma=2, generator=g)[0]
                      for _ in range(1000)])
    assert chi2_pvalue(continuation_counts(outs, 2), exact_law(target, PROMPT, 2)) > 1e-3


def test_chi_square_negative_control_draft_alone(small_pair):
    target, draft = small_pair
    prompt = torch.tensor(PROMPT).expand(N_SAMPLES, -1)
    out = autoregressive_generate(draft, prompt, max_new_tokens=2, generator=gen(2))
    assert chi2_pvalue(continuation_counts(out, 2), exact_law(target, PROMPT, 2)) < 1e-6
    # the same test accepts the draft's own law: the failure is the law, not the test
    assert chi2_pvalue(continuation_counts(out, 2), exact_law(draft, PROMPT, 2)) > 1e-3


def test_chi_square_negative_control_wrong_q(small_pair):
    target, draft = small_pair
    prompt = torch.tensor(PROMPT).expand(N_SAMPLES, -1)
    out, _ = speculative_generate(target, GreedyDraftSoftmaxQ(draft), prompt, max_new_tokens=2,
                                  gamma=2, generator=gen(2))
    assert chi2_pvalue(continuation_counts(out, 2), exact_law(target, PROMPT, 2)) < 1e-6


# ------------------------------------------------------------------ greedy: exactly the target's output

@pytest.fixture(scope="module")
def pair():
    return tiny(0), tiny(1, layers=1)


def noisy(model, eps, seed=0):
    """A copy of ``model`` with relative Gaussian noise on its weights: a draft that agrees only partly."""
    import copy
    torch.manual_seed(seed)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(eps * p.abs().mean() * torch.randn_like(p))
    return out


def greedy_drafters(target, draft):
    return {
        "draft_equals_target": lambda: DraftModel(target),
        "random_draft": lambda: DraftModel(draft),
        "prompt_lookup": lambda: PromptLookup(max_ngram=3),
        "ngram_table": lambda: NGramTable.from_tokens(ids(2000, seed=7), 20, order=3),
        "adaptive": lambda: AdaptiveGamma(DraftModel(draft), start=2, max_gamma=8),
        "bild_fallback": lambda: DraftModel(draft, stop_below=0.5),
    }


@pytest.mark.parametrize("name", list(greedy_drafters(None, None)))
@pytest.mark.parametrize("gamma", [1, 2, 4, 8])
def test_greedy_equals_target_greedy(pair, name, gamma):
    target, draft = pair
    x = ids(4, 6, seed=2)
    # the prompt repeats itself so that prompt lookup finds matches
    x = torch.cat([x, x, x[:, :3]], dim=1)
    want = torch.cat([autoregressive_generate(target, x[b:b + 1], max_new_tokens=25, greedy=True)
                      for b in range(len(x))])  # row by row: no batching at all
    make = greedy_drafters(target, draft)[name]
    got, stats = speculative_generate(target, make(), x, max_new_tokens=25, gamma=gamma, greedy=True)
    assert torch.equal(got, want)
    for b in range(len(x)):
        got1, _ = speculative_generate(target, make(), x[b:b + 1], max_new_tokens=25, gamma=gamma, greedy=True)
        assert torch.equal(got1, want[b:b + 1])
    if name == "draft_equals_target":
        assert stats.acceptance_rate == 1.0


def test_greedy_prompt_lookup_on_a_copy_task_accepts_long_runs(pair):
    """When the target copies its context, prompt lookup drafts are accepted whole."""
    target, _ = pair
    x = ids(1, 8, seed=4)
    want = autoregressive_generate(target, x, max_new_tokens=24, greedy=True)
    # a context that already contains the target's own continuation, then its start again
    ctx = torch.cat([want, x], dim=1)
    ref = autoregressive_generate(target, ctx, max_new_tokens=16, greedy=True)
    got, stats = speculative_generate(target, PromptLookup(max_ngram=8), ctx, max_new_tokens=16,
                                      gamma=8, greedy=True)
    assert torch.equal(got, ref)
    copied = int((ref[0, 40:] == want[0, 8:24]).cumprod(0).sum())  # how far the target copies
    assert stats.tokens_per_call >= min(copied, 8) / 2


# ------------------------------------------------------------------ rollback: caches stay exact

class Checked(torch.nn.Module):
    """Wraps a model; on every cached call asserts the logits equal an uncached recomputation of the
    whole row (history reconstructed from position ids, which count each row's real tokens)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.history, self.calls = model, model.config, {}, 0
        self.weight = next(model.parameters())

    def empty_cache(self, batch_size):
        self.history = {}
        return self.model.empty_cache(batch_size)

    def forward(self, input_ids, position_ids=None, attn_mask=None, cache=None, last_only=False):
        assert input_ids.shape[0] == 1
        start = len(cache) if position_ids is None else int(position_ids[0, 0])
        row = self.history.get(0, [])[:start] + input_ids[0].tolist()
        self.history[0] = row
        logits = self.model(input_ids, position_ids, attn_mask, cache)
        with torch.no_grad():
            full = self.model(torch.tensor([row]))[:, -input_ids.shape[1]:]
        assert torch.allclose(logits, full, atol=1e-9, rtol=0), (logits - full).abs().max()
        assert len(cache) == len(row)
        self.calls += 1
        return logits[:, -1:] if last_only else logits


@pytest.mark.parametrize("greedy", [True, False])
def test_rollback_keeps_both_caches_exact(pair, greedy):
    target, draft = Checked(pair[0]), Checked(noisy(pair[0], 0.5))
    out, stats = speculative_generate(target, draft, ids(1, 5, seed=6), max_new_tokens=40, gamma=4,
                                      greedy=greedy, generator=gen(0))
    assert 0 < stats.acceptance_rate < 1  # rollbacks happened
    assert target.calls == stats.target_calls + 1  # + the prefill
    assert draft.calls >= sum(stats.drafted)


# ------------------------------------------------------------------ theory vs simulation

class ConstantLM(torch.nn.Module):
    """Same next-token distribution at every position: acceptance rate constant by construction."""

    def __init__(self, probs, block=100_000):
        super().__init__()
        self.logits = torch.nn.Parameter(probs.log(), requires_grad=False)
        self.config = GPTConfig(len(probs), block, 1, 1, 1)

    def empty_cache(self, batch_size):
        return KVCache(1, batch_size, 1, 1, self.config.block_size)  # never written: no memory

    def forward(self, input_ids, position_ids=None, attn_mask=None, cache=None, last_only=False):
        cache.advance(input_ids.shape[1])
        T = 1 if last_only else input_ids.shape[1]
        return self.logits.expand(input_ids.shape[0], T, -1)


@pytest.mark.parametrize("gamma", [1, 3, 6])
def test_constant_acceptance_matches_expected_tokens_per_call(gamma):
    p = torch.tensor([0.5, 0.3, 0.1, 0.1], dtype=torch.float64)
    q = torch.tensor([0.2, 0.3, 0.4, 0.1], dtype=torch.float64)
    alpha = float(acceptance_rate(p, q))  # 0.7
    out, stats = speculative_generate(ConstantLM(p), ConstantLM(q), torch.zeros(400, 1, dtype=torch.long),
                                      max_new_tokens=100, gamma=gamma, generator=gen(0))
    full = [(a, r) for a, d, r in zip(stats.accepted, stats.drafted, stats.rows) if d == gamma * r]
    per_row_call = (sum(a for a, _ in full) + sum(r for _, r in full)) / sum(r for _, r in full)
    calls = sum(r for _, r in full)
    sd = math.sqrt(sum((k + 1) ** 2 * (alpha ** k * (1 - alpha) if k < gamma else alpha ** gamma)
                       for k in range(gamma + 1)) - expected_tokens_per_call(alpha, gamma) ** 2)
    assert abs(per_row_call - expected_tokens_per_call(alpha, gamma)) < 5 * sd / math.sqrt(calls)
    assert abs(per_row_call - expected_tokens_per_call(alpha + 0.05, gamma)) > 5 * sd / math.sqrt(calls)


def test_stats_count_tokens():
    s = SpecStats(drafted=[4, 4], accepted=[4, 1], rows=[1, 1])
    assert s.target_calls == 2 and s.acceptance_rate == 5 / 8 and s.tokens_per_call == 3.5


# ------------------------------------------------------------------ drafters against brute force

def test_lookup_continuation_matches_brute_force():
    g = gen(0)
    for _ in range(200):
        ctx = torch.randint(0, 3, (int(torch.randint(2, 30, (1,), generator=g)),), generator=g)
        got = lookup_continuation(ctx, 4, max_ngram=3, min_ngram=1).tolist()
        c, want = ctx.tolist(), []
        for n in range(min(3, len(c) - 1), 0, -1):
            starts = [s for s in range(len(c) - n) if c[s:s + n] == c[-n:]]
            if starts:
                want = c[starts[-1] + n:starts[-1] + n + 4]
                break
        assert got == want


def test_ngram_table_matches_counting():
    V, corpus = 5, ids(500, V=5, seed=3)
    table = NGramTable.from_tokens(corpus, V, order=3, smoothing=0.0)
    c = corpus.tolist()
    tri = Counter(zip(c, c[1:], c[2:]))
    ctx = Counter(zip(c[:-2], c[1:-1]))
    for (a, b), total in ctx.items():
        row = table.probs[a * V + b]
        for x in range(V):
            assert float(row[x]) == pytest.approx(tri[(a, b, x)] / total)
    # an unseen context backs off to the bigram of its last token
    table = NGramTable.from_tokens(torch.tensor([0, 1, 0, 1, 1, 2, 0, 1]), 3, order=3, smoothing=0.0)
    assert torch.allclose(table.probs[2 * 3 + 2], torch.tensor([1.0, 0.0, 0.0]))  # "2 2" unseen -> after "2": 0
    assert torch.allclose(table.probs[0 * 3 + 1], torch.tensor([0.5, 0.5, 0.0]))  # "0 1" -> 0 then 1


def test_adaptive_gamma_grows_and_shrinks(pair):
    target, _ = pair
    ada = AdaptiveGamma(DraftModel(target), start=2, max_gamma=7)
    speculative_generate(target, ada, ids(1, 4), max_new_tokens=30, gamma=8, greedy=True)
    assert ada.history[:4] == [2, 4, 6, 7]  # draft = target: every round accepted, +2 up to the cap


# ------------------------------------------------------------------ Hugging Face

def hf_pair(arch):
    def build(layers, seed):
        model = tiny_hf(arch, vocab=40, positions=128, layers=layers, seed=seed, bos_token_id=0,
                        eos_token_id=0).double()
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(3.0)
        return model
    target = build(2, 0)
    return target, noisy(target, 0.5)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_greedy_equals_hf_assisted_generation(arch):
    target_hf, draft_hf = hf_pair(arch)
    x = torch.randint(1, 40, (1, 8), generator=gen(0))
    with torch.no_grad():
        hf_out = target_hf.generate(x, attention_mask=torch.ones_like(x), assistant_model=draft_hf,
                                    do_sample=False, max_new_tokens=24, min_new_tokens=24, pad_token_id=0)
    target, draft = HFCausalLM(target_hf), HFCausalLM(draft_hf)
    ours, stats = speculative_generate(target, draft, x, max_new_tokens=24, gamma=4, greedy=True)
    assert torch.equal(ours, hf_out)
    assert 0 < stats.acceptance_rate < 1
    # batch > 1, which assisted generation refuses: rows realigned inside HF's DynamicCache
    xb = torch.randint(1, 40, (3, 8), generator=gen(1))
    want = torch.cat([autoregressive_generate(target, xb[b:b + 1], max_new_tokens=16, greedy=True)
                      for b in range(3)])
    got, _ = speculative_generate(target, draft, xb, max_new_tokens=16, gamma=3, greedy=True)
    assert torch.equal(got, want)


# ------------------------------------------------------------------ bad input

def test_bad_input(pair):
    target, draft = pair
    x = ids(2, 4)
    with pytest.raises(ValueError, match="vocab_size"):
        speculative_generate(target, tiny(3, V=21, layers=1), x, max_new_tokens=4)
    with pytest.raises(ValueError, match="gamma"):
        speculative_generate(target, draft, x, max_new_tokens=4, gamma=0)
    with pytest.raises(ValueError, match="temperature"):
        speculative_generate(target, draft, x, max_new_tokens=4, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        autoregressive_generate(target, x, max_new_tokens=4, temperature=-1.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        speculative_generate(target, draft, x, max_new_tokens=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        speculative_generate(target, draft, x, max_new_tokens=100)  # exceeds block_size 64
    with pytest.raises(ValueError, match="input_ids"):
        speculative_generate(target, draft, x[0], max_new_tokens=4)
    with pytest.raises(ValueError, match="q must be"):  # mismatched batch sizes
        speculative_accept(torch.zeros(2, 3, dtype=torch.long), torch.rand(3, 3, 5), torch.rand(2, 4, 5))
    with pytest.raises(ValueError, match="q must be"):
        speculative_accept(torch.zeros(2, 3, dtype=torch.long), torch.rand(2, 3, 5), torch.rand(2, 3, 5))
    with pytest.raises(ValueError, match="alpha"):
        expected_tokens_per_call(1.5, 4)
    with pytest.raises(ValueError, match="gamma"):
        expected_tokens_per_call(0.5, -1)
    with pytest.raises(ValueError, match="min_ngram"):
        PromptLookup(max_ngram=2, min_ngram=3)
    with pytest.raises(ValueError, match="order"):
        NGramTable.from_tokens(ids(100), 20, order=1)
    with pytest.raises(ValueError, match="ids"):
        NGramTable.from_tokens(ids(100), 10, order=2)  # tokens >= vocab_size
    with pytest.raises(ValueError, match="start"):
        AdaptiveGamma(DraftModel(draft), start=0)
    with pytest.raises(ValueError, match="stop_below"):
        DraftModel(draft, stop_below=1.5)


def test_draft_model_proposals_are_the_draft_models_greedy_chain():
    """DraftModel's last_only forward with its own cache drafts what plain full
    forwards of the draft model choose, round after round (1 or 2 unseen tokens)."""
    model = tiny(4, layers=2)
    x = ids(1, 9, seed=8)
    drafter = DraftModel(model)
    seq = torch.zeros(1, 40, dtype=torch.long)
    seq[:, :9] = x
    drafter.begin(seq, 9)
    L = 9
    with torch.no_grad():
        for keep in (2, 4, 1):
            draft, q = drafter.propose(seq, L, None, 4, True, 1.0, None)
            ctx = seq[:, :L].clone()
            for j in range(draft.shape[1]):
                want = model(ctx)[:, -1].argmax(-1)
                assert int(draft[0, j]) == int(want)
                ctx = torch.cat([ctx, draft[:, j:j + 1]], dim=1)
            seq[:, L:L + 4] = draft
            seq[0, L + keep] = (int(draft[0, keep]) + 1) % model.config.vocab_size if keep < 4 else 0
            drafter.rollback(L + keep, None, None, keep, 4)
            L += keep + 1
            assert len(drafter.cache) <= L


# ------------------------------------------------------------------ one case per check rule

def _dists(B=2, g=3, V=5):
    q = torch.rand(B, g, V).softmax(-1)
    return q, torch.rand(B, g + 1, V).softmax(-1)


def _kv(batch=2, length=4):
    cache = KVCache(1, batch, 1, 2, 16)
    cache.update(0, torch.zeros(batch, 1, length, 2), torch.zeros(batch, 1, length, 2))
    cache.advance(length)
    return cache


_rows, _shift = torch.tensor([0, 1]), torch.tensor([1, 0])
BAD_CALLS = {
    "gamma float": (lambda: expected_tokens_per_call(0.5, 2.5), "gamma"),
    "c NaN": (lambda: expected_speedup(0.5, 2, float("nan")), "c must"),
    "acceptance_rate shapes": (lambda: acceptance_rate(torch.rand(2, 5), torch.rand(3, 5)), "p.shape"),
    "acceptance_rate broadcast": (lambda: acceptance_rate(torch.rand(5), torch.rand(2, 5)), "p.shape"),
    "acceptance_rate ints": (lambda: acceptance_rate(torch.ones(5, dtype=torch.long), torch.rand(5)), "p must"),
    "accept draft >= V": (lambda: speculative_accept(torch.full((2, 3), 5), *_dists()), "draft_tokens"),
    "accept draft < 0": (lambda: speculative_accept(torch.full((2, 3), -1), *_dists()), "draft_tokens"),
    "accept draft float": (lambda: speculative_accept(torch.zeros(2, 3), *_dists()), "draft_tokens"),
    "accept p 2-D": (lambda: speculative_accept(torch.zeros(2, 3, dtype=torch.long), _dists()[0],
                                                torch.rand(2, 5)), "p must"),
    "greedy draft >= V": (lambda: greedy_accept(torch.full((2, 3), 7), torch.randn(2, 4, 5)), "draft_tokens"),
    "greedy logits shape": (lambda: greedy_accept(torch.zeros(2, 3, dtype=torch.long), torch.randn(2, 3, 5)),
                            "logits"),
    "batch_inputs past < 0": (lambda: batch_inputs(torch.zeros(2, dtype=torch.long), -1, 2), "past"),
    "batch_inputs T 0": (lambda: batch_inputs(torch.zeros(2, dtype=torch.long), 3, 0), "T must"),
    "batch_inputs pad > past": (lambda: batch_inputs(torch.tensor([0, 4]), 3, 2), "pad"),
    "batch_inputs pad 2-D": (lambda: batch_inputs(torch.zeros(2, 1, dtype=torch.long), 3, 2), "pad"),
    "realign dim": (lambda: realign(torch.zeros(2, 5), 2, 0, _rows, _shift, 5), "dim"),
    "realign same dims": (lambda: realign(torch.zeros(2, 5), 0, 0, _rows, _shift, 5), "batch_dim"),
    "realign shift length": (lambda: realign(torch.zeros(2, 5), 1, 0, _rows, _shift[:1], 5), "shift"),
    "realign rows float": (lambda: realign(torch.zeros(2, 5), 1, 0, _rows.float(), _shift, 5), "rows"),
    "realign length < 0": (lambda: realign(torch.zeros(2, 5), 1, 0, _rows, _shift, -1), "length"),
    "rollback end < 0": (lambda: rollback_cache(_kv(1), -2), "end"),
    "rollback rows without shift": (lambda: rollback_cache(_kv(), torch.tensor([3, 3]), _rows), "shift"),
    "rollback end length": (lambda: rollback_cache(_kv(), torch.tensor([3]), _rows, _shift), "end"),
    "rollback rows >= B": (lambda: rollback_cache(_kv(), torch.tensor([3, 3]), torch.tensor([0, 2]), _shift),
                           "rows"),
    "lookup min_ngram 0": (lambda: lookup_continuation(ids(12), 3, 2, 0), "min_ngram"),
    "lookup g < 0": (lambda: lookup_continuation(ids(12), -1, 2, 1), "g must"),
    "lookup context 2-D": (lambda: lookup_continuation(ids(1, 12), 3, 2, 1), "context"),
    "PromptLookup max_ngram float": (lambda: PromptLookup(max_ngram=2.5), "max_ngram"),
    "NGram smoothing < 0": (lambda: NGramTable.from_tokens(ids(100), 20, smoothing=-1), "smoothing"),
    "NGram smoothing NaN": (lambda: NGramTable.from_tokens(ids(100), 20, smoothing=float("nan")), "smoothing"),
    "NGram ids float": (lambda: NGramTable.from_tokens(ids(100).float(), 20), "ids"),
    "NGram vocab_size 0": (lambda: NGramTable.from_tokens(ids(100), 0), "vocab_size"),
    "NGram probs shape": (lambda: NGramTable(torch.rand(20, 20), 20, 3), "probs"),
    "NGram propose length": (lambda: NGramTable.from_tokens(ids(100), 20).propose(
        ids(1, 8), 1, None, 2, True, 1.0, None), "length"),
    "AdaptiveGamma grow < 0": (lambda: AdaptiveGamma(PromptLookup(), grow=-1), "grow"),
    "AdaptiveGamma shrink float": (lambda: AdaptiveGamma(PromptLookup(), shrink=0.5), "shrink"),
    "AdaptiveGamma drafter": (lambda: AdaptiveGamma("lookup"), "drafter"),
    "generate max_new_tokens float": (lambda: autoregressive_generate(tiny(0), ids(1, 3), max_new_tokens=2.5),
                                      "max_new_tokens"),
    "generate temperature str": (lambda: autoregressive_generate(tiny(0), ids(1, 3), max_new_tokens=2,
                                                                 temperature="hot"), "temperature"),
    "speculative gamma bool": (lambda: speculative_generate(tiny(0), PromptLookup(), ids(1, 3), max_new_tokens=2,
                                                            gamma=True), "gamma"),
    "DraftModel model": (lambda: DraftModel("gpt2"), "model must"),
    "LeanDecoder model": (lambda: LeanDecoder(tiny_hf("gpt2")), "model must be a refimpl.lm.TinyGPT"),
    "LeanDecoder token id": (lambda: LeanDecoder(tiny(0))(ids(1, 2) + 20, cache=tiny(0).empty_cache(1)),
                             "input_ids"),
    "LeanDecoder past block": (lambda: LeanDecoder(tiny(0, block=4))(ids(1, 5), cache=tiny(0).empty_cache(1)),
                               "block_size"),
    "speculative drafter": (lambda: speculative_generate(tiny(0), 3, ids(1, 3), max_new_tokens=2), "model must"),
}


@pytest.mark.parametrize("case", BAD_CALLS, ids=str)
def test_check_functions_name_the_argument(case):
    call, match = BAD_CALLS[case]
    with pytest.raises(ValueError, match=match):
        call()


# ------------------------------------------------------------------ LeanDecoder

def lean_and_plain_calls(model, steps):
    """Run the same calls (input ids, mask) through ``model`` and ``LeanDecoder(model)``, each with
    its own cache; returns per call the two logits and the two caches' keys and values."""
    caches = [model.empty_cache(1), model.empty_cache(1)]
    out = []
    with torch.no_grad():
        for x, mask in steps:
            logits = [f(x, None, mask, c) for f, c in zip((model, LeanDecoder(model)), caches)]
            kv = [(c.k[:, :, :, :len(c)].clone(), c.v[:, :, :, :len(c)].clone()) for c in caches]
            out.append((logits, kv))
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lean_decoder_gives_the_models_numbers_bit_for_bit(dtype):
    """The oracle is the model's own forward: prompt (causal, no mask), one-token steps, a
    two-token step and a verification step with an explicit causal mask (speculative decoding's)."""
    from refimpl.lm import causal_mask
    model = tiny(0).to(dtype)
    steps = [(ids(1, 7), None), (ids(1, 1, seed=2), None), (ids(1, 2, seed=3), None),
             (ids(1, 5, seed=4), causal_mask(5, 15, dtype=dtype)[None, None]), (ids(1, 1, seed=5), None)]
    for (a, b), (kv_a, kv_b) in lean_and_plain_calls(model, steps):
        assert a.dtype == b.dtype == dtype and torch.equal(a, b)
        assert torch.equal(kv_a[0], kv_b[0]) and torch.equal(kv_a[1], kv_b[1])


def test_lean_decoder_hands_other_calls_to_the_model(pair):
    """Batches, explicit positions, no cache, another backend: the model's forward,
    so the same results as calling it directly."""
    model = pair[0]
    lean = LeanDecoder(model)
    with torch.no_grad():
        x = ids(2, 6)
        assert torch.equal(lean(x), model(x))
        c1, c2 = model.empty_cache(2), model.empty_cache(2)
        assert torch.equal(lean(x, cache=c1), model(x, cache=c2))
        pos = torch.arange(3, 9)[None]
        assert torch.equal(lean(x[:1], pos, cache=model.empty_cache(1)),
                           model(x[:1], pos, cache=model.empty_cache(1)))
        model.attn_backend = "math"
        try:
            assert torch.equal(lean(x[:1], cache=model.empty_cache(1)), model(x[:1], cache=model.empty_cache(1)))
        finally:
            model.attn_backend = "sdpa"


@pytest.mark.parametrize("greedy", [True, False])
def test_speculative_decoding_through_lean_decoders_is_unchanged(pair, greedy):
    """Target and draft behind LeanDecoder: the same tokens as the plain models, greedy and sampled
    (same generator seed), and greedy equal to autoregressive decoding."""
    target, draft = pair
    prompt = ids(1, 6)
    kw = dict(max_new_tokens=24, gamma=4, greedy=greedy)
    plain, _ = speculative_generate(target, DraftModel(draft), prompt, generator=gen(3), **kw)
    lean, _ = speculative_generate(LeanDecoder(target), DraftModel(LeanDecoder(draft)), prompt,
                                   generator=gen(3), **kw)
    assert torch.equal(plain, lean)
    if greedy:
        assert torch.equal(lean, autoregressive_generate(target, prompt, max_new_tokens=24, greedy=True))


def test_benchmark_reports_on_passages_it_never_tuned_on():
    """The speculative benchmark's held-out prompts (and copy-task passages) and its tuning ones:
    at least 32 reported, windows (prompt and continuation) that never overlap."""
    from refimpl.bench import passage_starts
    from refimpl.benchmarks import speculative as bench
    from refimpl.data import CharTokenizer, splits
    n = len(splits(CharTokenizer.from_corpus())[1])
    for length in (bench.PROMPT_LEN + bench.NEW_TOKENS, 2 * bench.COPY_LEN):
        held = passage_starts(n, bench.HELD_OUT, 0.25, length)
        tune = passage_starts(n, bench.TUNING, 0.5, length)
        windows = sorted((s, s + length) for s in held + tune)
        assert len(set(held)) == bench.HELD_OUT >= 32 and len(set(tune)) == bench.TUNING
        assert all(a[1] <= b[0] for a, b in zip(windows, windows[1:])) and windows[-1][1] <= n
