"""Speculative decoding benchmark, over sets of prompts: autoregressive vs speculative decoding of
the workbench target (batch 1, one thread), with each drafter, greedy and at temperature 1, beside
the theory (Leviathan et al. 2022: E[tokens/call] = (1 - a^(g+1)) / (1 - a), gain / (g c + 1));
and prompt lookup on a copy-heavy editing task (refimpl.editing) with the target and with the
editor, the target fine-tuned for that task.

Every reported number is a median over HELD_OUT validation passages (with the interquartile range
and the range), and the draft lengths are chosen on TUNING other passages: a gamma sweep of each
draft model (greedy) and of prompt lookup on the copy task. Per prompt, the speed-up is the
median over ``repeats`` adjacent pairs of one autoregressive and one speculative run, in
alternating order. The JSON keeps every prompt's values.

``LeanDecoder`` rows run every model call of both sides, the autoregressive baseline included,
through ``refimpl.speculative.LeanDecoder`` (the same numbers without nn.Module dispatch). The
LSTM draft (``refimpl.recurrent``, checkpoint ``draft_lstm``) drafts through the same
``DraftModel`` as the transformer drafts.
"""
import statistics
import time

import matplotlib.pyplot as plt
import torch
from tqdm.auto import tqdm

from refimpl.bench import (box_and_dots, interleaved_seconds, passage_starts, print_table, summary,
                           write_results)
from refimpl.data import CharTokenizer, splits
from refimpl.editing import correction_score, edit_example, sample_passage
from refimpl.lm import load
from refimpl.speculative import (AdaptiveGamma, DraftModel, LeanDecoder, NGramTable, PromptLookup,
                                 acceptance_rate, autoregressive_generate, expected_speedup,
                                 expected_tokens_per_call, speculative_generate)

HELD_OUT, TUNING = 32, 8  # validation passages: reported, and for choosing the draft lengths
PROMPT_LEN, NEW_TOKENS = 32, 160
GAMMAS = (2, 4, 6, 8, 10, 12, 16)  # the draft models' sweep, on the tuning passages
COPY_GAMMAS = (4, 8, 12, 16, 24)  # prompt lookup with the editor on the copy task, likewise
COPY_LEN = 112  # characters of a copy-task passage
EXAMPLE_START = 5000  # chapter 5's example passage (neither a tuning nor a held-out one)
LEAN = "distilled draft model, LeanDecoder"
LSTM = "LSTM draft model"  # refimpl.recurrent, distilled like the distilled draft
MODELS = {"draft model": "draft", "distilled draft model": "draft_distilled",
          LEAN: "draft_distilled", LSTM: "draft_lstm"}  # drafter -> checkpoint, the ones tuned


def paired_speedup(ar, sp, repeats: int):
    """Median over ``repeats`` adjacent pairs of t(ar) / t(sp), the order alternating; and the
    two functions' last outputs."""
    ratios, out = [], {}
    for r in range(repeats):
        seconds = {}
        for name, fn in ((("ar", ar), ("sp", sp)) if r % 2 == 0 else (("sp", sp), ("ar", ar))):
            start = time.perf_counter()
            out[name] = fn()
            seconds[name] = time.perf_counter() - start
        ratios.append(seconds["ar"] / seconds["sp"])
    return statistics.median(ratios), out["ar"], out["sp"]


def copy_task(tok, val_ids, start: int = EXAMPLE_START, num_typos: int = 3, seed: int = 0,
              length: int = COPY_LEN):
    """The copy-heavy editing task (refimpl.editing): the held-out passage at ``start`` with
    ``num_typos`` misspelt words and SEP, as (prompt ids [1, P], the correct answer as text)."""
    passage = sample_passage(tok.decode(val_ids), length, start=start)
    prompt, answer = edit_example(passage, num_typos, torch.Generator().manual_seed(seed))
    return torch.tensor([tok.encode(prompt)]), answer


@torch.no_grad()
def measured_alpha(target, draft, seq, start, greedy, temperature=1.0):
    """Mean per-position acceptance probability along ``seq`` after ``start``: sum min(p, q)
    (sampling) or P(argmax agree) (greedy); the a of the theory."""
    lp, lq = target(seq)[0, start - 1:-1], draft(seq)[0, start - 1:-1]
    if greedy:
        return float((lp.argmax(-1) == lq.argmax(-1)).double().mean())
    return float(acceptance_rate(torch.softmax(lp / temperature, -1),
                                 torch.softmax(lq / temperature, -1)).mean())


