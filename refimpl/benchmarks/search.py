"""Beam search benchmark: our loop vs HF ``generate`` on the same HF model.

Both decode the same prompts with the same settings in the same run; the outputs are
checked identical before any timing counts. Throughput = generated tokens per second
(prompts x max_new_tokens; EOS is never produced by these settings' random weights, and
the check would catch a difference if it were).

Two parts:

* the grid of short prompts (32 and 128 tokens), each setting on 16 batches of 2 random
  prompts (medians over the batches; per batch the three timed back to back twice, in the
  order a, b, c, c, b, a, so that a drifting machine favours none, and averaged), ours with
  the shared-prefix cache. A third timing runs the model calls of our loop and nothing else (the prompts once, then
  max_new_tokens - 1 one-token steps of every beam, no search, no reordering): no loop
  around the same forward passes can beat HF by more than t_hf / t_forwards, the
  "ceiling" column, and ours / ceiling is the share of the time our loop spends in them;
* long prompts (128 to 2048 tokens), 8 beams, 128 new tokens, on the GPT-2-vocabulary
  model: HF, our loop with a plain cache (the prompt copied into every beam, as HF),
  with the shared-prefix cache, and with the shared-prefix cache and the vocabulary-major
  LM head (``HFCausalLM(vocab_major_head=True)``), each prompt's four runs back to back,
  on 32 prompts at every length;
  the KV-cache bytes of each, and at 1024 tokens how far each raises the resident memory of a
  fresh process.

The vocabulary-major head is used for the 50257-token model only: chapter 2 times the
head's product both ways on random rows, and only at a large vocabulary is it faster.
"""
import json
import statistics
import subprocess
import sys
import time

import matplotlib.pyplot as plt
import torch
import transformers
from tqdm.auto import tqdm
from transformers import GPT2Config, GPT2LMHeadModel

from refimpl.bench import paired_seconds, print_table, summary, write_results
from refimpl.hf import HFCausalLM
from refimpl.search import SharedPrefixStepper, Stepper, beam_search

# GPT-2 shapes with random weights: name -> (n_layer, n_embd, vocab_size, vocab-major head). In
# the second the lm head over GPT-2's 50257 tokens costs ~4x the transformer body per token.
MODELS = {"gpt2 6x384, V=8192": (6, 384, 8192, False), "gpt2 4x256, V=50257": (4, 256, 50257, True)}
CASES = [  # (model, prompt_len, num_beams, num_beam_groups, diversity_penalty)
    ("gpt2 6x384, V=8192", 32, 4, 1, 0.0), ("gpt2 6x384, V=8192", 32, 8, 1, 0.0),
    ("gpt2 6x384, V=8192", 32, 4, 2, 0.5), ("gpt2 6x384, V=8192", 32, 8, 4, 0.5),
    ("gpt2 6x384, V=8192", 128, 4, 1, 0.0), ("gpt2 6x384, V=8192", 128, 8, 1, 0.0),
    ("gpt2 4x256, V=50257", 32, 4, 1, 0.0), ("gpt2 4x256, V=50257", 32, 8, 1, 0.0)]
LONG_MODEL, LONG_BEAMS, LONG_NEW, TARGET_LEN = "gpt2 4x256, V=50257", 8, 128, 1024
PROMPT_LENGTHS = (128, 256, 512, 1024, 2048)
METHODS = ("hf", "plain", "shared", "shared + vocab-major head")
POSITIONS = 2048 + 128
COLORS = {"hf": "k", "plain": "C0", "shared": "C1", "shared + vocab-major head": "C2"}


def model(n_layer: int = 6, n_embd: int = 384, vocab_size: int = 8192, seed: int = 0):
    """A GPT-2 of the given shape with random weights (64-dim heads)."""
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_embd // 64, vocab_size=vocab_size,
                        n_positions=POSITIONS, bos_token_id=vocab_size - 1,
                        eos_token_id=vocab_size - 1)
    return GPT2LMHeadModel(config).eval()


def long_model():
    return model(*MODELS[LONG_MODEL][:3])


