"""Train a workbench checkpoint: ``python -m refimpl.train --preset target|draft``.

AdamW with linear warm-up and cosine decay, next-character cross-entropy on
Tiny Shakespeare. Writes ``refimpl/assets/NAME.pt`` and ``NAME.json`` (config,
seed, steps, seconds, final train/val loss and the loss curve).
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from refimpl.data import CharTokenizer, get_batch, splits
from refimpl.lm import CHECKPOINTS, GPTConfig, TinyGPT, save


@dataclass(frozen=True)
class Preset:
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int = 256
    batch_size: int = 32
    steps: int = 3000
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup: int = 100
    weight_decay: float = 0.1
    dropout: float = 0.0
    seed: int = 1337


PRESETS = {
    "target": Preset(n_layer=6, n_head=8, n_embd=256, batch_size=16, steps=2500, lr=1.5e-3),
    "draft": Preset(n_layer=1, n_head=4, n_embd=128, batch_size=16, steps=3000, lr=3e-3),
    "smoke": Preset(n_layer=1, n_head=2, n_embd=32, block_size=64, batch_size=8, steps=30),
}


def lr_at(step: int, p: Preset) -> float:
    """Linear warm-up, then cosine decay from lr to min_lr."""
    if step < p.warmup:
        return p.lr * (step + 1) / p.warmup
    progress = (step - p.warmup) / max(1, p.steps - p.warmup)
    return p.min_lr + 0.5 * (p.lr - p.min_lr) * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: TinyGPT, ids: torch.Tensor, block_size: int, max_windows: int | None = None,
             batch_size: int = 64) -> float:
    """Mean cross-entropy (nats/char) over consecutive non-overlapping windows of ``ids``."""
    was_training = model.training
    model.eval()
    n = (len(ids) - 1) // block_size
    if max_windows is not None:
        n = min(n, max_windows)
    x = ids[: n * block_size].view(n, block_size)
    y = ids[1: n * block_size + 1].view(n, block_size)
    total = 0.0
    for i in range(0, n, batch_size):
        logits = model(x[i:i + batch_size])
        total += F.cross_entropy(logits.flatten(0, 1), y[i:i + batch_size].flatten(),
                                 reduction="sum").item()
    model.train(was_training)
    return total / (n * block_size)


def train(name: str, preset: Preset, out_dir: Path = CHECKPOINTS, eval_every: int = 250,
          progress: bool = True) -> dict:
    torch.manual_seed(preset.seed)
    tokenizer = CharTokenizer.from_corpus()
    train_ids, val_ids = splits(tokenizer)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=preset.block_size,
                       n_layer=preset.n_layer, n_head=preset.n_head, n_embd=preset.n_embd,
                       dropout=preset.dropout)
    model = TinyGPT(config)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": preset.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=preset.lr,
                            betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(preset.seed)
    curve = []
    start = time.perf_counter()
    bar = tqdm(range(preset.steps), desc=f"train {name}", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, preset)
        x, y = get_batch(train_ids, preset.batch_size, preset.block_size, gen)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % eval_every == 0 or step + 1 == preset.steps:
            val = evaluate(model, val_ids, preset.block_size, max_windows=128)
            curve.append({"step": step + 1, "train_loss": round(loss.item(), 4),
                          "val_loss": round(val, 4),
                          "seconds": round(time.perf_counter() - start, 1)})
            bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{val:.3f}")
    seconds = time.perf_counter() - start
    model.eval()
    result = {
        "name": name,
        "command": f"python -m refimpl.train --preset {name}",
        "preset": preset.__dict__,
        "steps": preset.steps,
        "seconds": round(seconds, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "final_train_loss": round(evaluate(model, train_ids, preset.block_size, max_windows=512), 4),
        "final_val_loss": round(evaluate(model, val_ids, preset.block_size), 4),
        "curve": curve,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save(model, out_dir / f"{name}.pt", **result)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, help="override the preset's number of steps")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--out-dir", type=Path, default=CHECKPOINTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    if args.steps is not None:
        if args.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {args.steps}")
        preset = replace(preset, steps=args.steps)
    result = train(args.preset, preset, args.out_dir)
    print(f"{args.preset}: {result['steps']} steps in {result['seconds']} s, "
          f"train {result['final_train_loss']:.4f}, val {result['final_val_loss']:.4f} nats/char")


if __name__ == "__main__":
    main()