def run_prompt(target, make_drafter, prompt, gamma, greedy, repeats, seed, model=None):
    """One prompt: the paired speed-up, the speculative run's statistics, whether its output equals
    autoregressive decoding (greedy), and the draft model's a along that output."""
    def ar():
        return autoregressive_generate(target, prompt, max_new_tokens=NEW_TOKENS, greedy=greedy,
                                       generator=torch.Generator().manual_seed(seed))

    def sp():
        return speculative_generate(target, make_drafter(), prompt, max_new_tokens=NEW_TOKENS,
                                    gamma=gamma, greedy=greedy,
                                    generator=torch.Generator().manual_seed(seed))
    speedup, reference, (out, stats) = paired_speedup(ar, sp, repeats)
    row = {"speedup": speedup, "tokens_per_call": stats.tokens_per_call,
           "acceptance": stats.acceptance_rate}
    if greedy:
        row["same_output"] = bool(torch.equal(out, reference))
    if model is not None:
        row["alpha"] = measured_alpha(target, model, out, prompt.shape[1], greedy)
        row["theory_tokens_per_call"] = expected_tokens_per_call(row["alpha"], gamma)
    return row


def aggregate(per_prompt: list[dict], **fields) -> dict:
    """A row of the results: the medians of the per-prompt values, with the spread of the
    speed-up, and the per-prompt values themselves."""
    s = summary([p["speedup"] for p in per_prompt])
    row = {**fields, "speedup": s["median"], "speedup_iqr": s["iqr"], "speedup_range": s["range"]}
    for key in ("tokens_per_call", "acceptance", "alpha", "theory_tokens_per_call"):
        if key in per_prompt[0]:
            row[key] = statistics.median(p[key] for p in per_prompt)
    if "same_output" in per_prompt[0]:
        row["same_output"] = all(p["same_output"] for p in per_prompt)
    else:
        row["same_output"] = "n/a (sampled)"
    return {**row, "per_prompt": per_prompt}


def plot(results):
    """figures/bench_speculative.png from the results (also from the JSON): every drafter's
    per-prompt speed-ups on the held-out passages on top; below, the gamma sweep of each draft
    model on the tuning passages against the theory."""
    fig = plt.figure(figsize=(7, 9.4), layout="constrained")
    upper, lower = fig.subfigures(2, 1, height_ratios=(1.45, 1))
    top = upper.subplots()
    left, right = lower.subplots(1, 2)
    rows = results["rows"]
    colors = {"greedy": "C0", "T=1": "C1"}
    box_and_dots(top, [[p["speedup"] for p in r["per_prompt"]] for r in rows],
                 [colors.get(r["mode"], "C2") for r in rows], width=0.6, jitter=0.22,
                 vertical=False)
    top.set_yticks(range(1, len(rows) + 1), [f"{r['drafter']} ({r['mode']})" for r in rows],
                   fontsize=8)
    top.invert_yaxis()
    top.axvline(1, color="k", lw=0.8)
    top.axvline(2, color="k", lw=0.6, ls=":")
    top.set_xlabel("speed-up over autoregressive decoding, one dot per prompt")
    top.set_title(f"Every drafter on {results['held_out']} held-out passages (box: quartiles)\n"
                  "blue: greedy, orange: T = 1, green: copy task", fontsize=10)
    c = results["c"]
    for name, color in zip(MODELS, ("C0", "C3", "C4", "C5")):
        part = [s for s in results["gamma_sweep"] if s["drafter"] == name]
        gs = [s["gamma"] for s in part]
        short = name.replace(" model", "").replace("distilled draft, ", "")
        same = " (= distilled)" if name == LEAN else ""
        left.plot(gs, [s["tokens_per_call"] for s in part], "o-", color=color,
                  label=f"{short}{same}, a = {part[0]['alpha']:.2f}")
        left.plot(gs, [s["theory_tokens_per_call"] for s in part], "--", color=color)
        right.errorbar(gs, [s["speedup"] for s in part],
                       yerr=[[s["speedup"] - s["speedup_iqr"][0] for s in part],
                             [s["speedup_iqr"][1] - s["speedup"] for s in part]],
                       fmt="o-", color=color, capsize=2, label=f"{short}, c = {c[name]:.2f}")
        right.plot(gs, [s["theory_speedup"] for s in part], "--", color=color)
    copy = results["copy_task_gamma_sweep"]
    right.plot([s["gamma"] for s in copy], [s["speedup"] for s in copy], "^-", color="C2",
               label="prompt lookup, editor")
    right.axhline(2, color="k", lw=0.6)
    left.set_title("tokens per target call", fontsize=10)
    right.set_title("speed-up (bars: quartiles)", fontsize=10)
    for ax in (left, right):
        ax.set_xlabel("gamma (draft tokens per round)")
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    lower.suptitle(f"Gamma sweep, greedy, medians over {results['tuning']} tuning passages;\n"
                   "solid: measured, dashed: theory with the measured a, c", fontsize=10)
    return fig


