"""The figures of chapter 2 (beam search), drawn at the width the book shows them (7 in at
100 dpi, about the 700 px of the page's column) so that 9-point text stays legible."""
from __future__ import annotations

import matplotlib.pyplot as plt

WIDTH, DPI = 7.0, 100


def tree_figure(tree, B, decode, path):
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
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def diversity_quality_figure(sweep, path):
    """Mean log p per token against distinct-2, one line per number of groups G; ``sweep``
    rows have G, penalty, distinct2 and logp, the first row plain beam search."""
    fig, ax = plt.subplots(figsize=(WIDTH, 4.2), dpi=DPI)
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
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def hypotheses_figure(panels, prompt, path):
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
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
