"""Workbench benchmark: generation speed of the draft and target checkpoints, over a set of
validation prompts (per prompt, the four configurations back to back; medians and spread)."""
import statistics

import matplotlib.pyplot as plt
import torch
from tqdm.auto import tqdm

from refimpl.bench import box_and_dots, median_seconds, passage_starts, print_table, summary, write_results
from refimpl.data import CharTokenizer, splits
from refimpl.lm import generate, load

PROMPTS = 32  # validation passages


def seconds_per_generation(model, prompt: torch.Tensor, new_tokens: int, use_cache: bool,
                           repeats: int = 5, warmup: int = 1) -> float:
    """Median seconds of one greedy generation of ``new_tokens`` after ``prompt`` [1, P] (chapter
    0's live re-run calls this too)."""
    return median_seconds(lambda: generate(model, prompt, new_tokens, temperature=0,
                                           use_cache=use_cache), repeats, warmup)


def run(prompt_len: int = 16, new_tokens: int = 128, repeats: int = 1, prompts: int = PROMPTS) -> dict:
    """Greedy generation tokens/s, with and without the KV cache, for draft and target, on
    ``prompts`` validation passages."""
    _, val_ids = splits(CharTokenizer.from_corpus())
    starts = passage_starts(len(val_ids), prompts, 0.25, prompt_len + new_tokens)
    models = {name: load(name) for name in ("draft", "target")}
    configs = [(name, use_cache) for name in models for use_cache in (True, False)]
    per = {cfg: [] for cfg in configs}  # seconds per prompt
    for s in tqdm(starts, desc="workbench prompts"):
        prompt = val_ids[s:s + prompt_len][None]
        for name, use_cache in configs:
            per[name, use_cache].append(
                seconds_per_generation(models[name], prompt, new_tokens, use_cache, repeats,
                                       warmup=int(s == starts[0])))
    rows = []
    for (name, use_cache), seconds in per.items():
        tps = [new_tokens / t for t in seconds]
        s = summary(tps)
        rows.append({"model": name, "kv_cache": use_cache, "params": models[name].num_parameters(),
                     "tokens_per_s": s["median"], "tokens_per_s_iqr": s["iqr"],
                     "tokens_per_s_range": s["range"],
                     "ms_per_token": 1e3 * statistics.median(seconds) / new_tokens,
                     "per_prompt_tokens_per_s": tps})
    print_table([{k: v for k, v in r.items() if not k.startswith(("per_prompt", "tokens_per_s_"))}
                 for r in rows])
    # per prompt: target ms/token over draft ms/token, the two runs adjacent (KV cache)
    ratios = [t / d for t, d in zip(per["target", True], per["draft", True])]
    ratio = summary(ratios)
    print(f"draft is {ratio['median']:.1f}x cheaper per generated token than target (KV cache, "
          f"batch 1; median over {prompts} prompts, {ratio['range'][0]:.1f}-{ratio['range'][1]:.1f})")
    results = {"prompt_len": prompt_len, "new_tokens": new_tokens, "prompts": prompts,
               "prompt_starts": starts, "rows": rows, "draft_cost_ratio": ratio["median"],
               "draft_cost_ratio_iqr": ratio["iqr"], "draft_cost_ratio_range": ratio["range"],
               "per_prompt_draft_cost_ratio": ratios}
    write_results("workbench", results, plot)
    return results


def plot(results):
    """figures/bench_workbench.png from the results (also from the JSON): tokens/s of each
    configuration, one dot per prompt, boxes the quartiles."""
    rows = results["rows"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    box_and_dots(ax, [r["per_prompt_tokens_per_s"] for r in rows],
                 ["C0" if r["kv_cache"] else "C1" for r in rows], width=0.5, jitter=0.15)
    ax.set_xticks(range(1, len(rows) + 1),
                  [f"{r['model']}\n{'KV cache' if r['kv_cache'] else 'no cache'}" for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("tokens / s (greedy, batch 1)")
    ax.set_title(f"Workbench generation, {results['new_tokens']} tokens after each of "
                 f"{results['prompts']} prompts, {results['environment']['threads']} thread(s)",
                 fontsize=10)
    fig.tight_layout()
    return fig
