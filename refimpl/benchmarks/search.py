"""Beam search benchmark: our cache-reordering loop vs HF ``generate`` on the same HF model.

Both decode the same prompts with the same settings in the same run; the outputs are
checked identical before any timing counts. Throughput = generated tokens per second
(prompts x max_new_tokens; EOS is never produced by these settings' random weights, and
the check would catch a difference if it were).

A third timing runs the model calls of our loop and nothing else (the prompts once, then
max_new_tokens - 1 one-token steps of every beam, no search, no cache reordering): no loop around
the same forward passes can beat HF by more than t_hf / t_forwards, the "ceiling" column.
"""
import matplotlib.pyplot as plt
import torch
import transformers
from tqdm.auto import tqdm
from transformers import GPT2Config, GPT2LMHeadModel

from refimpl.bench import interleaved_seconds, print_table, write_results
from refimpl.hf import HFCausalLM
from refimpl.search import Stepper, beam_search

# GPT-2 shapes with random weights: name -> (n_layer, n_embd, vocab_size). In the second the
# lm head over GPT-2's 50257 tokens costs ~4x the transformer body per token.
MODELS = {"gpt2 6x384, V=8192": (6, 384, 8192), "gpt2 4x256, V=50257": (4, 256, 50257)}
CASES = [  # (model, prompt_len, num_beams, num_beam_groups, diversity_penalty)
    ("gpt2 6x384, V=8192", 32, 4, 1, 0.0), ("gpt2 6x384, V=8192", 32, 8, 1, 0.0),
    ("gpt2 6x384, V=8192", 32, 4, 2, 0.5), ("gpt2 6x384, V=8192", 32, 8, 4, 0.5),
    ("gpt2 6x384, V=8192", 128, 4, 1, 0.0), ("gpt2 6x384, V=8192", 128, 8, 1, 0.0),
    ("gpt2 4x256, V=50257", 32, 4, 1, 0.0), ("gpt2 4x256, V=50257", 32, 8, 1, 0.0)]


def model(n_layer: int = 6, n_embd: int = 384, vocab_size: int = 8192, seed: int = 0):
    """A GPT-2 of the given shape with random weights (64-dim heads)."""
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_embd // 64, vocab_size=vocab_size,
                        n_positions=256, bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
    return GPT2LMHeadModel(config).eval()


def plot(results):
    """figures/bench_search.png from the results (also from the JSON): one row per setting."""
    rows = results["rows"][::-1]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.6))
    y = torch.arange(len(rows)).float()
    ax.barh(y + 0.2, [r["hf_tokens_per_s"] for r in rows], 0.4, label="HF generate")
    ax.barh(y - 0.2, [r["ours_tokens_per_s"] for r in rows], 0.4, label="refimpl beam_search")
    ax.vlines([r["forwards_tokens_per_s"] for r in rows], y - 0.45, y + 0.45, colors="k", lw=1.5,
              label="forward passes alone (ceiling)")
    right = max(max(r["forwards_tokens_per_s"], r["ours_tokens_per_s"]) for r in rows)
    for i, r in enumerate(rows):
        ax.text(max(r["forwards_tokens_per_s"], r["ours_tokens_per_s"]) + 0.02 * right, i,
                f"{r['speedup']:.2f}x", va="center", fontsize=9)
    ax.set_xlim(0, 1.15 * right)
    labels = [f"{r['model'].split(', ')[0].removeprefix('gpt2 ')}, P {r['prompt_len']}, "
              f"B {r['num_beams']}, G {r['groups']}" for r in rows]
    ax.set_yticks(y.tolist(), labels, fontsize=9)
    ax.set_xlabel("generated tokens / s (label: speed-up over HF)")
    shapes = ", ".join(name.removeprefix("gpt2 ").replace(", V=", " with V = ") for name in results["models"])
    ax.set_title(f"Beam search vs HF generate: GPT-2 {shapes}, random weights,\n"
                 f"batch {results['batch']}, prompt P, {results['new_tokens']} new tokens, "
                 f"B beams in G groups, {results['environment']['threads']} thread", fontsize=10)
    ax.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.45, -0.16), ncol=3, frameon=False)
    fig.tight_layout()
    return fig


def run(batch: int = 2, new_tokens: int = 32, repeats: int = 5) -> dict:
    transformers.logging.set_verbosity_error()
    rows, models = [], {name: model(*shape) for name, shape in MODELS.items()}
    for name, prompt_len, B, G, dp in tqdm(CASES, desc="search"):
        hf = models[name]
        ours = HFCausalLM(hf)
        prompts = torch.randint(0, hf.config.vocab_size - 1, (batch, prompt_len),
                                generator=torch.Generator().manual_seed(0))
        kw = dict(num_beams=B, num_beam_groups=G, diversity_penalty=dp, max_new_tokens=new_tokens,
                  eos_token_id=hf.config.eos_token_id, pad_token_id=hf.config.eos_token_id,
                  num_return_sequences=B)

        def run_hf():
            with torch.no_grad():
                return hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                   min_new_tokens=0, **kw)

        def run_ours():
            return beam_search(ours, prompts, **kw).sequences

        @torch.no_grad()
        def run_forwards():
            stepper = Stepper(ours, prompts)
            stepper.prompt(B)
            step_tokens = torch.zeros(batch * B, dtype=torch.long)
            for _ in range(new_tokens - 1):
                stepper.step(step_tokens)

        same = torch.equal(run_hf(), run_ours())
        if not same:
            raise AssertionError(f"outputs differ for num_beams={B}, groups={G}")
        t_hf, t_ours, t_forwards = interleaved_seconds(run_hf, run_ours, run_forwards, repeats=repeats)
        tokens = batch * new_tokens
        rows.append({"model": name, "prompt_len": prompt_len, "num_beams": B, "groups": G, "penalty": dp,
                     "identical": same,
                     "hf_tokens_per_s": tokens / t_hf, "ours_tokens_per_s": tokens / t_ours,
                     "speedup": t_hf / t_ours, "forwards_tokens_per_s": tokens / t_forwards,
                     "ceiling": t_hf / t_forwards})
    print_table(rows)

    results = {"models": {name: dict(zip(("n_layer", "n_embd", "vocab_size"), shape))
                          for name, shape in MODELS.items()},
               "batch": batch, "new_tokens": new_tokens, "repeats": repeats,
               "rows": rows}
    write_results("search", results, plot)
    return results