def cost_ratios(models, prompts):
    """ms per generated token of each model's autoregressive decoding, the models interleaved,
    median over ``prompts``; c = a draft's ms per token over the target's (both plain, or both
    through LeanDecoder)."""
    per = {name: [] for name in models}
    for prompt in prompts:
        fns = [lambda m=m: autoregressive_generate(m, prompt, max_new_tokens=NEW_TOKENS, greedy=True)
               for m in models.values()]
        for name, t in zip(models, interleaved_seconds(*fns, repeats=1)):
            per[name].append(1e3 * t / NEW_TOKENS)
    ms = {name: statistics.median(v) for name, v in per.items()}
    c = {"draft model": ms["draft"] / ms["target"],
         "distilled draft model": ms["draft_distilled"] / ms["target"],
         LEAN: ms["draft_distilled, LeanDecoder"] / ms["target, LeanDecoder"],
         LSTM: ms["draft_lstm"] / ms["target"]}
    return ms, c


def tune_gammas(target, lean_target, models, prompts, c, repeats):
    """The greedy gamma sweep of each draft model on the tuning prompts; returns the sweep and each
    drafter's gamma with the best median speed-up."""
    sweep = []
    for name, g in tqdm([(n, g) for n in MODELS for g in GAMMAS], desc="gamma sweep (tuning)"):
        model = models[MODELS[name]]
        tgt, drafter = (lean_target, LeanDecoder(model)) if name == LEAN else (target, model)
        per = [run_prompt(tgt, lambda: DraftModel(drafter), p, g, True, repeats, 0, model)
               for p in prompts]
        row = aggregate(per, drafter=name, gamma=g)
        row["theory_speedup"] = expected_speedup(row["alpha"], g, c[name])
        sweep.append(row)
    best = {name: max((s for s in sweep if s["drafter"] == name), key=lambda s: s["speedup"])["gamma"]
            for name in MODELS}
    return sweep, best


def copy_passages(tok, val_ids, starts, seed0):
    """Copy-task examples at ``starts``, seeds from ``seed0``, one to four typos in turn."""
    return [copy_task(tok, val_ids, s, 1 + i % 4, seed0 + i) for i, s in enumerate(starts)]


def run_copy_task(tok, name, model, passages, gamma, repeats):
    """Prompt lookup with ``model`` on the copy-task passages: the row of its speed-ups, and how
    well its greedy answers correct the typos (refimpl.editing.correction_score, summed)."""
    per = []
    for ids, answer in passages:
        def sp(ids=ids, n=len(answer)):
            return speculative_generate(model, PromptLookup(max_ngram=8), ids, max_new_tokens=n,
                                        gamma=gamma, greedy=True)

        def ar(ids=ids, n=len(answer)):
            return autoregressive_generate(model, ids, max_new_tokens=n, greedy=True)
        speedup, reference, (out, stats) = paired_speedup(ar, sp, repeats)
        written = tok.decode(out[0, ids.shape[1]:])
        per.append({"speedup": speedup, "tokens_per_call": stats.tokens_per_call,
                    "acceptance": stats.acceptance_rate, "same_output": bool(torch.equal(out, reference)),
                    "answer_correct": written == answer,
                    **correction_score(tok.decode(ids[0])[:-1], written, answer)})
    row = aggregate(per, drafter=f"prompt lookup, {name}", mode="greedy, copy task", gamma=gamma)
    for key in ("typos", "fixed", "distance_input", "distance_answer", "answer_correct"):
        row[key] = sum(p[key] for p in per)
    return row


