"""Training the attention model without labels: REINFORCE with a baseline, and POMO.

Williams (1992): for tours pi sampled from p_theta(. | s), the gradient of the expected length
L is E[(L(pi) - b(s)) grad log p_theta(pi | s)] for any baseline b that does not depend on pi.
Kool et al. (2019, section 4) take b(s) = the length of the greedy tour of a frozen copy of the
model, replaced by the current model when a paired t-test on held-out instances says it is
better (alpha = 5%). Kwon et al., "POMO" (2020, eq. 3-4): sample one tour from each of the
n start cities, and use their mean length as the shared baseline of all n.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from refimpl.lm import check_int
from refimpl.pointer.attention import (AttentionConfig, AttentionModel, best_tours,
                                       closed_length, rollout)
from refimpl.pointer.data import VALIDATION_SEED, tsp_instances
from refimpl.pointer.supervised import cosine_lr


def reinforce_loss(lengths: torch.Tensor, log_probs: torch.Tensor,
                   baseline: torch.Tensor) -> torch.Tensor:
    """Surrogate whose gradient is the REINFORCE estimate: mean of (L - b) log p, with the
    advantage held constant (lengths, log_probs and baseline broadcast)."""
    return ((lengths - baseline).detach() * log_probs).mean()


def pomo_loss(lengths: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """POMO's loss for [B, P] tours of B instances, P starts each: every tour's baseline is
    the mean length of its instance's P tours."""
    return reinforce_loss(lengths, log_probs, lengths.mean(1, keepdim=True))


@dataclass
class RLConfig:
    n: int = 20
    method: str = "pomo"  # "pomo" (n starts, shared mean baseline) or "rollout" (Kool et al.)
    steps: int = 10_000
    batch_size: int = 64
    lr: float = 1e-4
    min_lr: float = 1e-5
    weight_decay: float = 1e-6
    dim: int = 128
    layers: int = 3
    heads: int = 8
    ff: int = 512
    seed: int = 0
    eval_every: int = 250
    eval_instances: int = 200
    baseline_every: int = 500  # rollout: steps between t-tests of the baseline


def check_rl_config(cfg: RLConfig) -> None:
    """ValueError naming the first field of an ``RLConfig`` that is out of range."""
    check_int("n", cfg.n, 3)
    if cfg.method not in ("pomo", "rollout"):
        raise ValueError(f"method must be 'pomo' or 'rollout', got {cfg.method!r}")
    for name in ("steps", "batch_size", "eval_every", "eval_instances", "baseline_every"):
        check_int(name, getattr(cfg, name), 1)
    if not 0 < cfg.min_lr <= cfg.lr:
        raise ValueError(f"lr and min_lr must satisfy 0 < min_lr <= lr, got lr={cfg.lr!r}, "
                         f"min_lr={cfg.min_lr!r}")


def paired_better(new: torch.Tensor, old: torch.Tensor, alpha: float = 0.05) -> bool:
    """One-sided paired t-test that ``new`` lengths are shorter than ``old`` (Kool et al.,
    section 4; normal approximation of the t quantile, fine for hundreds of pairs)."""
    diff = new - old
    se = diff.std() / math.sqrt(len(diff))
    if float(diff.mean()) >= 0 or float(se) == 0:
        return float(diff.mean()) < 0
    z = float(diff.mean() / se)
    return 0.5 * math.erfc(-z / math.sqrt(2)) < alpha


def rl_step_loss(cfg: RLConfig, model: AttentionModel, baseline_model, points: torch.Tensor,
                 g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, sampled lengths) for one batch: POMO from all n starts, or one tour from a random
    start against the frozen model's greedy tour from the same start."""
    if cfg.method == "pomo":
        tours, logp = rollout(model, points, cfg.n, sample=True, generator=g)
        lengths = closed_length(points, tours)
        return pomo_loss(lengths, logp), lengths
    starts = torch.randint(cfg.n, (points.shape[0], 1), generator=g)
    tours, logp = rollout(model, points, starts, sample=True, generator=g)
    lengths = closed_length(points, tours)
    with torch.no_grad():
        base = closed_length(points, rollout(baseline_model, points, starts)[0])
    return reinforce_loss(lengths, logp, base), lengths


def train_rl(cfg: RLConfig, reference: torch.Tensor | None = None,
             progress: bool = True) -> tuple[AttentionModel, dict]:
    """Adam with cosine decay, gradient clipping at 1; every ``eval_every`` steps the greedy
    gap on held-out instances from 1 start and from all n (against ``reference`` lengths, e.g.
    LKH's, when given; else mean lengths only)."""
    check_rl_config(cfg)
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    model = AttentionModel(AttentionConfig(dim=cfg.dim, layers=cfg.layers, heads=cfg.heads,
                                           ff=cfg.ff))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    val = tsp_instances(cfg.n, cfg.eval_instances, VALIDATION_SEED)
    baseline_model = copy.deepcopy(model).eval() if cfg.method == "rollout" else None
    t_test = tsp_instances(cfg.n, cfg.eval_instances, VALIDATION_SEED + 1000)  # not the curve's
    history, start, running = [], time.time(), None
    bar = tqdm(range(1, cfg.steps + 1), desc=f"{cfg.method} TSP{cfg.n}", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, cfg)
        points = torch.rand(cfg.batch_size, cfg.n, 2, generator=g)
        loss, lengths = rl_step_loss(cfg, model, baseline_model, points, g)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running = lengths.mean().item() if running is None else 0.98 * running + 0.02 * lengths.mean().item()
        if cfg.method == "rollout" and step % cfg.baseline_every == 0:
            model.eval()
            new = best_tours(model, t_test)[1]
            if paired_better(new, best_tours(baseline_model, t_test)[1]):
                baseline_model.load_state_dict(model.state_dict())
            model.train()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            history.append({"step": step, "instances": step * cfg.batch_size,
                            "sampled_length": round(running, 4),
                            **validate(model, val, reference),
                            "seconds": round(time.time() - start, 1)})
            bar.set_postfix({k: v for k, v in history[-1].items() if "gap" in k})
    record = {"train": asdict(cfg), "model": asdict(model.config), "history": history,
              "train_seconds": round(time.time() - start, 1),
              "params": sum(p.numel() for p in model.parameters())}
    return model.eval(), record


def validate(model: AttentionModel, points: torch.Tensor, reference: torch.Tensor | None) -> dict:
    """Greedy mean lengths from 1 start and from all n, and their gaps to ``reference``."""
    model.eval()
    out = {}
    for name, starts in (("one_start", 1), ("all_starts", points.shape[1])):
        mean = float(best_tours(model, points, starts)[1].mean())
        out[f"{name}_length"] = round(mean, 4)
        if reference is not None:
            out[f"{name}_gap"] = round(mean / float(reference.mean()) - 1, 5)
    model.train()
    return out
