"""Decoding a Pointer Network: greedy and beam search over valid outputs only."""
from __future__ import annotations

import math

import torch

from refimpl.pointer.attention import AttentionModel, solve_attention
from refimpl.pointer.data import STOP
from refimpl.pointer.geometry import check_points, edge_crosses
from refimpl.pointer.network import PointerNet, pointer_log_probs


@torch.no_grad()
def solve(model: PointerNet | AttentionModel, points, beam_size: int = 1, starts: int | None = None,
          symmetries: int = 1) -> list[torch.Tensor]:
    """Decode each instance; beam_size=1 is greedy. Returns one LongTensor of
    indices each.

    The attention model decodes from ``starts`` start cities (0..starts-1;
    default all n, POMO's inference) on ``symmetries`` views of each
    instance (1, or 8 for POMO's augmentation) and returns the shortest
    tour found.

    The beam keeps only valid outputs: with ``mask_chosen`` every input at
    most once (a permutation for sort and TSP); for hulls a simple closed
    polygon of >= 3 vertices (no new edge may cross an earlier one; the stop
    token closes the polygon)."""
    if not isinstance(beam_size, int) or beam_size < 1:
        raise ValueError(f"beam_size must be an integer >= 1, got "
                         f"{beam_size!r}")
    if isinstance(model, AttentionModel):
        return solve_attention(model, points, beam_size, starts, symmetries)
    if starts is not None or symmetries != 1:
        raise ValueError("starts and symmetries apply to the attention model "
                         "only")
    cfg = model.config
    min_n = 1 if cfg.task == "sort" else 3
    x = check_points(points, dim=cfg.input_dim, min_n=min_n)
    model.eval()
    return [_beam_one(model, x[b:b + 1], beam_size) for b in range(x.shape[0])]


def chosen_slots(paths: list[list[int]], slots: int, off: int,
                 mask_chosen: bool) -> torch.Tensor:
    """mask [len(paths), slots]: True at the slot of every input a path has
    already chosen (input i sits at slot i + off); all False for a model
    trained without the mask."""
    chosen = torch.zeros(len(paths), slots, dtype=torch.bool)
    if mask_chosen:
        for r, path in enumerate(paths):
            chosen[r, [i + off for i in path]] = True
    return chosen


def hull_allowed(pts: list, paths: list[list[int]],
                 allowed: torch.Tensor) -> torch.Tensor:
    """Keep every hull hypothesis a simple polygon: no new edge may cross an
    earlier one, and the stop token (closing the polygon) needs >= 3
    vertices and a closing edge that crosses nothing. ``allowed`` [paths,
    1 + n] is updated in place and returned."""
    for r, path in enumerate(paths):
        closes = len(path) >= 3 and not edge_crosses(pts, path, path[0])
        allowed[r, STOP] = closes
        for j in range(len(pts)):
            if path and allowed[r, j + 1] and edge_crosses(pts, path, j):
                allowed[r, j + 1] = False
    return allowed


def beam_select(top, slots: int, paths: list[list[int]], K: int, has_stop: bool,
                finished: list) -> tuple[list, list, list]:
    """From the top-2K (score, flat index) candidates, the K best live
    extensions as (paths, scores, parent rows); a hull closed by the stop
    token goes to ``finished``."""
    off = int(has_stop)
    new_paths, new_scores, rows = [], [], []
    for s, flat in zip(top.values.tolist(), top.indices.tolist()):
        r, slot = divmod(flat, slots)
        if has_stop and slot == STOP:
            finished.append((s, paths[r]))
            continue
        if len(new_paths) < K:
            new_paths.append(paths[r] + [slot - off])
            new_scores.append(s)
            rows.append(r)
    return new_paths, new_scores, rows


def best_path(paths: list, scores: torch.Tensor, finished: list,
              has_stop: bool) -> torch.Tensor:
    """The answer: the best closed hull (or the best live path if none
    closed), else the best full path."""
    if has_stop:
        if not finished:
            return torch.tensor(paths[0])
        return torch.tensor(max(finished, key=lambda f: f[0])[1])
    return torch.tensor(paths[int(scores.argmax())])


def _beam_one(model: PointerNet, x: torch.Tensor, K: int) -> torch.Tensor:
    """Beam search for one instance, hypotheses batched; score = sum of
    log-probs."""
    n, off = x.shape[1], int(model.has_stop)
    keys, inputs, (h, c) = model.encode(x)
    pts = x[0].double().tolist()
    paths, scores, finished = [[]], torch.zeros(1), []
    dec_in = model.start.expand(1, 1, -1)
    for step in range(n + off):
        d, (h, c) = model.decoder(dec_in, (h, c))
        chosen = chosen_slots(paths, keys.shape[1], off,
                              model.config.mask_chosen)
        k = keys.expand(len(paths), -1, -1)
        q = model.query(k, d[:, 0], chosen)
        logp = pointer_log_probs(k, q, model.v, chosen)
        allowed = ~chosen
        if model.has_stop:
            allowed = hull_allowed(pts, paths, allowed)
        total = (scores[:, None] + logp).masked_fill(~allowed, -math.inf)
        top = total.flatten().topk(min(2 * K, int(allowed.sum())))
        new_paths, new_scores, rows = beam_select(top, keys.shape[1], paths, K,
                                                  model.has_stop, finished)
        best_finished = max((f[0] for f in finished), default=-math.inf)
        if not new_paths or max(new_scores) <= best_finished:
            # log-probs are <= 0: no live hypothesis can overtake the best
            # finished one
            break
        paths, scores = new_paths, torch.tensor(new_scores)
        h, c = h[:, rows], c[:, rows]
        dec_in = inputs[0, [p[-1] + off for p in paths]][:, None]
    return best_path(paths, scores, finished, model.has_stop)