def decoders(hf, prompts, num_beams, new_tokens, groups=1, penalty=0.0, vocab_major=True):
    """The four ways of decoding ``prompts`` (METHODS), each a function returning the sequences."""
    kw = dict(num_beams=num_beams, num_beam_groups=groups, diversity_penalty=penalty,
              max_new_tokens=new_tokens, eos_token_id=hf.config.eos_token_id,
              pad_token_id=hf.config.eos_token_id, num_return_sequences=num_beams)
    plain_head, fast_head = HFCausalLM(hf), HFCausalLM(hf, vocab_major_head=vocab_major)

    def run_hf():
        with torch.no_grad():
            return hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                               min_new_tokens=0, **kw)
    return {"hf": run_hf,
            "plain": lambda: beam_search(plain_head, prompts, shared_prefix=False, **kw).sequences,
            "shared": lambda: beam_search(plain_head, prompts, **kw).sequences,
            "shared + vocab-major head": lambda: beam_search(fast_head, prompts, **kw).sequences}


@torch.no_grad()
def forwards(ours, prompts, num_beams, new_tokens, shared=True):
    """Our loop's model calls alone; returns the cache they leave."""
    stepper = (SharedPrefixStepper if shared else Stepper)(ours, prompts, None, new_tokens)
    stepper.prompt(num_beams)
    step_tokens = torch.zeros(prompts.shape[0] * num_beams, dtype=torch.long)
    for _ in range(new_tokens - 1):
        stepper.step(step_tokens)
    return stepper.cache


def hf_cache_bytes(hf, prompts, num_beams, new_tokens) -> int:
    with torch.no_grad():
        out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                          num_beams=num_beams, max_new_tokens=new_tokens, min_new_tokens=0,
                          eos_token_id=hf.config.eos_token_id, pad_token_id=hf.config.eos_token_id,
                          return_dict_in_generate=True)
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in out.past_key_values.layers)


