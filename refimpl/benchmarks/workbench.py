"""Workbench benchmark: generation speed of the draft and target checkpoints."""
import matplotlib.pyplot as plt
import torch
from tqdm.auto import tqdm

from refimpl.bench import median_seconds, print_table, write_results
from refimpl.lm import generate, load


def seconds_per_generation(model, prompt_len: int, new_tokens: int, use_cache: bool,
                           repeats: int = 5, warmup: int = 1) -> float:
    """Median seconds of one greedy generation of ``new_tokens`` after a prompt of
    ``prompt_len`` zeros at batch 1 (chapter 0's live re-run calls this too)."""
    prompt = torch.zeros(1, prompt_len, dtype=torch.long)
    return median_seconds(lambda: generate(model, prompt, new_tokens, temperature=0,
                                           use_cache=use_cache), repeats, warmup)


def run(prompt_len: int = 16, new_tokens: int = 128, repeats: int = 5) -> dict:
    """Greedy generation tokens/s, with and without the KV cache, for draft and target."""
    rows = []
    for name in tqdm(["draft", "target"], desc="workbench"):
        model = load(name)
        for use_cache in (True, False):
            sec = seconds_per_generation(model, prompt_len, new_tokens, use_cache, repeats)
            rows.append({"model": name, "kv_cache": use_cache, "params": model.num_parameters(),
                         "tokens_per_s": new_tokens / sec, "ms_per_token": 1e3 * sec / new_tokens})
    print_table(rows)
    cost = {r["model"]: r["ms_per_token"] for r in rows if r["kv_cache"]}
    ratio = cost["target"] / cost["draft"]
    print(f"draft is {ratio:.1f}x cheaper per generated token than target (KV cache, batch 1)")

    results = {"prompt_len": prompt_len, "new_tokens": new_tokens, "rows": rows,
               "draft_cost_ratio": ratio}
    write_results("workbench", results, plot)
    return results


def plot(results):
    """figures/bench_workbench.png from the results (also from the JSON)."""
    rows = results["rows"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = [f"{r['model']}\n{'KV cache' if r['kv_cache'] else 'no cache'}" for r in rows]
    ax.bar(labels, [r["tokens_per_s"] for r in rows], color=["C0", "C1", "C0", "C1"])
    ax.set_ylabel("tokens / s (greedy, batch 1)")
    ax.set_title(f"Workbench generation, {results['new_tokens']} tokens, "
                 f"{results['environment']['threads']} thread(s)")
    fig.tight_layout()
    return fig
