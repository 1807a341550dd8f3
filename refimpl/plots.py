"""Plot helpers the chapters call, so that no notebook cell is mostly plotting code.

One section per chapter; each function carries its chapter's prefix (``workbench_``,
``pointer_``, ``search_``) and saves its figure under ``figures/``.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import torch
from matplotlib.patches import Rectangle

# --------------------------------------------------------------------------------------------
# Chapter 0, the workbench (notebooks/00_workbench.ipynb)
# --------------------------------------------------------------------------------------------

WORKBENCH_NEW = "#d95f02"  # computed at this step
WORKBENCH_CACHED = "#bdbdbd"  # read from the cache
WORKBENCH_DONE = "#f0f0f0"  # computed at earlier steps, not needed now


def _workbench_cells(ax, x0, y0, rows, cols, color, edge="black", lw=0.8, ls="-"):
    """A rows x cols grid of unit squares with lower-left corner (x0, y0)."""
    for r in range(rows):
        for c in range(cols):
            ax.add_patch(Rectangle((x0 + c, y0 + r), 1, 1, facecolor=color, edgecolor=edge,
                                   lw=lw, ls=ls))


def _workbench_step_panel(ax, t: int, cached: bool) -> None:
    """One decoding step at position t - 1: the K, V columns above the t x t score grid."""
    kv_y = t + 0.6  # two rows, K then V, above the scores
    for row, name in enumerate(("V", "K")):
        y = kv_y + row
        if cached:
            _workbench_cells(ax, 0, y, 1, t - 1, WORKBENCH_CACHED)
            _workbench_cells(ax, t - 1, y, 1, 1, WORKBENCH_NEW)
        else:
            _workbench_cells(ax, 0, y, 1, t, WORKBENCH_NEW)
        ax.text(-0.3, y + 0.5, name, ha="right", va="center", fontsize=10)
    for i in range(t):  # score rows: query i sees keys 0..i (drawn top to bottom)
        y = t - 1 - i
        last = i == t - 1
        color = WORKBENCH_NEW if (last or not cached) else WORKBENCH_DONE
        _workbench_cells(ax, 0, y, 1, i + 1, color, ls="-" if (last or not cached) else ":")
        ax.text(-0.3, y + 0.5, f"q{i}", ha="right", va="center", fontsize=9)
    ax.add_patch(Rectangle((0, 0), t, 1, fill=False, edgecolor="black", lw=2.2))
    ax.text(t + 0.3, 0.5, "the only row\nthe next token needs", ha="left", va="center",
            fontsize=9)
    for j in range(t):
        ax.text(j + 0.5, -0.45, str(j), ha="center", va="center", fontsize=9)
    ax.text(t / 2, -1.25, "key position", ha="center", va="center", fontsize=9)
    ax.set_xlim(-1.6, t + 4.6)
    ax.set_ylim(-1.7, kv_y + 2.2)
    ax.set_aspect("equal")
    ax.axis("off")


def workbench_kv_cache_figure(path: Path, t: int = 6):
    """Chapter 0's KV cache diagram: one decoding step at position t - 1, without a cache
    (every K, V column and every score row recomputed) and with one (t - 1 cached columns
    read, one new column and one query row computed). Saved to ``path`` (700 x 320 px)."""
    fig, axes = plt.subplots(1, 2, figsize=(7, 3.2), dpi=100)
    titles = [f"without a cache: step {t} re-runs\nall {t} positions "
              f"({t} K, V columns, {t * (t + 1) // 2} scores)",
              f"with a cache: {t - 1} K, V columns read,\n"
              f"1 column and 1 query row ({t} scores) computed"]
    for ax, cached, title in zip(axes, (False, True), titles):
        _workbench_step_panel(ax, t, cached)
        ax.set_title(title, fontsize=10)
    handles = [Rectangle((0, 0), 1, 1, facecolor=c, edgecolor="black")
               for c in (WORKBENCH_NEW, WORKBENCH_CACHED, WORKBENCH_DONE)]
    fig.legend(handles, ["computed at this step", "read from the cache",
                         "computed at an earlier step"], loc="lower center", ncol=3,
               fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path)
    return fig

def workbench_training_figure(records: dict, path: Path, bar: float = 1.60):
    """Chapter 0's training curves: validation (solid) and train-batch (dotted) loss per
    recorded step for each ``{name: lm.record(name)}``, with the target's bar. Saved to
    ``path`` (650 x 350 px); the legend sits outside the axes, right of the curves."""
    fig, ax = plt.subplots(figsize=(6.5, 3.5), dpi=100)
    for (name, rec), color in zip(records.items(), ("C0", "C1")):
        steps = [p["step"] for p in rec["curve"]]
        ax.plot(steps, [p["val_loss"] for p in rec["curve"]], color=color,
                label=f"{name} validation")
        ax.plot(steps, [p["train_loss"] for p in rec["curve"]], color=color, ls=":",
                label=f"{name} train batch")
    ax.axhline(bar, color="gray", lw=0.8, ls="--", label=f"bar for the target: {bar:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/char)")
    ax.set_ylim(1.0, 3.0)
    ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path)
    return fig



# --------------------------------------------------------------------------------------------
# Chapter 1, pointer networks (notebooks/01_pointer_networks.ipynb)
# --------------------------------------------------------------------------------------------


POINTER_DPI = 100


def pointer_idea_figure(path):
    """Pointing (Vinyals et al. 2015, eq. 3): decoder state d_3 scores every encoder state e_j;
    the softmax over the input positions is the output. Illustrative numbers, sorting 5 inputs."""
    values = [0.62, 0.15, 0.91, 0.38, 0.07]
    probs = [0.08, 0.0, 0.02, 0.90, 0.0]  # steps 1 and 2 chose 0.07 and 0.15: masked
    chosen = {1, 4}
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(7.2, 3.3), gridspec_kw={"width_ratios": [1.5, 1]})
    ax.set_xlim(-0.6, 4.6)
    ax.set_ylim(-1.0, 2.7)
    ax.axis("off")
    for j, (x, p) in enumerate(zip(values, probs)):
        grey = j in chosen
        ax.add_patch(Rectangle((j - 0.35, 0), 0.7, 0.5, fc="0.9" if grey else "#cfe3f5",
                               ec="0.5" if grey else "C0"))
        ax.text(j, 0.25, f"$e_{j + 1}$", ha="center", va="center", fontsize=11)
        ax.text(j, -0.3, f"{x:.2f}", ha="center", va="center", fontsize=10,
                color="0.5" if grey else "k")
        if not grey:
            ax.plot([j, 2], [0.5, 1.9], color="C3", lw=0.5 + 6 * p, alpha=0.3 + 0.7 * p)
    ax.text(-0.55, -0.75, "inputs (encoder states $e_j$); grey: already chosen",
            fontsize=9, color="0.3")
    ax.add_patch(Rectangle((1.55, 1.9), 0.9, 0.5, fc="#fbe0d6", ec="C3"))
    ax.text(2, 2.15, "$d_3$", ha="center", va="center", fontsize=11)
    ax.text(2.55, 2.15, "decoder state, step 3", va="center", fontsize=9)
    ax.text(-0.55, 1.2, "$u_j = v^\\top \\tanh(W_1 e_j + W_2 d_3)$", fontsize=10)
    colors = ["0.75" if j in chosen else ("C3" if p == max(probs) else "C0")
              for j, p in enumerate(probs)]
    bx.bar(range(1, 6), probs, color=colors)
    for j in chosen:
        bx.text(j + 1, 0.02, "masked", rotation=90, ha="center", va="bottom", fontsize=9,
                color="0.4")
    bx.set_xticks(range(1, 6), [f"{j}" for j in range(1, 6)])
    bx.set_xlabel("input position j")
    bx.set_ylabel("$p(C_3 = j)$ = softmax$_j(u_j)$")
    bx.set_ylim(0, 1)
    bx.set_title("the output: a distribution over inputs", fontsize=10)
    bx.annotate("points at\ninput 4 (0.38)", (3.6, 0.8), (0.6, 0.55), fontsize=9,
                arrowprops={"arrowstyle": "->", "color": "C3"})
    fig.tight_layout()
    fig.savefig(path, dpi=POINTER_DPI)
    return fig


def pointer_tour(ax, points, tour, **kw):
    """Draw the closed tour ``points[tour]`` on ``ax``."""
    q = points[torch.cat([tour, tour[:1]])]
    ax.plot(q[:, 0], q[:, 1], **kw)


def pointer_training_figure(curves, path):
    """Validation curves: ``curves`` = [(label, history, key)], key 'gap' (left, log) or
    'accuracy' (right)."""
    fig, axes = plt.subplots(1, 2, figsize=(7.2, 3.0))
    for label, history, key in curves:
        ax = axes[0] if key == "gap" else axes[1]
        ax.plot([e["step"] for e in history], [e[key] for e in history], marker=".", label=label)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("optimality gap (greedy)")
    axes[1].set_ylabel("exact accuracy (greedy)")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.legend(fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle("validation curves of the committed checkpoints", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=POINTER_DPI)
    return fig


def pointer_predictions_figure(tsp, hull, path):
    """Top row: TSP tours, ``tsp`` = [(points, optimal tour, predicted tour, title)]; bottom row:
    hulls, ``hull`` = [(points, true hull, predicted polygon, title)]."""
    fig, axes = plt.subplots(2, len(tsp), figsize=(7.2, 4.2))
    for row, items, color, truth in ((0, tsp, "C3", "optimal"), (1, hull, "C0", "true hull")):
        for ax, (p, exact, pred, title) in zip(axes[row], items):
            pointer_tour(ax, p, exact, color="0.75", lw=5, label=truth)
            pointer_tour(ax, p, pred, color=color, lw=1.5, label="Ptr-Net")
            ax.scatter(p[:, 0], p[:, 1], c="k", s=10, zorder=3)
            ax.set_title(title, fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal")
    for row in (0, 1):
        axes[row, -1].legend(fontsize=9, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle("predicted (thin) vs exact (thick grey), fresh instances, n = 10", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=POINTER_DPI)
    return fig


def pointer_attention_figure(points, path_taken, probs, path):
    """Left: the pointer distribution probs [steps, n] (red boxes: chosen); right: the tour."""
    n = probs.shape[1]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(7.2, 3.4), gridspec_kw={"width_ratios": [1.25, 1]})
    im = ax.imshow(probs, cmap="viridis", vmin=0, vmax=1)
    ax.set_xlabel("input point j")
    ax.set_ylabel("decoding step i")
    ax.set_xticks(range(n))
    ax.set_yticks(range(len(probs)))
    for i, j in enumerate(path_taken.tolist()):
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="red", lw=1.5))
    fig.colorbar(im, ax=ax, label="$p(C_i = j)$")
    ax.set_title("pointer distribution (red: chosen)", fontsize=10)
    pointer_tour(ax2, points, path_taken, color="C3")
    for j, (px, py) in enumerate(points.tolist()):
        ax2.annotate(str(j), (px, py), fontsize=9, ha="center", va="center",
                     bbox={"boxstyle": "circle", "fc": "white", "ec": "k"})
    ax2.set_aspect("equal")
    ax2.set_xticks([])
    ax2.set_yticks([])
    ax2.set_title("the decoded tour", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=POINTER_DPI)
    return fig


def pointer_draw_step(ax, points, path_taken, probs, i):
    """Step i of a decode: the path so far, p(next) as each point's size and colour, the choice
    as a red cross; the title gives the step's top probability."""
    done = path_taken[:i]
    if i > 1:
        q = points[done]
        ax.plot(q[:, 0], q[:, 1], color="C3", lw=2)
    ax.scatter(points[:, 0], points[:, 1], s=15 + 600 * probs[i], c=probs[i], cmap="viridis",
               vmin=0, vmax=1, edgecolors="k", zorder=3)
    if i < len(path_taken):
        ax.scatter(*points[path_taken[i]], marker="x", c="red", s=70, zorder=4)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_aspect("equal")
    ax.margins(0.12)
    ax.set_title(f"step {i}: top p = {float(probs[i].max()):.2f}", fontsize=9)