def prompt_set(vocab, length, count, seed=0, rows=1):
    """``count`` batches of ``rows`` random prompts of ``length`` tokens."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab - 1, (rows, length), generator=g) for _ in range(count)]


def rss_rise_mib(method: str, prompt_len: int = TARGET_LEN) -> float:
    """How far a fresh process's resident memory rises above its level with the long model
    built while it runs ``method`` once, MiB (Linux: the peak is reset through
    /proc/self/clear_refs after the build, then read as VmHWM)."""
    proc = subprocess.run([sys.executable, "-m", "refimpl.benchmarks.search", method, str(prompt_len)],
                          capture_output=True, text=True, check=True, timeout=900)
    return float(proc.stdout.strip().splitlines()[-1])


def _status_mib(field):
    line = next(ln for ln in open("/proc/self/status") if ln.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _rss_rise_main(method, prompt_len):
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    hf, prompt = long_model(), prompt_set(MODELS[LONG_MODEL][2], prompt_len, 1)[0]
    run = decoders(hf, prompt, LONG_BEAMS, LONG_NEW)[method]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) starts again from the current RSS
    before = _status_mib("VmRSS")
    run()
    print(_status_mib("VmHWM") - before)


def head_product_ms(models, rows=(1, 2, 4, 8, 16, 32), repeats=9) -> list[dict]:
    """The LM head's product for a few rows, h W^T (nn.Linear, HF's) vs (W h^T)^T
    (``vocab_major_head``), milliseconds, medians of adjacent pairs, per model."""
    out = []
    for name, hf in models.items():
        W = hf.get_output_embeddings().weight.detach()
        for r in rows:
            h = torch.randn(r, W.shape[1])
            times = paired_seconds({"linear": lambda: torch.nn.functional.linear(h, W),
                                    "vocab_major": lambda: (W @ h.T).T.contiguous()}, repeats)
            out.append({"model": name, "rows": r,
                        **{m: 1e3 * statistics.median(t) for m, t in times.items()}})
    return out


def run_grid(models, batches):
    """Per short setting, ``batches`` batches of 2 prompts: per batch the outputs checked identical,
    then HF, ours and our forward passes alone timed back to back and again in reverse order (a
    warm-up round on the first); the ratios per batch, and their medians and spread."""
    rows = []
    for name, prompt_len, B, G, dp in tqdm(CASES, desc="search, short prompts"):
        hf = models[name]
        ours = HFCausalLM(hf, vocab_major_head=MODELS[name][3])
        per = []
        for i, prompts in enumerate(prompt_set(hf.config.vocab_size, prompt_len, batches, rows=2)):
            run = decoders(hf, prompts, B, 32, G, dp, vocab_major=MODELS[name][3])
            fns = {"hf": run["hf"], "ours": run["shared + vocab-major head"],
                   "forwards": lambda prompts=prompts: forwards(ours, prompts, B, 32)}
            if not torch.equal(fns["hf"](), fns["ours"]()):
                raise AssertionError(f"outputs differ for num_beams={B}, groups={G}")
            if i == 0:
                fns["forwards"]()
            there = {m: timed(fns[m])[0] for m in fns}
            back = {m: timed(fns[m])[0] for m in reversed(fns)}
            per.append({m: (there[m] + back[m]) / 2 for m in fns})
        tokens = 2 * 32
        speedup = summary([t["hf"] / t["ours"] for t in per])
        share = summary([t["forwards"] / t["ours"] for t in per])
        rows.append({"model": name, "prompt_len": prompt_len, "num_beams": B, "groups": G,
                     "penalty": dp, "identical": True, "prompts": 2 * batches,
                     "hf_tokens_per_s": statistics.median(tokens / t["hf"] for t in per),
                     "ours_tokens_per_s": statistics.median(tokens / t["ours"] for t in per),
                     "forwards_tokens_per_s": statistics.median(tokens / t["forwards"] for t in per),
                     "speedup": speedup["median"], "speedup_iqr": speedup["iqr"],
                     "speedup_range": speedup["range"],
                     "ceiling": statistics.median(t["hf"] / t["forwards"] for t in per),
                     "share_of_ceiling": share["median"], "share_of_ceiling_range": share["range"],
                     "seconds": per})
    return rows


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def run_long(hf, prompts_per_length):
    """Per prompt length, each method once on a warm-up prompt, then on each of
    ``prompts_per_length`` prompts the four back to back, timed, their outputs checked identical."""
    rows, vocab = [], hf.config.vocab_size
    for length in tqdm(PROMPT_LENGTHS, desc="search, long prompts"):
        warm_up, *prompts = prompt_set(vocab, length, prompts_per_length + 1, seed=length)
        for fn in decoders(hf, warm_up, LONG_BEAMS, LONG_NEW).values():
            fn()
        per_prompt = []
        for prompt in prompts:
            runs = {m: timed(fn) for m, fn in decoders(hf, prompt, LONG_BEAMS, LONG_NEW).items()}
            if not all(torch.equal(runs["hf"][1], out) for _, out in runs.values()):
                raise AssertionError(f"outputs differ at prompt length {length}")
            per_prompt.append({m: t for m, (t, _) in runs.items()})
        ours = HFCausalLM(hf)
        kv = {"hf": hf_cache_bytes(hf, prompt, LONG_BEAMS, LONG_NEW),
              "plain": forwards(ours, prompt, LONG_BEAMS, LONG_NEW, shared=False).nbytes(),
              "shared": forwards(ours, prompt, LONG_BEAMS, LONG_NEW).nbytes()}
        speedups = {m: [p["hf"] / p[m] for p in per_prompt] for m in METHODS[1:]}
        rows.append({"prompt_len": length, "identical": True, "seconds": per_prompt,
                     "speedup": {m: statistics.median(s) for m, s in speedups.items()},
                     "speedup_range": {m: [min(s), max(s)] for m, s in speedups.items()},
                     "kv_bytes": kv, "kv_share": kv["shared"] / kv["hf"]})
    return rows


def plot(results):
    """figures/bench_search.png from the results (also from the JSON)."""
    rows = results["rows"][::-1]
    fig = plt.figure(figsize=(7, 0.4 * len(rows) + 5.6))
    grid = fig.add_gridspec(2, 2, height_ratios=[0.4 * len(rows) + 0.8, 3.0])
    ax = fig.add_subplot(grid[0, :])
    y = torch.arange(len(rows)).float()
    ax.barh(y + 0.2, [r["hf_tokens_per_s"] for r in rows], 0.4, label="HF generate")
    ax.barh(y - 0.2, [r["ours_tokens_per_s"] for r in rows], 0.4, label="refimpl beam_search")
    ax.vlines([r["forwards_tokens_per_s"] for r in rows], y - 0.45, y + 0.45, colors="k", lw=1.5,
              label="forward passes alone (ceiling)")
    tokens = results["batch"] * results["new_tokens"]
    for i, r in enumerate(rows):  # the spread: one dot per batch of prompts
        for m, dy in (("hf", 0.2), ("ours", -0.2)):
            ax.plot([tokens / t[m] for t in r["seconds"]], [i + dy] * len(r["seconds"]), ".",
                    color="0.15", ms=2.5, label="one batch" if i == 0 and m == "hf" else None)
    ends = [max(max(tokens / t[m] for t in r["seconds"] for m in ("hf", "ours")),
                r["forwards_tokens_per_s"]) for r in rows]
    right = max(ends)
    for i, (r, end) in enumerate(zip(rows, ends)):
        lo, hi = r["speedup_range"]
        ax.text(end + 0.02 * right, i, f"{r['speedup']:.2f}x ({lo:.2f}-{hi:.2f})", va="center",
                fontsize=8)
    ax.set_xlim(0, 1.3 * right)
    labels = [f"{r['model'].split(', ')[0].removeprefix('gpt2 ')}, P {r['prompt_len']}, "
              f"B {r['num_beams']}, G {r['groups']}" for r in rows]
    ax.set_yticks(y.tolist(), labels, fontsize=9)
    ax.set_xlabel("generated tokens / s (bars: medians)\nlabels: speed-up over HF, median (range)")
    shapes = ", ".join(name.removeprefix("gpt2 ").replace(", V=", " (V ") + ")"
                          for name in results["models"])
    ax.set_title(f"Short prompts: GPT-2 {shapes}, random weights,\nbatch "
                 f"{results['batch']}, prompt P, {results['new_tokens']} new tokens, B beams in G "
                 f"groups, {results['environment']['threads']} thread", fontsize=10)
    ax.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.45, -0.2), ncol=2, frameon=False)
    long = results["long"]
    lengths = [r["prompt_len"] for r in long]
    ax = fig.add_subplot(grid[1, 0])
    for m in METHODS[1:]:
        lo, hi = zip(*(r["speedup_range"][m] for r in long))
        ax.errorbar(lengths, [r["speedup"][m] for r in long], capsize=2, marker="o", ms=3,
                    yerr=[[r["speedup"][m] - a for r, a in zip(long, lo)],
                          [b - r["speedup"][m] for r, b in zip(long, hi)]], label=m,
                    color=COLORS[m])
    ax.axhline(1, color=COLORS["hf"], lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt length")
    ax.set_ylabel("speed-up over HF generate (median, range)")
    ax.set_title(f"{LONG_BEAMS} beams, {LONG_NEW} new tokens,\n{LONG_MODEL.removeprefix('gpt2 ')}",
                 fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    ax = fig.add_subplot(grid[1, 1])
    for m in ("hf", "plain", "shared"):
        ax.plot(lengths, [r["kv_bytes"][m] / 2 ** 20 for r in long], marker="o", ms=3, label=m,
                ls="--" if m == "plain" else "-", color=COLORS[m])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt length")
    ax.set_ylabel("KV cache, MiB")
    ax.set_title("KV-cache bytes at the end", fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def run(batches: int = 16, prompts_per_length: int = 32) -> dict:
    transformers.logging.set_verbosity_error()
    models = {name: model(*shape[:3]) for name, shape in MODELS.items()}
    rows = run_grid(models, batches)
    print_table([{k: v for k, v in r.items() if k != "seconds"} for r in rows])
    long = run_long(models[LONG_MODEL], prompts_per_length)
    print_table([{"prompt_len": r["prompt_len"], **{m: r["speedup"][m] for m in METHODS[1:]},
                  "kv_share": r["kv_share"]} for r in long])
    head = head_product_ms(models)
    print_table(head)
    rss = {m: rss_rise_mib(m) for m in METHODS}
    print("resident memory rise while decoding, MiB, prompt", TARGET_LEN, json.dumps(rss))
    results = {"models": {name: dict(zip(("n_layer", "n_embd", "vocab_size", "vocab_major_head"),
                                         shape)) for name, shape in MODELS.items()},
               "batch": 2, "new_tokens": 32, "batches": batches, "rows": rows,
               "long": long, "long_setting": {"model": LONG_MODEL, "num_beams": LONG_BEAMS,
                                              "new_tokens": LONG_NEW, "target_len": TARGET_LEN,
                                              "prompts_per_length": prompts_per_length},
               "rss_rise_mib": rss, "head_product_ms": head}
    write_results("search", results, plot)
    return results


if __name__ == "__main__":
    _rss_rise_main(sys.argv[1], int(sys.argv[2]))
