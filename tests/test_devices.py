"""Every tensor a decoding algorithm creates follows its model's and its inputs' device.

On the CPU this is proven with ``torch.set_default_device("meta")``: the models and inputs are
made on the CPU first, so a factory call inside the algorithm that does not name its device
makes a meta tensor and the run fails (mixing devices, or reading a meta value). Where CUDA is
present, the same runs happen on the GPU for real and must give the CPU's output.
"""
import pytest
import torch

from refimpl.hf import HFCausalLM
from refimpl.lm import GPTConfig, TinyGPT
from refimpl.packing import generate_packed, padding_free_prefill
from refimpl.search import beam_search, greedy_search
from refimpl.speculative import AdaptiveGamma, DraftModel, NGramTable, PromptLookup, speculative_generate
from tiny_hf import tiny_hf

V = 30


def models():
    torch.manual_seed(0)
    tiny = TinyGPT(GPTConfig(vocab_size=V, block_size=64, n_layer=2, n_head=2, n_embd=16)).eval()
    draft = TinyGPT(GPTConfig(vocab_size=V, block_size=64, n_layer=1, n_head=2, n_embd=16)).eval()
    return {"tiny": (tiny, draft),
            "gpt2": (HFCausalLM(tiny_hf("gpt2", vocab=V)), HFCausalLM(tiny_hf("gpt2", vocab=V, seed=1))),
            "llama": (HFCausalLM(tiny_hf("llama", vocab=V)), HFCausalLM(tiny_hf("llama", vocab=V, seed=1)))}


def runs(target, draft, device):
    """Each algorithm, on inputs made on ``device``; returns its outputs as lists."""
    g = torch.Generator(device).manual_seed(0)
    ids = torch.randint(4, V, (2, 7), generator=g, device=device)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    corpus = torch.randint(0, V, (500,), generator=g, device=device)
    drafters = {"model": lambda: DraftModel(draft), "lookup": lambda: PromptLookup(max_ngram=2),
                "ngram": lambda: NGramTable.from_tokens(corpus, V), "adaptive": lambda: AdaptiveGamma(DraftModel(draft))}
    out = {"greedy": greedy_search(target, ids, max_new_tokens=5, eos_token_id=3, attention_mask=mask),
           "beam": beam_search(target, ids, num_beams=3, max_new_tokens=5, eos_token_id=3,
                               attention_mask=mask).sequences,
           "diverse": beam_search(target, ids, num_beams=4, num_beam_groups=2, diversity_penalty=0.5,
                                  max_new_tokens=5, eos_token_id=3, attention_mask=mask).sequences,
           "packed": generate_packed(target, [ids[0], ids[1, 3:]], 4)}
    if isinstance(target, TinyGPT):
        out["padding_free"] = padding_free_prefill(target, [ids[0], ids[1, 3:]]).argmax(-1)
    for name, make in drafters.items():
        for rows in (1, 2):
            out[f"spec_{name}_{rows}"], _ = speculative_generate(target, make(), ids[:rows], max_new_tokens=6,
                                                                 gamma=3, greedy=True)
            sampled, _ = speculative_generate(target, make(), ids[:rows], max_new_tokens=6, gamma=3,
                                              generator=g)
            assert sampled.device.type == torch.device(device).type
    return {k: v.tolist() if torch.is_tensor(v) else v for k, v in out.items()}


@pytest.mark.parametrize("name", ["tiny", "gpt2", "llama"])
def test_decoding_creates_no_tensor_off_the_inputs_device(name, device):
    target, draft = models()[name]
    if device.type == "cpu":
        torch.set_default_device("meta")
        try:
            runs(target, draft, "cpu")
        finally:
            torch.set_default_device(None)
    else:
        want = runs(target, draft, "cpu")
        assert runs(target.to(device), draft.to(device), device) == want


def test_the_meta_trap_catches_a_factory_call_without_device():
    torch.set_default_device("meta")
    try:
        with pytest.raises((RuntimeError, NotImplementedError)):
            x = torch.ones(3)  # on the CPU: the input of the code under test
            bool((x + torch.arange(3)).sum() > 0)  # torch.arange without device: meta
    finally:
        torch.set_default_device(None)