def pointer_widget_figure(points, path_taken, probs, steps, path):
    """The widget's frames for the static page: one panel per step in ``steps``."""
    cols = 3
    rows = -(-len(steps) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7.2, 2.6 * rows))
    for ax in axes.flat[len(steps):]:
        ax.axis("off")
    for ax, i in zip(axes.flat, steps):
        pointer_draw_step(ax, points, path_taken, probs, i)
    fig.suptitle("one decode, step by step (size and colour: p(next); red x: chosen)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=POINTER_DPI)
    return fig


def pointer_curves_figure(curves, key, title, path, ylabel="validation accuracy"):
    """Learning curves: ``curves`` = [(label, history, style)], ``key`` the metric plotted."""
    fig, ax = plt.subplots(figsize=(7.0, 3.4))
    for label, history, style in curves:
        ax.plot([e["step"] for e in history], [e[key] for e in history], style, marker=".",
                label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=POINTER_DPI)
    return fig


# --------------------------------------------------------------------------------------------
# Chapter 2, beam search (notebooks/02_beam_search.ipynb)
# --------------------------------------------------------------------------------------------

SEARCH_WIDTH, SEARCH_DPI = 7.0, 100  # about the 700 px of the column; 9-pt text stays legible


def search_tree_figure(tree, B, decode, path):
    """The candidates and survivors of each step of plain beam search: ``tree`` is a list of
    steps, each {"parent", "token", "score"} over the step's 2B candidates, best first;
    ``decode`` turns a token id into text."""
    fig, ax = plt.subplots(figsize=(SEARCH_WIDTH, 3.6), dpi=SEARCH_DPI)
    for t, step in enumerate(tree):
        for rank, (p, tk) in enumerate(zip(step["parent"], step["token"])):
            kept = rank < B
            if kept:
                ax.plot([t, t + 1], [-p, -rank], color="C0", lw=1.5, zorder=1)
            ax.scatter(t + 1, -rank, s=330 if kept else 200, zorder=2,
                       color="C0" if kept else "0.85")
            label = repr(decode(tk))[1:-1].replace(" ", "\u2423")  # a visible space
            ax.text(t + 1, -rank, label, ha="center", va="center",
                    fontsize=10, color="white" if kept else "black", zorder=3)
    ax.scatter(0, 0, s=330, color="C1", zorder=2)
    ax.annotate("prompt", (0, 0), xytext=(0, -0.55), ha="center", va="top", fontsize=9)
    ax.set_xticks(range(len(tree) + 1))
    ax.set_xlabel("step")
    ax.set_yticks([-i for i in range(2 * B)], [f"rank {i}" for i in range(2 * B)], fontsize=9)
    ax.set_ylim(-2 * B + 0.4, 0.6)
    ax.set_xlim(-0.5, len(tree) + 0.5)
    ax.set_title(f"beam search, B = {B}: the 2B best candidates of each step (grey), "
                 f"the B kept (blue)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=SEARCH_DPI)
    plt.close(fig)


def search_diversity_quality_figure(sweep, path):
    """Mean log p per token against distinct-2, one line per number of groups G; ``sweep``
    rows have G, penalty, distinct2 and logp, the first row plain beam search."""
    fig, ax = plt.subplots(figsize=(SEARCH_WIDTH, 4.2), dpi=SEARCH_DPI)
    base = sweep[0]
    ax.scatter(base["distinct2"], base["logp"], s=150, marker="*", color="k",
               label="beam search (G = 1)", zorder=3)
    for G, color in zip((2, 3, 6), ("C0", "C1", "C2")):
        rows = [r for r in sweep if r["G"] == G]
        ax.plot([r["distinct2"] for r in rows], [r["logp"] for r in rows], "o-", color=color,
                label=f"diverse beam search, G = {G}")
        for i, r in enumerate(rows):  # alternate sides so that neighbouring labels do not touch
            ax.annotate(f"{r['penalty']:g}", (r["distinct2"], r["logp"]), textcoords="offset points",
                        xytext=(6, 4) if i % 2 == 0 else (-6, -12), fontsize=9, color=color,
                        ha="left" if i % 2 == 0 else "right")
    ax.set_xlabel("distinct-2 of the 6 hypotheses (higher = more diverse)", fontsize=10)
    ax.set_ylabel("mean log p per token (target)", fontsize=10)
    ax.margins(x=0.06, y=0.1)
    ax.set_title("Diversity vs quality, B = 6; point labels = diversity penalty", fontsize=10)
    ax.legend(fontsize=9, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=SEARCH_DPI)
    plt.close(fig)


def search_hypotheses_figure(panels, prompt, path):
    """The hypotheses of several searches, one panel under the other: ``panels`` is a list of
    (title, texts), texts best first."""
    fig, axes = plt.subplots(len(panels), 1, figsize=(SEARCH_WIDTH, 1.7 * len(panels)), dpi=SEARCH_DPI)
    for ax, (title, texts) in zip(axes, panels):
        for i, text in enumerate(texts):
            ax.text(0.0, 1 - (i + 1) / (len(texts) + 1), text, family="monospace", fontsize=9,
                    transform=ax.transAxes, va="center")
        ax.set_title(title, fontsize=10, loc="left")
        ax.axis("off")
    fig.suptitle(f"prompt {prompt!r}, hypotheses best first", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=SEARCH_DPI)
    plt.close(fig)
