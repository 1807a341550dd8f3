"""Supervised training of a Pointer Network on exact labels (teacher forcing)."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from refimpl.lm import check_int
from refimpl.pointer.data import VALIDATION_SEED, TSPPool, check_task_args, make_batch
from refimpl.pointer.metrics import evaluate
from refimpl.pointer.network import PointerConfig, PointerNet


@dataclass
class TrainConfig:
    task: str = "tsp"
    n: int = 10
    n_max: int | None = None  # train on sizes n..n_max (one size per batch)
    steps: int = 10_000
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 5e-5
    hidden: int = 128
    encoder: str = "lstm"
    process_steps: int = 5
    mask_chosen: bool = True
    glimpses: int = 0
    input_order: str = "random"  # hull only: "random" or "angle"
    output_order: str = "canonical"  # hull only: "canonical" or "random"
    pool_size: int = 100_000  # TSP: Held-Karp labelled instances per size
    seed: int = 0
    eval_every: int = 500
    eval_instances: int = 500


def check_train_config(cfg: TrainConfig) -> None:
    """ValueError naming the first field of a ``TrainConfig`` that is out of range."""
    check_int("n", cfg.n, 1 if cfg.task == "sort" else 3)
    if cfg.n_max is not None:
        check_int("n_max", cfg.n_max, cfg.n)
    for name in ("steps", "batch_size", "eval_every", "eval_instances", "pool_size"):
        check_int(name, getattr(cfg, name), 1)
    if not 0 < cfg.min_lr <= cfg.lr:
        raise ValueError(f"lr and min_lr must satisfy 0 < min_lr <= lr, got lr={cfg.lr!r}, "
                         f"min_lr={cfg.min_lr!r}")
    check_task_args(cfg.task, cfg.n, cfg.batch_size, cfg.input_order, cfg.output_order)


def _validation(task: str, model: PointerNet, n: int, cfg: TrainConfig) -> dict:
    """Greedy metrics on held-out instances (VALIDATION_SEED, disjoint from training and test)."""
    data = {} if task != "hull" else {"input_order": cfg.input_order}
    r = evaluate(task, model, n, cfg.eval_instances, seed=VALIDATION_SEED, **data)
    model.train()
    keys = {"tsp": ["gap"], "sort": ["accuracy"], "hull": ["accuracy", "set_accuracy", "area_coverage"]}
    return {k: round(r[k], 4) for k in keys[task]}


def cosine_lr(step: int, cfg) -> float:
    """The learning rate at ``step``: cosine decay from cfg.lr to cfg.min_lr over cfg.steps."""
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * step / cfg.steps))


def train(cfg: TrainConfig, progress: bool = True) -> tuple[PointerNet, dict]:
    """Teacher-forced NLL with Adam, cosine learning-rate decay and gradient clipping at 2."""
    check_train_config(cfg)
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    sizes = list(range(cfg.n, (cfg.n_max or cfg.n) + 1))
    model = PointerNet(PointerConfig(cfg.task, cfg.hidden, cfg.encoder, cfg.process_steps,
                                     cfg.mask_chosen, cfg.glimpses))
    pools = {n: TSPPool(n, cfg.pool_size, seed=cfg.seed * 100 + n, progress=progress)
             for n in sizes} if cfg.task == "tsp" else {}
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    history, start, running = [], time.time(), None
    bar = tqdm(range(1, cfg.steps + 1), desc=f"train {cfg.task}", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, cfg)
        n = sizes[int(torch.randint(len(sizes), (1,), generator=g))]
        if cfg.task == "tsp":
            x, y = pools[n].sample(cfg.batch_size, g)
        else:
            x, y = make_batch(cfg.task, n, cfg.batch_size, g, cfg.input_order, cfg.output_order)
        loss = model.loss(x, y)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            val = _validation(cfg.task, model, sizes[-1], cfg)
            history.append({"step": step, "loss": round(running, 4), **val,
                            "seconds": round(time.time() - start, 1)})
            bar.set_postfix(loss=f"{running:.3f}", **val)
    record = {"train": asdict(cfg), "model": asdict(model.config), "history": history,
              "train_seconds": round(time.time() - start, 1),
              "params": sum(p.numel() for p in model.parameters())}
    return model.eval(), record
