"""Every decoding algorithm of the book on eight Hugging Face families, against HF 4.56.2's own
``generate`` where it has the mode (greedy, beam, diverse beam, assisted and prompt-lookup
generation) and against the target's exact law where it has none (speculative sampling).

Models are the random-weight tiny ones of ``tiny_hf`` with an lm-head bias towards EOS, so
hypotheses finish; prompts are a left-padded batch.
"""
import pytest
import torch
import transformers

from refimpl.hf import HFCausalLM
from refimpl.packing import generate_packed
from refimpl.search import beam_search, greedy_search
from refimpl.speculative import DraftModel, PromptLookup, speculative_generate
from test_search import EOS, MAX_NEW, PAD, V, hf_generate, prompts
from tiny_hf import FAMILIES, bias_token, tiny_hf

transformers.logging.set_verbosity_error()
KW = dict(max_new_tokens=MAX_NEW, eos_token_id=EOS, pad_token_id=PAD)


def model(family, seed=0, vocab=V, scale=1.0, eos=True):
    """An lm-head bias towards EOS so that hypotheses finish, or with ``eos=False`` one so strong
    against it that EOS never comes (the packing and speculative paths decode a fixed length)."""
    m = tiny_hf(family, vocab=vocab, positions=128, seed=seed, eos_token_id=EOS, pad_token_id=PAD)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(scale)
    m.generation_config.eos_token_id = EOS
    return bias_token(m, EOS, 1.5 if eos else -1e4)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_beam_and_diverse_beam_equal_hf_generate(family):
    hf = model(family)
    ours, (ids, mask) = HFCausalLM(hf), prompts()
    got = greedy_search(ours, ids, attention_mask=mask, **KW)
    assert torch.equal(got, hf_generate(hf, ids, mask, **KW).sequences)
    for kw in (dict(num_beams=3), dict(num_beams=4, num_beam_groups=2, diversity_penalty=0.5)):
        kw.update(num_return_sequences=2, length_penalty=1.0)
        ref = hf_generate(hf, ids, mask, **KW, **kw)
        out = beam_search(ours, ids, attention_mask=mask, **KW, **kw)
        assert torch.equal(out.sequences, ref.sequences), kw
        torch.testing.assert_close(out.sequences_scores, ref.sequences_scores, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_generation_equals_hf_greedy_per_prompt(family):
    hf = model(family, eos=False)
    g = torch.Generator().manual_seed(2)
    ragged = [torch.randint(6, V, (n,), generator=g) for n in (5, 11, 3, 8)]
    want = [hf.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), do_sample=False,
                        max_new_tokens=6, pad_token_id=PAD)[0, len(p):].tolist()
            for p in ragged]
    assert generate_packed(HFCausalLM(hf), ragged, 6, capacity=16) == want


@pytest.mark.parametrize("family", FAMILIES)
def test_speculative_greedy_equals_hf_assisted_and_prompt_lookup(family):
    target_hf, draft_hf = model(family, scale=3.0, eos=False), model(family, seed=1, scale=3.0, eos=False)
    x = torch.randint(6, V, (1, 8), generator=torch.Generator().manual_seed(3))
    x = torch.cat([x, x[:, 2:6], x], 1)  # repeats, so that prompt lookup finds matches
    kw = dict(attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=16,
              pad_token_id=PAD)
    target = HFCausalLM(target_hf)
    for drafter, hf_kw in ((DraftModel(HFCausalLM(draft_hf)), dict(assistant_model=draft_hf)),
                           (PromptLookup(max_ngram=3), dict(prompt_lookup_num_tokens=4))):
        with torch.no_grad():
            want = target_hf.generate(x, **kw, **hf_kw)
        got, _ = speculative_generate(target, drafter, x, max_new_tokens=16, gamma=4, greedy=True)
        # HF's prompt lookup keeps every token of its last accepted round, so it may run past
        # max_new_tokens (4.56.2); what it generated within them is the comparison
        assert torch.equal(got, want[:, :got.shape[1]]), type(drafter).__name__


def exact_next_two(m, prompt, vocab):
    """P(x1, x2 | prompt) for all vocab**2 continuations, by uncached forward passes."""
    pairs = torch.cartesian_prod(torch.arange(vocab), torch.arange(vocab))
    x = torch.cat([prompt.expand(len(pairs), -1), pairs], 1)
    with torch.no_grad():
        logp = m(x).logits.log_softmax(-1)[:, prompt.shape[1] - 1:-1]
    return logp.gather(2, pairs[..., None])[..., 0].sum(1).exp()


@pytest.mark.parametrize("family", FAMILIES)
def test_speculative_sampling_follows_the_target_law(family):
    from test_speculative import chi2_pvalue
    vocab, rows = 8, 4000
    target_hf = model(family, vocab=vocab, scale=2.0, eos=False)
    draft = HFCausalLM(model(family, seed=1, vocab=vocab, scale=2.0, eos=False))
    prompt = torch.tensor([[6, 1, 2, 6, 1]])
    law = exact_next_two(target_hf, prompt, vocab)
    for drafter, n in ((DraftModel(draft), rows), (PromptLookup(max_ngram=2), rows // 4)):
        out, stats = speculative_generate(HFCausalLM(target_hf), drafter, prompt.expand(n, -1), max_new_tokens=2,
                                          gamma=2, temperature=1.0, generator=torch.Generator().manual_seed(4))
        counts = torch.bincount(out[:, 5] * vocab + out[:, 6], minlength=vocab ** 2).double()
        assert chi2_pvalue(counts, law) > 1e-3, type(drafter).__name__
        assert 0 < stats.acceptance_rate < 1  # both branches were taken
