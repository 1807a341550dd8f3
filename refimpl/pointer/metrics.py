"""Scoring decoded outputs on fresh instances: accuracy, hull coverage, TSP optimality gap."""
from __future__ import annotations

import math

import numpy as np
import torch

from refimpl.lm import check_int
from refimpl.pointer.data import TEST_SEED, make_batch, tsp_instances
from refimpl.pointer.decoding import solve
from refimpl.pointer.geometry import canonical_tour, is_simple_polygon, polygon_area, tour_length
from refimpl.pointer.held_karp import MAX_HELD_KARP_N, held_karp, held_karp_lengths
from refimpl.pointer.attention import AttentionModel
from refimpl.pointer.network import PointerNet


@torch.no_grad()
def evaluate(task: str, model: PointerNet | AttentionModel, n: int, num_instances: int = 1000,
             seed: int = TEST_SEED, beam_size: int = 1, optimal: torch.Tensor | None = None,
             starts: int | None = None, symmetries: int = 1, **data) -> dict:
    """Decode fresh instances (seed disjoint from training) and score them.

    sort: exact-sequence accuracy. hull: exact accuracy (the true hull up to rotation), area
    coverage (predicted area / hull area, 0 when the polygon is not simple), and vertex-set
    accuracy. tsp: mean tour length (closing edge included), Held-Karp optimum, optimality gap;
    pass ``optimal`` lengths for n > 12. A prediction that is not a permutation is a failure.
    """
    if task != model.config.task:
        raise ValueError(f"task={task!r} but the model was trained for {model.config.task!r}")
    check_int("n", n, 1 if task == "sort" else 3)
    check_int("num_instances", num_instances, 1)
    g = torch.Generator().manual_seed(seed + n)
    if task == "tsp":
        x = tsp_instances(n, num_instances, seed)
        targets = None
        if optimal is None and n <= MAX_HELD_KARP_N:
            optimal, targets = held_karp(x)
        elif optimal is None:
            optimal = held_karp_lengths(x)
    else:
        x, targets = make_batch(task, n, num_instances, g, **data)
    preds = solve(model, x, beam_size, starts, symmetries)
    out = {"task": task, "n": n, "num_instances": num_instances, "seed": seed + n,
           "beam_size": beam_size}
    if isinstance(model, AttentionModel):
        out.update(starts=n if starts is None else starts, symmetries=symmetries)
    if task == "sort":
        out["accuracy"] = float(np.mean([len(p) == n and bool((p == t).all())
                                         for p, t in zip(preds, targets)]))
        return out
    if task == "tsp":
        valid = [sorted(p.tolist()) == list(range(n)) for p in preds]
        lengths = torch.tensor([float(tour_length(x[b:b + 1], p[None])) if ok else math.inf
                                for b, (p, ok) in enumerate(zip(preds, valid))])
        out.update(valid=float(np.mean(valid)), mean_length=float(lengths.mean()),
                   mean_optimal=float(optimal.mean()),
                   gap=float(lengths.mean() / optimal.mean() - 1))
        if targets is not None:
            out["exact_accuracy"] = float(np.mean([ok and bool((canonical_tour(p[None])[0] == t).all())
                                                   for p, t, ok in zip(preds, targets, valid)]))
        return out
    exact, cover, same_set = [], [], []
    for b, p in enumerate(preds):
        true = targets[b][targets[b] > 0] - 1
        same_set.append(sorted(p.tolist()) == sorted(true.tolist()))
        simple = is_simple_polygon(x[b], p)
        cover.append(polygon_area(x[b], p) / polygon_area(x[b], true) if simple else 0.0)
        exact.append(simple and same_set[-1] and _same_cycle(p.tolist(), true.tolist()))
    out.update(accuracy=float(np.mean(exact)), area_coverage=float(np.mean(cover)),
               set_accuracy=float(np.mean(same_set)),
               failures=float(np.mean([c == 0.0 for c in cover])))
    return out


def _same_cycle(a: list, b: list) -> bool:
    """Whether closed polygons a and b are the same cycle, up to rotation and direction."""
    if len(a) != len(b) or not a:
        return False
    k = a.index(b[0]) if b[0] in a else -1
    if k < 0:
        return False
    rot = a[k:] + a[:k]
    return rot == b or [rot[0]] + rot[1:][::-1] == b