def run(repeats: int = 2, held_out: int = HELD_OUT, tuning: int = TUNING) -> dict:
    tok = CharTokenizer.from_corpus()
    train_ids, val_ids = splits(tok)
    names = ("target", "draft", "draft_distilled", "draft_lstm", "editor")
    models = dict(zip(names, (load(n) for n in names)))
    target, lean_target = models["target"], LeanDecoder(models["target"])
    window = PROMPT_LEN + NEW_TOKENS
    held_starts = passage_starts(len(val_ids), held_out, 0.25, window)
    tune_starts = passage_starts(len(val_ids), tuning, 0.5, window)
    prompts = [val_ids[s:s + PROMPT_LEN][None] for s in held_starts]
    tune_prompts = [val_ids[s:s + PROMPT_LEN][None] for s in tune_starts]
    results = {"new_tokens": NEW_TOKENS, "prompt_tokens": PROMPT_LEN, "repeats": repeats,
               "held_out": held_out, "tuning": tuning, "held_out_starts": held_starts,
               "tuning_starts": tune_starts}

    ms, c = cost_ratios({"target": target, "draft": models["draft"],
                         "draft_distilled": models["draft_distilled"], "draft_lstm": models["draft_lstm"],
                         "target, LeanDecoder": lean_target,
                         "draft_distilled, LeanDecoder": LeanDecoder(models["draft_distilled"])},
                        tune_prompts)
    results.update(ms_per_token=ms, c=c, c_draft=c["draft model"],
                   c_distilled=c["distilled draft model"])
    sweep, best = tune_gammas(target, lean_target, models, tune_prompts, c, repeats=1)
    results.update(gamma_sweep=sweep, tuned_gamma=best)

    table = NGramTable.from_tokens(train_ids, tok.vocab_size, order=4)
    draft, distilled, lstm = models["draft"], models["draft_distilled"], models["draft_lstm"]
    lean_draft = LeanDecoder(distilled)
    # drafter -> (target, a fresh drafter, gamma, the draft model whose a is measured)
    drafters = {
        "draft model": (target, lambda: DraftModel(draft), best["draft model"], draft),
        "distilled draft model": (target, lambda: DraftModel(distilled),
                                  best["distilled draft model"], distilled),
        LEAN: (lean_target, lambda: DraftModel(lean_draft), best[LEAN], distilled),
        LSTM: (target, lambda: DraftModel(lstm), best[LSTM], lstm),
        "draft model, BiLD fallback 0.5": (target, lambda: DraftModel(draft, stop_below=0.5), 4, None),
        "draft model, adaptive gamma": (target, lambda: AdaptiveGamma(DraftModel(draft), start=4,
                                                                      max_gamma=8), 8, None),
        "n-gram table (order 4)": (target, lambda: table, 4, None),
        "prompt lookup": (target, lambda: PromptLookup(max_ngram=8), 4, None)}
    rows = []
    cases = [(name, mode) for mode in ("greedy", "T=1") for name in drafters]
    for name, mode in tqdm(cases, desc=f"drafters x {held_out} held-out prompts"):
        tgt, make, gamma, model = drafters[name]
        per = [dict(start=s, **run_prompt(tgt, make, p, gamma, mode == "greedy", repeats, 1234 + i,
                                          model))
               for i, (s, p) in enumerate(zip(held_starts, prompts))]
        row = aggregate(per, drafter=name, mode=mode, gamma=gamma)
        if model is not None:
            row["theory_speedup"] = expected_speedup(row["alpha"], gamma, c[name])
        rows.append(row)
    greedy = {r["drafter"]: r for r in rows if r["mode"] == "greedy"}
    results.update(alpha_greedy=greedy["draft model"]["alpha"],
                   alpha_greedy_distilled=greedy["distilled draft model"]["alpha"])

    # the copy-heavy editing task: prompt lookup vs autoregressive decoding, greedy, with the
    # target and with the editor; the draft length chosen with the editor on tuning passages
    copy_starts = passage_starts(len(val_ids), held_out, 0.25, COPY_LEN)
    copy_tune = copy_passages(tok, val_ids, passage_starts(len(val_ids), tuning, 0.5, COPY_LEN),
                              1000)
    copy_sweep = []
    for g in tqdm(COPY_GAMMAS, desc="copy-task gamma sweep (tuning)"):
        r = run_copy_task(tok, "editor", models["editor"], copy_tune, g, 1)
        copy_sweep.append({k: r[k] for k in ("drafter", "gamma", "speedup", "speedup_iqr",
                                             "tokens_per_call")})
    copy_gamma = max(copy_sweep, key=lambda s: s["speedup"])["gamma"]
    copy_held = copy_passages(tok, val_ids, copy_starts, 0)
    rows += [run_copy_task(tok, name, models[name], copy_held, copy_gamma, repeats)
             for name in tqdm(("target", "editor"), desc="copy task")]
    results.update(rows=rows, copy_task_gamma_sweep=copy_sweep, copy_gamma=copy_gamma,
                   copy_starts=copy_starts)
    print_table([{k: v for k, v in s.items() if k != "per_prompt"} for s in sweep])
    print_table(copy_sweep)
    print_table([{k: (f"{v[0]:.2f}-{v[1]:.2f}" if k.endswith(("_iqr", "_range")) else v)
                  for k, v in r.items() if k in ("drafter", "mode", "gamma", "speedup", "speedup_iqr",
                                                 "speedup_range", "tokens_per_call", "same_output")}
                 for r in rows])
    write_results("speculative", results, plot)
    return results
