"""Plot helpers the chapters call, so that no notebook cell is mostly plotting code.

One section per chapter; each function carries its chapter's prefix (``workbench_``,
``pointer_``, ``search_``) and saves its figure under ``figures/``.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from matplotlib.patches import Circle, Rectangle
from matplotlib.ticker import MaxNLocator

DPI, WIDTH = 100, 7.0  # 7 inches at 100 dpi: the ~700 px of the site's column, 9-pt text legible


def _save(fig, path, close=True, **layout):
    """Lay out (``layout`` goes to tight_layout), save at DPI and close: the notebook shows the
    file, so the page has one copy. ``close=False`` leaves the figure open for ``plt.show()``."""
    fig.tight_layout(**layout)
    fig.savefig(path, dpi=DPI)
    if close:
        plt.close(fig)


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
    _save(fig, path, close=False, rect=(0, 0.07, 1, 1))
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
    _save(fig, path, close=False)
    return fig


# --------------------------------------------------------------------------------------------
# Chapter 1, pointer networks (notebooks/01_pointer_networks.ipynb)
# --------------------------------------------------------------------------------------------


def pointer_idea_figure(path):
    """Pointing (Vinyals et al. 2015, eq. 3): decoder state d_3 scores every encoder state e_j;
    the softmax over the input positions is the output. Illustrative numbers, sorting 5 inputs."""
    values = [0.62, 0.15, 0.91, 0.38, 0.07]
    probs = [0.08, 0.0, 0.02, 0.90, 0.0]  # steps 1 and 2 chose 0.07 and 0.15: masked
    chosen = {1, 4}
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(7.0, 3.3), gridspec_kw={"width_ratios": [1.5, 1]})
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
    _save(fig, path, close=False)
    return fig


def pointer_tour(ax, points, tour, **kw):
    """Draw the closed tour ``points[tour]`` on ``ax``."""
    q = points[torch.cat([tour, tour[:1]])]
    ax.plot(q[:, 0], q[:, 1], **kw)


def pointer_training_figure(curves, path):
    """Validation curves: ``curves`` = [(label, history, key)], key 'gap' (left, log) or
    'accuracy' (right)."""
    fig, axes = plt.subplots(1, 2, figsize=(7.0, 3.0))
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
    _save(fig, path, close=False)
    return fig


def pointer_predictions_figure(tsp, hull, path):
    """Top row: TSP tours, ``tsp`` = [(points, optimal tour, predicted tour, title)]; bottom row:
    hulls, ``hull`` = [(points, true hull, predicted polygon, title)]. 700 px wide: the panels
    take the whole width (the key is in the title, the row's name on its left)."""
    fig, axes = plt.subplots(2, len(tsp), figsize=(7.0, 4.4))
    for row, items, color, name in ((0, tsp, "C3", "TSP tours"), (1, hull, "C0", "convex hulls")):
        for ax, (p, exact, pred, title) in zip(axes[row], items):
            pointer_tour(ax, p, exact, color="0.75", lw=6)
            pointer_tour(ax, p, pred, color=color, lw=1.6)
            ax.scatter(p[:, 0], p[:, 1], c="k", s=14, zorder=3)
            ax.set_title(title, fontsize=9)
        axes[row, 0].set_ylabel(name, fontsize=10)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal")
        ax.margins(0.06)
    fig.suptitle("fresh instances, n = 10: the Ptr-Net's answer (thin line) over the exact one"
                 " (thick grey)", fontsize=10)
    _save(fig, path, close=False)
    return fig


def pointer_rl_curves_figure(curves, path):
    """Validation gap against training time: ``curves`` = [(label, history, key)], each entry of
    a record's history holding 'seconds' and the gap under ``key``; both axes logarithmic."""
    fig, ax = plt.subplots(figsize=(7.0, 3.4))
    for label, history, key in curves:
        ax.plot([e["seconds"] / 60 for e in history], [100 * e[key] for e in history],
                marker=".", ms=4, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training time, minutes on one CPU thread")
    ax.set_ylabel("validation gap, % (greedy)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    ax.set_title("supervised Ptr-Nets and label-free attention models", fontsize=10)
    _save(fig, path, close=False)
    return fig


def pointer_rl_tours_figure(panels, path):
    """``panels`` = [(points, reference tour, model tour, title)]: the model's tour (thin line)
    over the reference's (thick grey), one panel each."""
    fig, axes = plt.subplots(1, len(panels), figsize=(7.0, 2.2))
    for ax, (p, exact, pred, title) in zip(axes, panels):
        pointer_tour(ax, p, exact, color="0.75", lw=5)
        pointer_tour(ax, p, pred, color="C3", lw=1.3)
        ax.scatter(p[:, 0], p[:, 1], c="k", s=6, zorder=3)
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal")
    fig.suptitle("fresh instances: the attention model's tour (thin) over the reference (grey)",
                 fontsize=9)
    _save(fig, path, close=False)
    return fig


def pointer_attention_figure(points, path_taken, probs, path):
    """Left: the pointer distribution probs [steps, n] (red boxes: chosen); right: the tour."""
    n = probs.shape[1]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(7.0, 3.4), gridspec_kw={"width_ratios": [1.25, 1]})
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
    _save(fig, path, close=False)
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
    # constrained layout keeps each row's titles clear of the square panels above them
    fig, axes = plt.subplots(rows, cols, figsize=(7.0, 0.4 + 2.55 * rows), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[len(steps):]:
        ax.axis("off")
    for ax, i in zip(axes.flat, steps):
        pointer_draw_step(ax, points, path_taken, probs, i)
    fig.suptitle("one decode, step by step (size and colour: p(next); red x: chosen)",
                 fontsize=10)
    fig.savefig(path, dpi=DPI)
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
    _save(fig, path, close=False)
    return fig


# --------------------------------------------------------------------------------------------
# Chapter 2, beam search (notebooks/02_beam_search.ipynb)
# --------------------------------------------------------------------------------------------


def search_tree_figure(tree, B, decode, path):
    """The candidates and survivors of each step of plain beam search: ``tree`` is a list of
    steps, each {"parent", "token", "score"} over the step's 2B candidates, best first;
    ``decode`` turns a token id into text."""
    fig, ax = plt.subplots(figsize=(WIDTH, 3.6), dpi=DPI)
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
    _save(fig, path)


def search_diversity_quality_figure(sweep, path):
    """Mean log p per token against distinct-2, one line per number of groups G; ``sweep``
    rows have G, penalty, distinct2 and logp, the first row plain beam search."""
    fig, ax = plt.subplots(figsize=(WIDTH, 4.2), dpi=DPI)
    base = sweep[0]
    ax.scatter(base["distinct2"], base["logp"], s=150, marker="*", color="k",
               label="beam search (G = 1)", zorder=3)
    # points closer than 4% of the plot's extent share one label ("0.5, 1"): two labels
    # there would sit on top of each other
    xs, ys = [r["distinct2"] for r in sweep], [r["logp"] for r in sweep]
    span_x, span_y = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    for G, color in zip((2, 3, 6), ("C0", "C1", "C2")):
        rows = [r for r in sweep if r["G"] == G]
        ax.plot([r["distinct2"] for r in rows], [r["logp"] for r in rows], "o-", color=color,
                label=f"diverse beam search, G = {G}")
        groups = []
        for r in rows:
            last = groups[-1][-1] if groups else None
            if last and abs(r["distinct2"] - last["distinct2"]) / span_x < 0.04 \
                    and abs(r["logp"] - last["logp"]) / span_y < 0.04:
                groups[-1].append(r)
            else:
                groups.append([r])
        for i, group in enumerate(groups):  # alternate sides so that neighbours do not touch
            x = sum(r["distinct2"] for r in group) / len(group)
            y = sum(r["logp"] for r in group) / len(group)
            ax.annotate(", ".join(f"{r['penalty']:g}" for r in group), (x, y),
                        textcoords="offset points", fontsize=9, color=color,
                        xytext=(7, 3) if i % 2 == 0 else (-7, -11),
                        ha="left" if i % 2 == 0 else "right")
    ax.set_xlabel("distinct-2 of the 6 hypotheses (higher = more diverse)", fontsize=10)
    ax.set_ylabel("mean log p per token (target)", fontsize=10)
    ax.margins(x=0.06, y=0.1)
    ax.set_title("Diversity vs quality, B = 6; point labels = diversity penalty", fontsize=10)
    ax.legend(fontsize=9, loc="lower left")
    _save(fig, path)


def search_hypotheses_figure(panels, prompt, path):
    """The hypotheses of several searches, one panel under the other: ``panels`` is a list of
    (title, texts), texts best first."""
    fig, axes = plt.subplots(len(panels), 1, figsize=(WIDTH, 1.7 * len(panels)), dpi=DPI)
    for ax, (title, texts) in zip(axes, panels):
        for i, text in enumerate(texts):
            ax.text(0.0, 1 - (i + 1) / (len(texts) + 1), text, family="monospace", fontsize=9,
                    transform=ax.transAxes, va="center")
        ax.set_title(title, fontsize=10, loc="left")
        ax.axis("off")
    fig.suptitle(f"prompt {prompt!r}, hypotheses best first", fontsize=10)
    _save(fig, path)


# --------------------------------------------------------------------------------------------
# Chapter 3, ring attention (notebooks/03_ring_attention.ipynb)
# --------------------------------------------------------------------------------------------

RING_COLORS = plt.cm.tab10.colors


def ring_draw_ring(ax, P, holds=None, title=""):
    """P devices on a circle, arrows to the next; optionally the K/V block each one holds."""
    ang = [math.pi / 2 - 2 * math.pi * r / P for r in range(P)]
    xy = [(math.cos(a), math.sin(a)) for a in ang]
    for r in range(P):
        (x0, y0), (x1, y1) = xy[r], xy[(r + 1) % P]
        if P > 1:
            ax.annotate("", xy=(0.75 * x1 + 0.25 * x0, 0.75 * y1 + 0.25 * y0),
                        xytext=(0.75 * x0 + 0.25 * x1, 0.75 * y0 + 0.25 * y1),
                        arrowprops=dict(arrowstyle="->", color="gray", lw=1.5))
        ax.add_patch(Circle(xy[r], 0.46, color=RING_COLORS[r], alpha=0.85))
        label = f"Q{r}" + (f"\nKV{holds[r]}" if holds is not None else "")
        ax.text(*xy[r], label, ha="center", va="center", fontsize=9, color="white",
                weight="bold")
    ax.set_xlim(-1.5, 1.5)
    ax.set_ylim(-1.5, 1.5)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(title, fontsize=10)


def ring_owner_image(N, P, layout, causal=True):
    """[N, N, 3] picture of the score matrix, each visible tile coloured by its row's rank."""
    from refimpl.ring import positions_of, shard_segments
    img = torch.ones(N, N, 3)
    for r, segs in enumerate(shard_segments(N, P, layout)):
        img[positions_of(segs)] = torch.tensor(RING_COLORS[r][:3])
    if causal:
        img[torch.ones(N, N, dtype=torch.bool).triu(1)] = 0.93
    return img


def ring_idea_figure(path, layouts=("contiguous", "zigzag", "striped"), N=32, P=4):
    """The ring of P devices, then the causal score matrix coloured by owner, per layout."""
    fig, axes = plt.subplots(1, 4, figsize=(WIDTH, 2.3), dpi=DPI)
    ring_draw_ring(axes[0], P, title=f"{P} devices, a ring")
    for ax, layout in zip(axes[1:], layouts):
        ax.imshow(ring_owner_image(N, P, layout).numpy(), interpolation="nearest")
        ax.set_title(layout, fontsize=10)
        ax.set_xlabel("key", fontsize=9)
        ax.set_ylabel("query", fontsize=9)
        ax.tick_params(labelsize=9)
    _save(fig, path)


def ring_step_panels(axes, N, P, layout, step):
    """Left: who holds which K/V at ``step``; right: the score tiles computed up to it."""
    from refimpl.ring import positions_of, shard_segments
    segs = shard_segments(N, P, layout)
    ring_draw_ring(axes[0], P, [(r - step) % P for r in range(P)], f"step {step}")
    img = torch.ones(N, N, 3)
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    for t in range(step + 1):
        for r in range(P):
            rows, cols = positions_of(segs[r]), positions_of(segs[(r - t) % P])
            color = torch.tensor(RING_COLORS[r][:3])
            if t < step:
                color = 0.35 * color + 0.65
            sub = img[rows][:, cols]
            sub[causal[rows][:, cols]] = color
            img[rows[:, None], cols[None, :]] = sub
    axes[1].imshow(img.numpy(), interpolation="nearest")
    axes[1].set_title(f"tiles, step {step}", fontsize=10)
    axes[1].set_xlabel("key", fontsize=9)
    axes[1].set_ylabel("query", fontsize=9)
    axes[1].tick_params(labelsize=9)


def ring_steps_figure(path, N=16, P=4, layout="zigzag"):
    """Every step of the ring: the holdings (top row) and the tiles computed (bottom row)."""
    fig, axes = plt.subplots(2, P, figsize=(WIDTH, 4.4), dpi=DPI)
    for t in range(P):
        ring_step_panels((axes[0, t], axes[1, t]), N, P, layout, t)
    fig.suptitle(f"{layout}, P = {P}: at step t rank r holds the K/V of rank (r - t) mod {P}"
                 "\n(bottom: bright = tiles of this step, faded = earlier steps)", fontsize=10)
    _save(fig, path)


def ring_timeline(ax, trace, P, block, title, comm_cost=0.4):
    """Gantt chart of a forward trace: compute bars (work over a full block's block * block
    pairs) and send bars (comm_cost per block sent); a step ends when the slowest rank has
    computed and received. Returns the total time."""
    work = trace.work["forward"]
    sent = [m for m in trace.messages if m.phase == "forward"]
    block_bytes = max(m.nbytes for m in sent) if sent else 1
    start = 0.0
    for t in range(P):
        comp = [w / (block * block) for w in work[t]]
        comm = [comm_cost * m.nbytes / block_bytes for m in sent if m.step == t]
        for r in range(P):
            ax.barh(r + 0.15, comp[r], left=start, height=0.5, color=RING_COLORS[r],
                    edgecolor="white")
            if comm:
                ax.barh(r - 0.3, comm[r], left=start, height=0.2, color="0.4")
        ax.axvline(start, color="0.85", lw=0.8, zorder=0)
        start += max(comp + comm)
    ax.set_yticks(range(P), [f"rank {r}" for r in range(P)], fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel("time (one full block = 1)", fontsize=9)
    ax.set_title(f"{title}: {start:.2f}", fontsize=10)
    return start


def ring_timeline_figure(traces, P, block, path):
    """One timeline panel per (title, trace); returns the total time of each."""
    fig, axes = plt.subplots(1, len(traces), figsize=(WIDTH, 2.4), dpi=DPI,
                             sharex=True)
    totals = [ring_timeline(ax, tr, P, block, title) for ax, (title, tr) in zip(axes, traces)]
    _save(fig, path)
    return totals


def ring_limit_marks(ax, xs, ys, label):
    """Short horizontal marks at (x, y), one legend entry (a plain line, not a wide marker)."""
    ax.hlines(ys, [x - 0.42 for x in xs], [x + 0.42 for x in xs], colors="k", lw=2, label=label)


def ring_load_balance_figure(rows, layouts, path):
    """Bars: busiest device over the ideal per layout and P; marks: (2P-1)/P."""
    fig, ax = plt.subplots(figsize=(WIDTH, 3.0), dpi=DPI)
    for i, layout in enumerate(layouts):
        ax.bar([j + 0.27 * (i - 1) for j in range(len(rows))], [r[layout] for r in rows], 0.27,
               label=layout)
    ring_limit_marks(ax, range(len(rows)), [r["(2P-1)/P"] for r in rows],
                     "(2P-1)/P, contiguous limit")
    ax.set_xticks(range(len(rows)), [f"P={r['P']}" for r in rows])
    ax.set_ylabel("busiest device / ideal", fontsize=9)
    ax.set_title("Causal load balance (chunks of 64 positions)", fontsize=10)
    ax.set_ylim(0, 2.0)
    ax.legend(fontsize=9, loc="center left", bbox_to_anchor=(1.01, 0.5))
    _save(fig, path)


def ring_memory_figure(seqs, curves, path, budget=80):
    """Per-device peak memory against N: ``curves`` is {label: [GiB per N]}."""
    fig, ax = plt.subplots(figsize=(WIDTH, 3.6), dpi=DPI)
    for label, ys in curves.items():
        ax.loglog(seqs, ys, "x--" if "scores" in label else "o-", label=label)
    ax.axhline(budget, color="k", ls=":", lw=1)
    ax.text(seqs[0], budget * 1.15, f"{budget} GiB (one H100)", fontsize=9)
    ax.set_xlabel("sequence length N", fontsize=9)
    ax.set_ylabel("peak GiB per device", fontsize=9)
    ax.set_title("Per-device memory, causal forward, 8 heads x 64, fp32", fontsize=10)
    ax.legend(fontsize=9, loc="center left", bbox_to_anchor=(1.01, 0.5))
    _save(fig, path)


def ring_communication_figure(worlds, vol, path):
    """MiB sent per device against P (N = 4096 P): ``vol`` is {scheme: [MiB per P]}."""
    fig, ax = plt.subplots(figsize=(WIDTH, 3.2), dpi=DPI)
    labels = {"ring": "ring (pass K/V)", "allgather": "all-gather K/V", "ulysses": "Ulysses"}
    for key, ys in vol.items():
        ax.plot(worlds, ys, "x--" if key == "allgather" else "o-", label=labels[key])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("devices P (sequence N = 4096 P)", fontsize=9)
    ax.set_ylabel("MiB sent per device", fontsize=9)
    ax.set_title("Forward communication when N and P grow together", fontsize=10)
    ax.legend(fontsize=9, loc="center left", bbox_to_anchor=(1.01, 0.5))
    _save(fig, path)


# --------------------------------------------------------------------------------------------
# Chapter 4, prefix packing (notebooks/04_prefix_packing.ipynb)
# --------------------------------------------------------------------------------------------


def _packing_segments(ax, segment_ids, cmap="tab20", labels=False):
    """Rows of segment ids as colours (white = padding); optionally the id in each slot."""
    seg = torch.as_tensor(segment_ids).float()
    ax.imshow(seg.masked_fill(seg < 0, float("nan")), aspect="auto", cmap=cmap,
              vmin=0, vmax=max(float(seg.max()), 1), interpolation="nearest")
    if labels:
        for (r, c), v in zip(torch.cartesian_prod(*map(torch.arange, seg.shape)).tolist(),
                             seg.flatten().tolist()):
            ax.text(c, r, "pad" if v < 0 else int(v), ha="center", va="center", fontsize=9)


def packing_padded_figure(lengths, capacity, path):
    """The idea: the same prompts padded to a rectangle, prepacked into rows, padding-free."""
    from refimpl.packing import cumulative_lengths, first_fit_decreasing, layout_rows
    n, L = len(lengths), max(lengths)
    bins = first_fit_decreasing(lengths, capacity)
    rows = layout_rows([torch.zeros(m, dtype=torch.long) for m in lengths], bins)[2]
    padded = torch.tensor([[i if j < m else -1 for j in range(L)] for i, m in enumerate(lengths)])
    stream = torch.cat([torch.full((m,), i) for i, m in enumerate(lengths)])[None]
    fig, axes = plt.subplots(3, 1, figsize=(7, 5.6), height_ratios=[n, len(bins), 1.6])
    real = sum(lengths)
    for ax, seg, title in [
            (axes[0], padded, f"padded: {n} rows x {L} slots, {real / padded.numel():.0%} real"),
            (axes[1], rows, f"prepacked (FFD, capacity {capacity}): {len(bins)} rows, "
                            f"{real / rows.numel():.0%} real"),
            (axes[2], stream, f"padding-free: one stream of {real} tokens, cu_seqlens at the ticks")]:
        _packing_segments(ax, seg)
        ax.set_title(title, fontsize=10)
        ax.set_yticks([])
    cu = cumulative_lengths(lengths)
    axes[2].set_xticks(cu.tolist()[::4], cu.tolist()[::4], fontsize=9)
    axes[0].set_ylabel("prompt"), axes[1].set_ylabel("row")
    axes[1].set_xlabel("token slot (colour = prompt, white = padding)", fontsize=9)
    _save(fig, path)


def packing_layout_figure(packed, small, path):
    """The packed layout: many prompts in rows, and a small example's segment ids,
    position ids (with their colour scale) and row-0 block-diagonal causal mask."""
    fig, axes = plt.subplots(2, 2, figsize=(7, 5.4))
    _packing_segments(axes[0, 0], packed.segment_ids)
    axes[0, 0].set_title(f"{len(packed.placements)} prompts in "
                         f"{packed.input_ids.shape[0]} rows (colour = prompt)", fontsize=10)
    axes[0, 0].set_xlabel("token slot", fontsize=9), axes[0, 0].set_ylabel("row", fontsize=9)
    _packing_segments(axes[0, 1], small.segment_ids, cmap="Pastel1", labels=True)
    axes[0, 1].set_title("small example: segment ids", fontsize=10)
    im = axes[1, 0].imshow(small.position_ids, aspect="auto", cmap="viridis",
                           interpolation="nearest")
    fig.colorbar(im, ax=axes[1, 0], label="position id")
    axes[1, 0].set_title("position ids (restart per prompt)", fontsize=10)
    allowed = small.attn_mask[0, 0] == 0
    axes[1, 1].imshow(allowed, cmap="Greys", interpolation="nearest")
    axes[1, 1].set_title("row 0 mask: black = may attend", fontsize=10)
    axes[1, 1].set_xlabel("key slot", fontsize=9), axes[1, 1].set_ylabel("query slot", fontsize=9)
    for ax in (axes[0, 1], axes[1, 0]):
        ax.set_xlabel("token slot", fontsize=9), ax.set_ylabel("row", fontsize=9)
        ax.set_yticks(range(small.input_ids.shape[0]))
    _save(fig, path)


def packing_rows_figure(segment_ids, title, path=None):
    """Packed rows (colour = prompt, white = padding); saved and closed if ``path``,
    else left open for the widget to show."""
    fig, ax = plt.subplots(figsize=(7, 3))
    _packing_segments(ax, segment_ids)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("token slot", fontsize=9), ax.set_ylabel("packed row", fontsize=9)
    if path is None:
        fig.tight_layout()
        return fig
    _save(fig, path)


# --------------------------------------------------------------------------------------------
# Chapter 5, speculative decoding (notebooks/05_speculative_decoding.ipynb)
# --------------------------------------------------------------------------------------------


def speculative_idea_figure(path):
    """Three rounds with gamma = 4: drafts (boxes), verdicts, what each round emits."""
    rounds = [("h", "e", "r", "e"), ("a", "t", "h", "y"), ("s", "o", "u", "l")]
    accepted, target_tok = [2, 4, 0], ["o", "!", "w"]
    fig, ax = plt.subplots(figsize=(7, 2.3), dpi=DPI)
    ax.axis("off")
    ax.set_xlim(0, 20)
    ax.set_ylim(0, 3)
    x0 = 0.2
    for r, (drafts, acc, t) in enumerate(zip(rounds, accepted, target_tok)):
        for i, ch in enumerate(drafts):
            face = "#c7e9c0" if i < acc else ("#fcbba1" if i == acc else "#eeeeee")
            ax.add_patch(Rectangle((x0 + i * 1.1, 1.6), 1.0, 0.8, fc=face, ec="gray"))
            ax.text(x0 + i * 1.1 + 0.5, 2.0, ch, ha="center", va="center", family="monospace",
                    fontsize=10, color="gray" if i > acc else "black")
        ax.add_patch(Rectangle((x0 + 4.4, 1.6), 1.0, 0.8, ec="k",
                               fc="#9ecae1" if acc == 4 else "#fb6a4a"))
        ax.text(x0 + 4.9, 2.0, t, ha="center", va="center", family="monospace", weight="bold",
                fontsize=10)
        ax.text(x0 + 2.7, 1.15, f"round {r + 1}: 1 target call\n-> {acc + 1} token(s)",
                ha="center", va="top", fontsize=9)
        ax.text(x0 + 2.7, 2.65, "drafts x1..x4 | target", ha="center", fontsize=9, color="gray")
        x0 += 6.7
    ax.text(10, 0.05, "green: accepted   light red: first rejected (later ones discarded)\n"
            "red: target's correction   blue: bonus token", ha="center", fontsize=9)
    _save(fig, path)


def speculative_theory_figure(alphas, c, tokens_fn, speedup_fn, path, gammas=range(0, 11)):
    """Expected tokens per target call and wall-clock gain against gamma, one line per alpha."""
    fig, ax = plt.subplots(1, 2, figsize=(7, 3), dpi=DPI, layout="constrained")
    for a in alphas:
        ax[0].plot(gammas, [tokens_fn(a, g) for g in gammas], "o-", ms=3, label=f"alpha={a}")
        ax[1].plot(gammas, [speedup_fn(a, g, c) for g in gammas], "o-", ms=3)
    ax[0].set(xlabel="gamma", ylabel="tokens per target call")
    ax[0].set_title("(1 - a^(g+1)) / (1 - a)", fontsize=10)
    ax[1].set(xlabel="gamma", ylabel="wall-clock gain")
    ax[1].set_title(f"gain / (g c + 1), c = {c:.3f}", fontsize=10)
    for a in ax:  # gamma is a whole number of drafts
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.legend(*ax[0].get_legend_handles_labels(), loc="outside right center", fontsize=9)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def speculative_gamma_figure(rows, alpha, path):
    """Measured tokens per target call against the theory; rows (gamma, measured, theory)."""
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=DPI)
    ax.plot([r[0] for r in rows], [r[1] for r in rows], "o-", label="measured")
    ax.plot([r[0] for r in rows], [r[2] for r in rows], "s--", label=f"theory, alpha={alpha:.2f}")
    ax.set(xlabel="gamma", ylabel="tokens per target call")
    ax.set_title("Greedy, workbench draft -> target (held-out prompts)", fontsize=10)
    ax.legend(loc="upper left", fontsize=9)
    _save(fig, path)


def speculative_origins_figure(prompt_text, text, kinds, tokens_per_call, acceptance, path):
    """Generated text coloured by origin: 'a' accepted draft, 'r' correction, 'b' bonus.
    9-pt monospace, 82 characters a line; the figure is as tall as the text."""
    colour = {"a": "#2ca02c", "r": "#d62728", "b": "#1f77b4"}
    per_line, char_w, line_h, left, head = 82, 0.08, 0.25, 0.17, 0.62  # inches
    cells, col, row = [], 0, 0
    for ch, k in [(c, "p") for c in prompt_text] + list(zip(text, kinds)):
        if ch == "\n" or col == per_line:
            col, row = 0, row + 1
            if ch == "\n":
                continue
        cells.append((col, row, ch, k))
        col += 1
    rows = 1 + max((r for _, r, _, _ in cells), default=0)  # no trailing blank lines
    height = head + line_h * rows
    fig = plt.figure(figsize=(WIDTH, height), dpi=DPI)
    for col, row, ch, k in cells:
        fig.text((left + char_w * col) / WIDTH, 1 - (head + line_h * row) / height, ch,
                 color=colour.get(k, "black"), family="monospace", fontsize=9, va="top",
                 weight="bold" if k != "p" else "normal")
    fig.text(0.5, 1 - 0.12 / height,
             f"tokens per target call {tokens_per_call:.2f}, acceptance {acceptance:.2f}\n"
             "(green accepted, red correction, blue bonus)", ha="center", va="top", fontsize=9)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
